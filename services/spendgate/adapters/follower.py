"""TopicFollower: reads whole topics from the earliest offset into callbacks, knows when it is caught up.

Used by the gate to materialize ``spend.config``, ``spend.decisions`` and ``spend.state``, and
by the worker to follow ``spend.config``. No consumer group: every process reads every
partition (any API instance serves any scope; every worker needs the whole registry).

1. At start it takes the true end of every partition from the high watermark of a Fetch
   (``adapters.watermarks.fetch_high_watermarks``; never ``end_offsets()``, which under-reports on
   Tansu, see docs/BROKER-NOTES.md) and seeks every partition to its beginning.
2. It is ``ready`` once every partition's position has reached that start-time end: everything
   present at start has been applied. Readiness never goes back to False.
3. It then keeps following with a short fetch wait (``live_wait_ms``), so a new decision reaches
   the callbacks within tens of milliseconds. Catching up uses a longer wait (``catchup_wait_ms``)
   because Tansu's fetch polls storage and very short waits make little progress on a backlog;
   a live consumer that falls behind for ``behind_switch_s`` switches back to catching up.
   Until ready, ``on_catch_up_batch`` (if given) is called after every batch applied.
4. ``last_caught_up`` is the monotonic time at which it last knew every partition's position was
   at the broker's high watermark (as of that partition's latest Fetch answer).
   ``state_lag_ms()`` grows while the broker is away, so callers can answer degraded.

Never blocks its callers and never hangs on a broker outage: ``start()`` returns at once, the
broker may be down; the task retries (recreating the consumer at the positions it had reached,
so nothing is skipped). A record whose value is not JSON, or that a callback rejects with
``ValueError``/``KeyError``/``TypeError``/``AttributeError`` (a value of the wrong shape), is
proven invalid: it is logged, counted in
``invalid_records`` and skipped. Any other callback exception is a bug: it is logged, and the
consumer restarts from the same positions after a back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from spendgate.adapters.kafka import CLIENT_SETTINGS, KafkaUnavailable, security_for
from spendgate.adapters.watermarks import fetch_high_watermarks

log = logging.getLogger(__name__)

#: ``handler(key, value, partition, offset)``: the record key as text (None when absent), its
#: decoded JSON value (None for a tombstone) and where it was read (for provenance).
Handler = Callable[[str | None, Any, int, int], object]
HighWatermarks = Callable[[str, str], Awaitable[dict[int, int]]]

CATCHUP_WAIT_MS = 200
LIVE_WAIT_MS = 15


class TopicFollower:
    """Follows ``topics`` (full names -> handler) from the earliest offset; see the module doc."""

    def __init__(
        self,
        bootstrap: str,
        topics: Mapping[str, Handler],
        *,
        catchup_wait_ms: int = CATCHUP_WAIT_MS,
        live_wait_ms: int = LIVE_WAIT_MS,
        behind_switch_s: float = 2.0,
        retry_s: float = 1.0,
        prepare: Callable[[], Awaitable[object]] | None = None,
        high_watermarks: HighWatermarks = fetch_high_watermarks,
        client_id: str = "spendgate-gate-follower",
        on_catch_up_batch: Callable[[], object] | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._handlers = dict(topics)
        self._catchup_wait_ms = catchup_wait_ms
        self._live_wait_ms = live_wait_ms
        self._behind_switch_s = behind_switch_s
        self._retry_s = retry_s
        self._prepare = prepare
        self._high_watermarks = high_watermarks
        self._client_id = client_id
        self._on_catch_up_batch = on_catch_up_batch
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._consumer: AIOKafkaConsumer | None = None
        self._targets: dict[TopicPartition, int] | None = None
        self._positions: dict[TopicPartition, int] = {}
        self._caught_up_at: dict[TopicPartition, float] = {}
        self._live = False
        self._behind_since: float | None = None
        self.ready_event = asyncio.Event()
        self._advanced = asyncio.Event()  # replaced (after being set) each time positions move
        self.last_caught_up: float | None = None
        self.ready_at: float | None = None
        self.records = 0
        self.invalid_records = 0
        self.restarts = 0

    # --- public ---------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once everything present at start has been applied (never goes back)."""
        return self.ready_event.is_set()

    def state_lag_ms(self, now: float | None = None) -> int | None:
        """Milliseconds since the follower last knew it was at the high watermark; None = never."""
        if self.last_caught_up is None:
            return None
        now = time.monotonic() if now is None else now
        return max(0, int((now - self.last_caught_up) * 1000))

    async def start(self) -> None:
        """Start following in the background; returns at once (the broker may be down)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="topic-follower")

    async def stop(self) -> None:
        """Stop following and close the consumer. Returns within a few seconds, broker or not."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # aiokafka's stop() can swallow a cancellation delivered while it runs, so the loop
            # also checks ``_stopping``; the timeout is a last resort.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 10)
        await self._close()

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until ``ready``; raises ``TimeoutError`` after ``timeout_s``."""
        await asyncio.wait_for(self.ready_event.wait(), timeout_s)

    def has_reached(self, topic: str, ends: Mapping[int, int]) -> bool:
        """True once every record of ``topic`` below ``ends[partition]`` has been applied."""
        positions = self._positions
        return all(positions.get(TopicPartition(topic, p), -1) >= end for p, end in ends.items() if end > 0)

    async def reach(self, topic: str, ends: Mapping[int, int], timeout_s: float) -> None:
        """Wait until every record of ``topic`` below ``ends`` (partition -> offset) is applied.

        The read-your-writes barrier: with ``ends`` taken from the broker after a write was
        acknowledged, the callbacks have seen that write when this returns. Raises
        ``TimeoutError`` after ``timeout_s`` (the broker away, or the follower far behind).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            advanced = self._advanced  # taken before the test: no move can slip in between
            if self.has_reached(topic, ends):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"follower did not reach {topic} {dict(ends)} within {timeout_s}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(advanced.wait(), remaining)

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        prepared = self._prepare is None
        while not self._stopping:
            try:
                if not prepared and self._prepare is not None:
                    await self._prepare()
                    prepared = True
                if self._targets is None:
                    self._targets = await self._start_ends()
                    self._positions = {tp: -1 for tp in self._targets}  # -1: from the beginning
                    self._check_ready()
                await self._follow()
                return  # only when stopping
            except asyncio.CancelledError:
                raise
            except (KafkaUnavailable, KafkaError, OSError, TimeoutError) as exc:
                log.warning("follower: broker unavailable (%s); retrying in %.1fs", exc, self._retry_s)
            except Exception:
                log.exception("follower: unexpected error; restarting the consumer in %.1fs", self._retry_s)
            if self._stopping:
                return
            self.restarts += 1
            await self._close()
            await asyncio.sleep(self._retry_s)

    async def _start_ends(self) -> dict[TopicPartition, int]:
        topics = list(self._handlers)  # asked at once: each answer waits up to a fetch wait
        answers = await asyncio.gather(*(self._high_watermarks(self._bootstrap, t) for t in topics))
        ends: dict[TopicPartition, int] = {}
        for topic, answer in zip(topics, answers, strict=True):
            for partition, end in answer.items():
                ends[TopicPartition(topic, partition)] = end
        log.info("follower: start-time ends %s", {f"{tp.topic}/{tp.partition}": e for tp, e in ends.items()})
        return ends

    async def _open(self, wait_ms: int) -> AIOKafkaConsumer:
        assert self._targets is not None
        await self._close()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=wait_ms,
            client_id=self._client_id,
            **CLIENT_SETTINGS,
            **security_for(self._bootstrap),
        )
        self._consumer = consumer  # before start(): a cancelled start is still closed by _close()
        await consumer.start()
        tps = list(self._targets)
        consumer.assign(tps)
        fresh = [tp for tp in tps if self._positions.get(tp, -1) < 0]
        if fresh:
            await consumer.seek_to_beginning(*fresh)
        for tp in tps:
            if self._positions.get(tp, -1) >= 0:
                consumer.seek(tp, self._positions[tp])
        self._caught_up_at.clear()
        return consumer

    async def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            # aiokafka's stop() may re-raise the CancelledError of its own fetch tasks; a real
            # cancellation of ours is seen through ``_stopping`` instead.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await consumer.stop()

    async def _follow(self) -> None:
        self._live = self.ready
        consumer = await self._open(self._live_wait_ms if self._live else self._catchup_wait_ms)
        tps = list(self._positions)
        while not self._stopping:
            batches = await consumer.getmany(timeout_ms=100, max_records=5000)
            for tp, messages in batches.items():
                self._apply(self._handlers[tp.topic], tp, messages)
                if messages:
                    self._positions[tp] = messages[-1].offset + 1
            if batches and not self.ready and self._on_catch_up_batch is not None:
                self._on_catch_up_batch()
            await self._observe(consumer, tps)
            advanced, self._advanced = self._advanced, asyncio.Event()
            advanced.set()
            switch = self._want_switch()
            if switch is not None:
                self._live = switch
                consumer = await self._open(self._live_wait_ms if switch else self._catchup_wait_ms)
                log.info("follower: %s mode", "live" if switch else "catch-up")

    def _apply(self, handler: Handler, tp: TopicPartition, messages: list[ConsumerRecord[Any, Any]]) -> None:
        """One partition's batch, in order (a loop here, not a call per record: 300,000 at a start)."""
        partition, loads = tp.partition, orjson.loads
        for message in messages:
            self.records += 1
            key, value, offset = message.key, message.value, message.offset
            try:
                decoded = None if value is None else loads(value)
                handler(None if key is None else key.decode("utf-8", "replace"), decoded, partition, offset)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError: a ValueError
                self.invalid_records += 1
                log.warning(
                    "follower: skipping invalid record %s/%d@%d: %r", tp.topic, partition, offset, exc
                )

    async def _observe(self, consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
        """Update positions, readiness and ``last_caught_up`` from the consumer's fetch state."""
        wall, mono = time.time(), time.monotonic()
        behind = False
        for tp in tps:
            position = await consumer.position(tp)
            self._positions[tp] = position
            highwater = consumer.highwater(tp)
            polled = consumer.last_poll_timestamp(tp)
            if highwater is None or polled is None:
                continue
            if position >= highwater:
                # caught up as of that partition's latest Fetch answer (wall clock, ms)
                self._caught_up_at[tp] = mono - max(0.0, wall - polled / 1000)
            else:
                behind = True
        if len(self._caught_up_at) == len(tps):
            self.last_caught_up = min(self._caught_up_at.values())
        self._behind_since = (self._behind_since or mono) if behind else None
        self._check_ready()

    def _check_ready(self) -> None:
        if self.ready or self._targets is None:
            return
        if all(self._positions.get(tp, -1) >= end for tp, end in self._targets.items() if end > 0):
            self.ready_at = time.monotonic()
            if self.last_caught_up is None:
                self.last_caught_up = self.ready_at
            self.ready_event.set()
            log.info("follower: caught up with the start-time ends (%d records)", self.records)

    def _want_switch(self) -> bool | None:
        """True: switch to live mode; False: back to catch-up mode; None: stay."""
        if not self._live and self.ready and self._behind_since is None:
            return True
        if (
            self._live
            and self._behind_since is not None
            and time.monotonic() - self._behind_since > self._behind_switch_s
        ):
            return False
        return None
