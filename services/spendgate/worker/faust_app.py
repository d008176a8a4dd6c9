"""The Faust app the worker stands on: :func:`make_app` (the configured ``faust.App``) and
:func:`run_worker`.

Everything here is valid on Apache Kafka and on the embedded Tansu broker (see
``FAUST-NOTES.md`` next to this file for the measurements and pitfalls). The helpers the
agents use live beside it: ``worker.partitions`` (tables one partition at a time, which
partitions this worker owns) and ``worker.sends`` (sends and flushes that wait for acks).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import faust
from faust import stores as faust_stores
from faust.transport.drivers import aiokafka as faust_aiokafka

from spendgate.settings import Settings
from spendgate.worker import bulk_recovery, recovery_fix

log = logging.getLogger(__name__)

__all__ = ["FETCH_MAX_WAIT_MS", "STORES", "broker_credentials", "make_app", "run_worker"]

#: Consumer ``fetch_max_wait_ms``. Faust hard-codes 1500 ms (produce->table p50 ~400 ms on
#: Tansu); 10-20 ms made no progress catching up on Tansu, 100 ms serves both latency and
#: catch-up (see FAUST-NOTES.md).
FETCH_MAX_WAIT_MS = 100

#: Faust's producer request timeout, also aiokafka's batch expiry (a batch whose partition has
#: no known leader fails after this long) and the broker-side ProduceRequest timeout.
PRODUCER_REQUEST_TIMEOUT_S = 60.0

#: Table stores the worker supports (``SPENDGATE_WORKER_STORE``). ``rocksdict://`` is
#: :mod:`spendgate.worker.rocks_store` (Faust's RocksDB store with the rocksdict driver and a
#: crash guard); Faust itself has no ``rocksdict://`` scheme (its ``rocksdb://`` picks the
#: driver by what is installed).
#: ``memory://`` is :mod:`spendgate.worker.memory_store` (Faust's memory store, but a kept
#: partition resumes recovery where it was instead of re-reading its changelog from the start).
STORES = {
    "memory://": "spendgate.worker.memory_store:Store",
    "rocksdict://": "spendgate.worker.rocks_store:Store",
}


def _store_url(store: str) -> str:
    if store not in STORES:
        raise ValueError(f"unsupported worker store {store!r}; use one of {', '.join(STORES)}")
    if store == "rocksdict://":
        try:
            import rocksdict  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("worker store rocksdict:// needs rocksdict: pip install rocksdict") from exc
        # Faust resolves a store URL by its scheme through this registry (what a
        # ``faust.stores`` entry point would add); idempotent.
        faust_stores.STORES.aliases["rocksdict"] = STORES[store]
    if store == "memory://":  # Faust's own "memory" scheme stays Faust's store
        faust_stores.STORES.aliases["keptmemory"] = STORES[store]
        return "keptmemory://"
    return store


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread with a configurable fetch wait."""

    fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust passes fetch_max_wait_ms=1500 literally; aiokafka only stores the value in
        # __init__ and hands it to its Fetcher in start(), so overriding it here is enough.
        if not hasattr(consumer, "_fetch_max_wait_ms"):  # pragma: no cover - aiokafka drift
            raise RuntimeError("aiokafka changed: cannot override fetch_max_wait_ms")
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer

    def verify_event_path(self, now: float, tp: Any) -> Any:
        """Faust's stall detector, minus a crash: it reads ``tp_state.position``, which aiokafka
        0.14 asserts is set; a partition assigned a moment ago whose committed offset is still
        being fetched has none, and the AssertionError crashed the whole worker (seen on Apache
        Kafka with two workers rebalancing). Such a partition has nothing to verify yet."""
        try:
            return super().verify_event_path(now, tp)
        except AssertionError:
            return None


class _Producer(faust_aiokafka.Producer):
    """Faust's producer whose aiokafka client keeps every topic it sends to in its metadata
    (``adapters.kafka.track_every_topic``: without it a batch could wait 20 minutes for a
    leader after a broker restart)."""

    def _new_producer(self, transactional_id: str | None = None) -> Any:
        from spendgate.adapters.kafka import track_every_topic

        return track_every_topic(super()._new_producer(transactional_id))


def _transport_class(fetch_max_wait_ms: int) -> type[faust_aiokafka.Transport]:
    thread_cls = type("SpendgateConsumerThread", (_ConsumerThread,), {"fetch_max_wait_ms": fetch_max_wait_ms})

    class _Consumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
            return thread_cls(self, loop=self.loop, beacon=self.beacon)

        async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
            # Faust counts the offsets of a gap in what it read as acknowledged (they are
            # committed past): on topics without transactions or compaction a gap means
            # records were fetched and never delivered.
            log.warning("offset gap on %s: %s..%s counted as acked", tp, offset_from, offset_to - 1)
            await super()._add_gap(tp, offset_from, offset_to)

    class _Transport(faust_aiokafka.Transport):
        Consumer = _Consumer
        Producer = _Producer

    return _Transport


def broker_credentials(settings: Settings) -> Any:
    """Faust's credentials for SASL/TLS from the same settings as every other client (None: plaintext)."""
    from spendgate.adapters.kafka import client_security

    options = client_security(settings)
    if not options:
        return None
    if "sasl_mechanism" in options:
        return faust.SASLCredentials(
            username=options["sasl_plain_username"],
            password=options["sasl_plain_password"],
            ssl_context=options.get("ssl_context"),
            mechanism=options["sasl_mechanism"],
        )
    return faust.SSLCredentials(options["ssl_context"])


def make_app(
    settings: Settings,
    *,
    app_id: str | None = None,
    fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
    recovery_fix_enabled: bool = True,
    store: str | None = None,
    session_timeout: float | None = None,
) -> faust.App:
    """Build the worker's ``faust.App`` (not started; nothing touches the network here).

    * group id / changelog prefix: ``app_id`` or ``settings.worker_id``;
    * at-least-once, ``acks=all`` (Tansu has no idempotent/transactional producer);
    * group timing: session = rebalance timeout = ``session_timeout`` (default 2 s when
      ``settings.dev``, else 10 s), heartbeat = min(0.5 s, session / 4). Tansu answers
      JoinGroup after ~half the session timeout, so 2 s gives a ~2.5 s (re)join instead of
      ~31 s with Faust's 60 s. Apache Kafka refuses sessions below
      ``group.min.session.timeout.ms`` (6 s by default), hence 10 s outside dev;
    * Faust declares its own changelog topics (compact, ``settings.partitions`` partitions,
      replication ``settings.replication_factor``); source topics are never declared
      by Faust and must exist (``adapters.kafka.ensure_topics``);
    * web server on 127.0.0.1:``settings.worker_web_port``, disabled when the port is 0;
    * creates ``settings.data_dir`` (Faust's datadir is ``<data_dir>/faust``);
    * table store ``store`` or ``settings.worker_store``: ``memory://`` or ``rocksdict://``
      (RocksDB under ``<data_dir>/faust/v1/tables/``, not per app id; one ``data_dir`` per
      process, RocksDB locks its databases). Either way, read and write tables with
      ``worker.partitions``' helpers (``*_in_partition``): RocksDB keeps one database per partition;
    * ``recovery_fix_enabled=False`` (stock recovery: no fix, no bulk read) is only for the
      regression test that proves the fix is needed.
    """
    if recovery_fix_enabled:
        recovery_fix.install()
        bulk_recovery.install()
    web_port = settings.worker_web_port
    if session_timeout is None:
        session_timeout = 2.0 if settings.dev else 10.0
    store_url = _store_url(store or settings.worker_store)
    datadir = Path(settings.data_dir).absolute() / "faust"
    datadir.mkdir(parents=True, exist_ok=True)  # Faust only creates the last level
    app = faust.App(
        app_id or settings.worker_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store=store_url,
        datadir=str(datadir),
        autodiscover=False,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        # table writes go out as whole batches (send_batches): let one hold many records
        producer_max_batch_size=1 << 20,
        broker_session_timeout=session_timeout,
        broker_heartbeat_interval=min(0.5, session_timeout / 4),
        broker_rebalance_timeout=session_timeout,
        broker_request_timeout=30.0,
        # Faust's default is 20 minutes, which is also how long a batch without a leader waits
        # before it fails (aiokafka's batch expiry): a flush must give up far sooner.
        producer_request_timeout=PRODUCER_REQUEST_TIMEOUT_S,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        topic_partitions=settings.partitions,
        # Faust's setting is unsigned (no -1 = broker default): 1 for Tansu, 3 for production.
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        # The leader topic only serves app.timer(on_leader=True); we use none.
        topic_disable_leader=True,
        # Memory stores recover a newly assigned partition from offset 0, so standby copies
        # buy nothing and would put other partitions' keys in our tables. RocksDB stores resume from the
        # offset they persisted, so a partition coming back to this data_dir catches up.
        table_standby_replicas=0,
        stream_recovery_delay=0.0,
        web_enabled=web_port != 0,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        web_port=web_port or 6066,
        broker_credentials=broker_credentials(settings),
    )
    app.transport = _transport_class(fetch_max_wait_ms)(app.conf.broker_consumer, app)
    return app


def run_worker(app: faust.App, *, loglevel: str = "info") -> None:
    """Run ``app`` as a worker in this process; blocks until SIGTERM/SIGINT, then stops cleanly.

    Use this instead of ``app.main()`` / ``faust worker``: Faust's CLI resets
    ``web_enabled`` (``--with-web`` is its default) and the web port, undoing ``make_app``.
    Faust's worker redirects ``print`` to its logger at WARNING level.
    """
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()


# -- writing table keys into the right partition --------------------------------------------
