"""Outbox relay: produces committed control-plane changes to ``{prefix}config``, in id order.

A background task of every API process; a Postgres advisory lock lets only one of them relay at
a time (the others stand by and take over within one poll when it dies). One cycle:
1. open a transaction and take ``pg_try_advisory_xact_lock(RELAY_LOCK)``; give up if another
   process holds it;
2. on the first cycle of this process, and then every ``empty_check_s`` if the config topic is
   empty (a fresh broker; judged by the high watermark of a Fetch, since Tansu's ListOffsets
   under-reports), produce the full current state (``store.control.snapshot``) with the current
   versions, so readers converge on Postgres even after a partially lost topic;
3. read up to ``batch_size`` unsent outbox rows in id order, produce each (key = the row's
   ``topic_key``, value = its JSON exactly as committed, ``None`` for a delete) and wait for the
   broker's ``acks=all`` on all of them;
4. mark them sent and commit.
A crash between 3 and 4 re-sends the batch on the next cycle: the records carry their version,
so readers drop the duplicates. Nothing is produced before its change committed, because only
committed outbox rows are visible to step 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from psycopg_pool import AsyncConnectionPool

from spendgate.adapters.kafka import idempotence_supported, security_for
from spendgate.adapters.watermarks import fetch_high_watermarks
from spendgate.store.control import snapshot
from spendgate.store.pool import guard

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0
RELAY_LOCK = 0x5BE7D6A7E0  # arbitrary, fixed: "the outbox relay" advisory lock id

HighWatermarks = Callable[[str, str], Awaitable[dict[int, int]]]


class OutboxRelay:
    """Relays committed outbox rows to the config topic; see the module docstring.

    ``start()`` returns at once (the broker and Postgres may still be down; the task retries);
    ``stop()`` cancels the task and closes the producer. ``wake()`` makes the next cycle start
    now (the API calls it after each commit so a budget change reaches the topic in milliseconds).
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        bootstrap: str,
        topic: str,
        prepare: Callable[[], Awaitable[object]] | None = None,
        poll_interval_s: float = 0.2,
        empty_check_s: float = 10.0,
        batch_size: int = 500,
        high_watermarks: HighWatermarks | None = None,
    ) -> None:
        self._pool = pool
        self._bootstrap = bootstrap
        self._topic = topic
        self._prepare = prepare
        self._poll = poll_interval_s
        self._empty_check_s = empty_check_s
        self._batch = batch_size
        self._high_watermarks = high_watermarks or fetch_high_watermarks
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._committed = asyncio.Event()  # replaced (after being set) after each relayed batch
        self._next_empty_check = 0.0
        self.sent = 0  # records produced and acknowledged (for metrics and tests)
        self.republished = 0  # snapshot records produced
        self.republished_at_start = False

    def wake(self, *_: object) -> None:
        self._wake.set()

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outbox-relay")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # bounded: aiokafka can swallow a cancellation delivered inside start()/stop()
            await asyncio.wait({task}, timeout=STOP_TIMEOUT_S)
        await self._close_producer()

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), STOP_TIMEOUT_S)

    async def _ensure_producer(self) -> AIOKafkaProducer:
        if self._producer is None:
            if self._prepare is not None:  # e.g. create the topics with their config first
                await self._prepare()
            producer = AIOKafkaProducer(
                bootstrap_servers=self._bootstrap,
                acks="all",
                # Tansu cannot (probed by ensure_topics); versions make duplicates harmless anyway
                enable_idempotence=idempotence_supported(self._bootstrap),
                linger_ms=5,
                request_timeout_ms=10_000,
                **security_for(self._bootstrap),
            )
            await producer.start()
            self._producer = producer
        return self._producer

    async def _run(self) -> None:
        backoff = self._poll
        while True:
            try:
                sent = await self.run_once()
                backoff = self._poll
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker or database down: keep the rows, retry later
                log.warning(
                    "outbox relay cycle failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, backoff
                )
                if isinstance(exc, KafkaError | OSError):
                    await self._close_producer()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if sent >= self._batch:
                continue
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll)

    async def run_once(self) -> int:
        """One relay cycle (steps 1-4); returns how many outbox rows it marked sent."""
        producer = await self._ensure_producer()
        async with guard(), self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT pg_try_advisory_xact_lock(%s) AS ok", (RELAY_LOCK,))
            row = await cur.fetchone()
            if not row or not row["ok"]:  # type: ignore[call-overload]
                return 0
            if time.monotonic() >= self._next_empty_check:
                await self._republish(conn, producer, only_if_empty=self.republished_at_start)
                self.republished_at_start = True
                self._next_empty_check = time.monotonic() + self._empty_check_s
            cur = await conn.execute(
                "SELECT id, topic_key, value FROM outbox WHERE sent_at IS NULL"
                " ORDER BY id LIMIT %s FOR UPDATE",
                (self._batch,),
            )
            rows = await cur.fetchall()
            if not rows:
                return 0
            await self._produce(producer, [(r["topic_key"], r["value"]) for r in rows])  # type: ignore[call-overload]
            await conn.execute(
                "UPDATE outbox SET sent_at = now() WHERE id = ANY(%s)",
                ([r["id"] for r in rows],),  # type: ignore[call-overload]
            )
        self.sent += len(rows)
        committed, self._committed = self._committed, asyncio.Event()
        committed.set()
        return len(rows)

    async def wait_sent(self, version: int, timeout_s: float, *, poll_s: float = 0.02) -> None:
        """Return once outbox row ``version`` is on the topic, acknowledged by the broker.

        Whichever API process holds the relay lock sends it, so this asks Postgres whether
        the row is marked sent: again after each batch this process relays, and every
        ``poll_s`` for the others. Raises ``TimeoutError`` after ``timeout_s``; a Postgres
        error counts as "not yet" until then.
        """
        deadline = time.monotonic() + timeout_s
        self.wake()
        while True:
            committed = self._committed
            if await self._is_sent(version):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"outbox row {version} not relayed within {timeout_s}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(committed.wait(), min(poll_s, remaining))

    async def _is_sent(self, version: int) -> bool:
        try:
            async with self._pool.connection(timeout=1.0) as conn:
                cur = await conn.execute(
                    "SELECT sent_at IS NOT NULL AS sent FROM outbox WHERE id = %s", (version,)
                )
                row = await cur.fetchone()
        except Exception as exc:  # noqa: BLE001 - Postgres away: "not yet", the caller's bound applies
            log.debug("outbox: could not read row %d: %s", version, exc)
            return False
        # no row: the version belongs to no outbox row (never the case for a real change)
        return row is None or bool(row["sent"])  # type: ignore[call-overload]

    async def _republish(self, conn: object, producer: AIOKafkaProducer, *, only_if_empty: bool) -> None:
        if only_if_empty:
            marks = await self._high_watermarks(self._bootstrap, self._topic)
            if any(marks.values()):
                return
        records = await snapshot(conn)  # type: ignore[arg-type]
        log.info("republishing %d records of current state to %s", len(records), self._topic)
        await self._produce(producer, [(k, v) for k, v in records])
        self.republished += len(records)

    async def _produce(self, producer: AIOKafkaProducer, records: list[tuple[str, str | None]]) -> None:
        futures = [
            await producer.send(
                self._topic, key=key.encode(), value=None if value is None else value.encode()
            )
            for key, value in records
        ]
        await asyncio.gather(*futures)
