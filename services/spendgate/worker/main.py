"""``spendgate worker``: run the accounting worker until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging

from spendgate.adapters.follower import TopicFollower
from spendgate.adapters.kafka import KafkaUnavailable, ensure_topics
from spendgate.adapters.watermarks import HighWatermarkProbe
from spendgate.records import Source
from spendgate.settings import Settings

log = logging.getLogger(__name__)

#: Config changes must be decided within 1 s; a 100 ms fetch wait keeps the idle follower cheap.
CONFIG_WAIT_MS = 100


#: Cyclic GC thresholds for the worker (CPython's default is 700, 10, 10).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a process holding one ledger per scope.

    Why: the worker allocates a few dicts per applied delta and keeps ~10 objects per scope
    alive, so with the default thresholds CPython ran a young collection every 700 allocations
    and, every few seconds, a full one over the whole heap (imports included): over half of
    stage B's CPU (measured: 150 -> 70 us per event). ``gc.freeze()`` moves everything
    allocated so far (modules, Faust, pydantic schemas) out of the collector's sight for good;
    the higher thresholds make young collections ~70x rarer. Reference counting still frees
    acyclic garbage at once; only cyclic garbage lives longer (bounded by the thresholds).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


#: Bounds of one barrier attempt (the barrier retries until the broker answers).
BARRIER_PROBE_S = 5.0
BARRIER_REACH_S = 10.0


async def config_barrier(probe: HighWatermarkProbe, follower: TopicFollower, topic: str) -> None:
    """Return once ``follower`` applied every record of ``topic`` acknowledged before the call.

    Retries (logging each failure) while the broker does not answer: attributing usage with a
    registry that may miss an acknowledged change would charge the wrong team, and the worker
    can't make progress without the broker anyway.
    """
    while True:
        try:
            ends = await probe.high_watermarks(topic, timeout_s=BARRIER_PROBE_S)
            await follower.reach(topic, ends, BARRIER_REACH_S)
            return
        except (KafkaUnavailable, TimeoutError) as exc:
            log.warning("config barrier: %s; retrying", exc)
            await asyncio.sleep(0.2)


def run(settings: Settings) -> None:
    """Start the Faust worker (blocks; Faust handles SIGINT/SIGTERM)."""
    from spendgate.worker.app import build
    from spendgate.worker.faust_app import run_worker

    asyncio.run(ensure_topics(settings))
    app, worker = build(settings)

    def on_config(key: str | None, value: object, partition: int, offset: int) -> None:
        if key is None:
            raise ValueError("config record without a key")
        worker.on_config(key, value, Source(partition=partition, offset=offset))  # type: ignore[arg-type]

    follower = TopicFollower(
        settings.kafka_bootstrap,
        {settings.topic("config"): on_config},
        catchup_wait_ms=CONFIG_WAIT_MS,
        live_wait_ms=CONFIG_WAIT_MS,
        client_id="spendgate-worker-config",
    )
    probe = HighWatermarkProbe(settings.kafka_bootstrap, client_id="spendgate-worker-watermarks")
    worker.config_barrier = lambda: config_barrier(probe, follower, settings.topic("config"))

    @app.task
    async def config_feed() -> None:
        """Follow ``spend.config`` for ever; events wait until what was there at start is applied.

        The follower survives broker outages and skips (logs, counts) records that are not
        valid config, so one bad record cannot stop the worker.
        """
        await follower.start()
        try:
            await follower.wait_ready()
            worker.config_ready.set()
            log.info("config caught up")
            await asyncio.Event().wait()
        finally:
            await follower.stop()
            await probe.close()

    tune_gc()
    run_worker(app, loglevel=settings.log_level.lower())
