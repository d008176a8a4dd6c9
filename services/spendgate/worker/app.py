"""The accounting worker: Faust wiring around the pure stages (``ingest``, ledger, ``publish``).

Stage A, agent ``ingest`` on ``spend.usage`` (keyed by key id), per batch:
  1. plan the batch (validate, dedupe by event id, attribute, aggregate per scope);
  2. write the new seen ids and ``progress[p]`` to their tables, await the broker's acks;
  3. produce dead letters, and the deltas bundled per ``worker.deltas`` partition of their
     scope (one record per partition per batch), await the acks;
  4. return, so Faust acks the events and commits their offsets later.
Stage B, agent ``aggregate`` on ``worker.deltas`` (a scope always in the same partition), per batch:
  1. apply each delta to the scope's ledger (idempotent per record, see ``domain.ledger``);
  2. write the changed ledger records, await the acks;
  3. decide budgeted scopes now and publish decisions/alerts; mark the scope's state dirty.
Timers publish coalesced state, re-decide scopes whose window reset, and expire old records
(``worker.outputs``).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import faust
from faust.tables.base import Collection
from faust.types import TP
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from spendgate.accounting.deltas import Delta, decode_bundle, encode_bundle
from spendgate.accounting.ingest import RawRecord
from spendgate.accounting.ledgers import apply_deltas, day_key, partition_of
from spendgate.accounting.publish import Publisher
from spendgate.accounting.seen import SeenIds, plan_with_seen
from spendgate.domain import holds as hold_ops
from spendgate.domain.ledger import DayRecord, HotRecord, ScopeLedger
from spendgate.domain.registry import ConfigChange, RegistryView
from spendgate.records import Source, source_at
from spendgate.settings import Settings
from spendgate.worker import metrics
from spendgate.worker.faust_app import make_app
from spendgate.worker.outputs import Outputs
from spendgate.worker.partitions import (
    assigned_partitions,
    get_in_partition,
    items_in_partition,
    partitions_ready,
    write_in_partition,
)
from spendgate.worker.sends import flush, send_many
from spendgate.worker.takeover import Stored, stored_scopes

log = logging.getLogger(__name__)

INGEST_BATCH = 5000
INGEST_WITHIN_S = 0.1
AGGREGATE_BATCH = 64
AGGREGATE_WITHIN_S = 0.02


class Worker(Outputs):
    """State and behaviour of one worker process; the Faust agents call into it."""

    def __init__(self, settings: Settings, app: faust.App) -> None:
        self.settings = settings
        self.app = app
        self.registry = RegistryView()
        self.config_ready = asyncio.Event()
        self.publisher = Publisher()
        self.ledgers: dict[str, ScopeLedger] = {}  # loaded on first use (``_ledger``)
        #: the owned scopes the ledger table held when this generation started
        self.stored: dict[str, Stored] = {}
        #: scopes whose state the takeover republish has yet to publish (``worker.takeover``)
        self.backlog: dict[str, None] = {}
        #: (group generation, owned ``worker.deltas`` partitions) the ledgers were loaded for
        self.ledgers_built_for: tuple[int | None, frozenset[int]] | None = None
        #: scopes whose ledgers hold deltas of an aggregate batch not yet acked by the changelog
        self.unflushed: set[str] = set()
        #: held while records are computed and handed to the producer (tick and aggregate)
        self.publishing = asyncio.Lock()
        self.dirty: dict[str, Source | None] = {}
        self.sources: dict[str, Source] = {}  # the last usage event (or config change) per scope
        self.due: list[tuple[float, str]] = []
        self.seen_ids = SeenIds(settings.dedupe_horizon_h * 3600)
        self.hold_book = hold_ops.HoldBook()
        self.seen_generation: int | None = None
        #: scope -> the hold expiry it is due at (so a scope is queued once per expiry)
        self.hold_due: dict[str, float] = {}
        #: Set by ``worker.main``: returns once the registry holds every ``spend.config`` record
        #: acknowledged before the call (read-your-writes; see ``ingest``).
        self.config_barrier: Callable[[], Awaitable[None]] | None = None

        topic = settings.topic
        raw: dict[str, Any] = {
            "key_type": bytes,
            "value_type": bytes,
            "key_serializer": "raw",
            "value_serializer": "raw",
        }
        self.usage = app.topic(topic("usage"), **raw)
        self.deltas = app.topic(topic("worker.deltas"), **raw)
        self.outputs = {
            name: app.topic(topic(name), **raw) for name in ("usage.dlq", "decisions", "state", "alerts")
        }
        n = settings.partitions
        # app.Table is typed as TableT, which lacks the store access the write helpers need.
        self.seen = cast(Collection, app.Table("seen", partitions=n, key_type=str))
        self.progress = cast(Collection, app.Table("progress", partitions=n, key_type=str))
        self.ledger_table = cast(Collection, app.Table("ledger", partitions=n, key_type=str))

    # ---- config -------------------------------------------------------------------------

    def on_config(self, key: str, value: dict[str, Any] | None, source: Source | None = None) -> None:
        change = self.registry.apply(key, value)
        if change is not None and change.type == "budget" and change.scope:
            if source is not None and change.scope not in self.sources:
                self.sources[change.scope] = source
            self._schedule_if_owned(change)

    def _schedule_if_owned(self, change: ConfigChange) -> None:
        assert change.scope is not None
        if partition_of(change.scope, self.settings.partitions) in self.owned_partitions():
            heapq.heappush(self.due, (0.0, change.scope))

    def owned_partitions(self) -> set[int]:
        return assigned_partitions(self.app, self.deltas)

    # ---- stage A --------------------------------------------------------------------------

    async def ingest(self, events: Sequence[faust.EventT]) -> None:
        """Stage A for one batch (module docstring). Before attributing the batch, the barrier
        makes sure the registry holds every config change acknowledged before the batch was
        fetched, so an event appended after a control-plane write's answer is attributed with
        that write (CONTRACT §4, read-your-writes): the events were fetched before the barrier
        asks the broker for the config topic's end, and that write was acknowledged before
        the event was even produced."""
        if self.config_barrier is not None:
            await self.config_barrier()
        records = [  # the append time bounds a hold's expiry, as replay reads it too
            RawRecord(m.partition, m.offset, m.value, m.key, m.timestamp) for m in (e.message for e in events)
        ]
        partitions = {r.partition for r in records}
        self._forget_seen_ids_after_a_rebalance()
        # Tables are read with an explicit partition (the keys' own), never through the
        # current event: see worker.partitions.in_partition.
        for p in partitions:
            if not self.seen_ids.is_loaded(p):
                self.seen_ids.load(p, items_in_partition(self.seen, p))
            if not self.hold_book.is_loaded(p):
                self.hold_book.load(p, items_in_partition(self.seen, p))
        progress = {p: int(get_in_partition(self.progress, p, str(p), -1)) for p in partitions}
        plan, seen_writes = plan_with_seen(
            self.seen_ids,
            records,
            now=dict.fromkeys(partitions, time.time()),
            progress=progress,
            registry=self.registry,
            topic=self.usage.get_topic_name(),
            holds=self.hold_book,
        )
        futures = []
        for p in partitions:
            if p in plan.progress:
                futures += await write_in_partition(self.progress, p, [(str(p), plan.progress[p])])
            futures += await write_in_partition(self.seen, p, seen_writes.get(p, []))
        await flush(self.app, futures)  # 2. durable before anything downstream sees the batch
        await send_many(  # 3. dead letters keyed as received
            self.outputs["usage.dlq"],
            [(r.key, letter.model_dump_json().encode()) for r, letter in plan.dead_letters],
        )
        bundles: dict[int, list[Delta]] = {}
        for delta in plan.deltas:
            bundles.setdefault(partition_of(delta.scope, self.settings.partitions), []).append(delta)
        await send_many(self.deltas, [(None, encode_bundle(ds), q) for q, ds in bundles.items()])
        metrics.DELTAS.labels(stage="emitted").inc(len(plan.deltas))
        for _, letter in plan.dead_letters:
            metrics.DEAD_LETTERS.labels(reason=letter.error.split(":")[0][:40]).inc()
        metrics.EVENTS.inc(plan.events)
        self._record_lag({r.partition: r.offset for r in records})
        metrics.DUPLICATES.inc(plan.duplicates)

    def _forget_seen_ids_after_a_rebalance(self) -> None:
        """Start a new in-memory index after every rebalance; it reloads from the recovered table.

        A partition that left this worker and came back must not be judged by the ids this
        worker knew before: another worker may have counted more in between.
        """
        generation = self.app.consumer_generation_id
        if generation != self.seen_generation:
            self.seen_ids = SeenIds(self.settings.dedupe_horizon_h * 3600)
            self.hold_book = hold_ops.HoldBook()
            self.seen_generation = generation

    def _record_lag(self, last_offsets: dict[int, int]) -> None:
        topic = self.usage.get_topic_name()
        for partition, offset in last_offsets.items():
            highwater = self.app.consumer.highwater(TP(topic, partition))
            if highwater is not None:
                metrics.CONSUMER_LAG.labels(partition=str(partition)).set(max(0, highwater - offset - 1))

    # ---- stage B --------------------------------------------------------------------------

    def _load_ledger(self, scope: str) -> ScopeLedger:
        """A scope's ledger from the table: its hot record and the day records the generation
        found (``stored``; a scope loads once per generation, so these are all of them)."""
        table, p = self.ledger_table, partition_of(scope, self.settings.partitions)
        raw = get_in_partition(table, p, scope)
        stored = self.stored.get(scope)
        days = {day: get_in_partition(table, p, day_key(scope, day)) for day in stored.days} if stored else {}
        ledger = ScopeLedger(
            HotRecord.from_json(raw) if raw else None,
            {day: DayRecord.from_json(record) for day, record in days.items() if record},
        )
        ledger.settle()  # recovered day records are durable
        return ledger

    def _ledger(self, scope: str) -> ScopeLedger:
        ledger = self.ledgers.get(scope)
        if ledger is None:
            ledger = self.ledgers[scope] = self._load_ledger(scope)
        return ledger

    def _owns(self, scope: str, partitions: frozenset[int]) -> bool:
        return partition_of(scope, self.settings.partitions) in partitions

    def _rebuild_ledgers(self, owned: frozenset[int], generation: int | None) -> None:
        """Start a group generation: list the owned scopes' ledgers, forget the lost ones.

        Runs once per generation (after its recovery), not only when the owned set changes: a
        partition that left and came back, or one held across a session this worker lost, may
        have been written by another owner in between, so nothing in memory from the previous
        generation is trusted. Ledgers load from the (recovered) table on first use
        (``_ledger``); decisions go out again for every budgeted owned scope, as after a restart,
        and the state of every stored scope is published again, in chunks (``backlog``, see
        ``worker.takeover``): the last owner may have counted deltas (their ledger writes acked)
        without publishing them -- its tick does not run during a rebalance, a SIGKILL stops
        it -- and without a new delta nobody would ever publish them (issue 13). Dirty/due/source
        bookkeeping and alert memory of scopes in partitions no longer owned are dropped, so
        nothing is ever published about them (they would be judged by an empty ledger: issue 19).

        ``data.items()`` is every key of the memory store, or the keys of every active
        partition's RocksDB database; either way filtered by ``owned`` below.
        """
        self.stored = stored_scopes(list(self.ledger_table.data.items()), lambda s: self._owns(s, owned))
        self.ledgers = {}
        self.backlog = dict.fromkeys(self.stored)

        def lost(scope: str) -> bool:
            return not self._owns(scope, owned)

        self.dirty = {scope: source for scope, source in self.dirty.items() if not lost(scope)}
        self.sources = {scope: source for scope, source in self.sources.items() if not lost(scope)}
        self.due = [(at, scope) for at, scope in self.due if not lost(scope)]
        self.hold_due = {}
        self.publisher.forget_where(lost)
        self.publisher.published.clear()  # readers may hold another owner's decisions now
        now = time.time()
        self.due += [(now, scope) for scope in self.registry.budgets if not lost(scope)]
        # a scope with holds: its reserved_usd may have changed while nobody owned it
        self.due += [(now, scope) for scope, stored in self.stored.items() if stored.holds]
        heapq.heapify(self.due)
        self.ledgers_built_for = (generation, owned)
        log.info(
            "ledgers listed for generation %s, partitions %s: %d scopes (rebalancing %s, in recovery %s)",
            generation,
            sorted(owned),
            len(self.stored),
            self.app.rebalancing,
            getattr(self.app, "in_recovery", None),
        )

    def ensure_ledgers(self, *, recovered: bool = False) -> None:
        """Load the ledgers of this generation once its recovery is over.

        ``recovered``: the caller knows it is (``aggregate``: Faust delivers a generation's
        events only after its recovery, possibly a moment before it clears ``rebalancing``).
        Otherwise only when not rebalancing or recovering: the table may be half recovered then.
        A batch still in flight at a revocation keeps the ledgers of its own generation.
        """
        if recovered:
            owned = frozenset(self.owned_partitions())
        else:
            owned = frozenset(partitions_ready(self.app, self.deltas))
        generation = self.app.consumer_generation_id
        if owned and self.ledgers_built_for != (generation, owned):
            self._rebuild_ledgers(owned, generation)

    def publishable(self) -> frozenset[int]:
        """The ``worker.deltas`` partitions whose scopes this worker may publish about now.

        Owned, not rebalancing or recovering, and with ledgers loaded for this generation;
        empty otherwise. Checked right before records are handed to the producer, in the same
        synchronous step as computing them.
        """
        ready = frozenset(partitions_ready(self.app, self.deltas))
        if not ready or self.ledgers_built_for != (self.app.consumer_generation_id, ready):
            return frozenset()
        return ready

    async def aggregate(self, events: Sequence[faust.EventT]) -> None:
        """Stage B for one batch (module docstring): apply, persist, then decide and publish."""
        self.ensure_ledgers(recovered=True)
        ledgers = self.ledgers  # this generation's, even if a rebalance replaces them meanwhile
        by_partition: dict[int, list[Delta]] = {}
        for event in events:
            by_partition.setdefault(event.message.partition, []).extend(
                decode_bundle(event.message.value or b"[]")
            )
        # one Applied per worker.deltas partition: its records go to that changelog partition
        groups = {
            q: apply_deltas(ledgers, deltas, self._load_ledger) for q, deltas in by_partition.items()
        }
        touched = {scope: at for group in groups.values() for scope, at in group.touched.items()}
        self.unflushed = set(touched)  # until the acks (see tick); nothing awaited before
        try:
            futures = [
                f
                for q, group in groups.items()
                for f in await write_in_partition(self.ledger_table, q, group.writes())
            ]
            await flush(self.app, futures)
        finally:
            self.unflushed = set()
        exported = [ledger for group in groups.values() for ledger in group.exported]
        applied = sum(group.applied for group in groups.values())
        for ledger in exported:  # their day records are durable now
            ledger.settle()
        metrics.DELTAS.labels(stage="applied").inc(applied)
        now = time.time()
        for scope, (partition, offset) in touched.items():
            self.dirty[scope] = self.sources[scope] = source_at(partition, offset)
            self._due_at_hold_expiry(scope, ledgers[scope], now)
        budgets = self.registry.budgets
        await self._publish([(scope, self.sources[scope]) for scope in touched if scope in budgets], now)


#: Exit status of a worker whose batch failed (``run_batch``).
EXIT_BATCH_FAILED = 70


async def run_batch(
    stage: str, process: Callable[[Sequence[faust.EventT]], Awaitable[None]], events: Sequence[faust.EventT]
) -> None:
    """``await process(events)``; if it raises, end the process at once (status 70).

    Why: Faust's ``take_events`` acknowledges a batch in a ``finally`` when the generator is
    closed, and it is closed when the agent body raises: Faust then restarts the agent and the
    failed batch's offsets are committed with the next commit, so its events are never counted
    (measured: a batch that raised had its 5 offsets committed; FAUST-NOTES.md). A batch fails
    when a write cannot be made durable (a producer batch expired without a leader, a
    non-retriable send error). Exiting with ``os._exit`` runs no ``finally``, ack or commit:
    the group (this process restarted by its supervisor, or the other workers) re-reads the
    batch from the committed offsets, and stage A and stage B are idempotent on replay.
    """
    try:
        await process(events)
    except asyncio.CancelledError:
        raise
    except Exception:
        offsets: dict[int, list[int]] = {}
        for event in events:
            offsets.setdefault(event.message.partition, []).append(event.message.offset)
        log.critical(
            "%s: a batch failed (partition: first..last offset %s); exiting without acknowledging it, "
            "so it is read again from the committed offsets",
            stage,
            {p: f"{min(o)}..{max(o)}" for p, o in sorted(offsets.items())},
            exc_info=True,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_BATCH_FAILED)


def build(settings: Settings) -> tuple[faust.App, Worker]:
    app = make_app(settings)
    worker = Worker(settings, app)

    @app.agent(worker.usage, name="ingest")
    async def ingest(stream: faust.StreamT) -> None:
        await worker.config_ready.wait()
        async for events in stream.take_events(INGEST_BATCH, within=INGEST_WITHIN_S):  # type: ignore[attr-defined]
            started = time.perf_counter()
            await run_batch("ingest", worker.ingest, events)
            metrics.BATCH_SECONDS.labels(stage="ingest").observe(time.perf_counter() - started)

    @app.agent(worker.deltas, name="aggregate")
    async def aggregate(stream: faust.StreamT) -> None:
        async for events in stream.take_events(AGGREGATE_BATCH, within=AGGREGATE_WITHIN_S):  # type: ignore[attr-defined]
            started = time.perf_counter()
            await run_batch("aggregate", worker.aggregate, events)
            metrics.BATCH_SECONDS.labels(stage="aggregate").observe(time.perf_counter() - started)

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        # aiohttp refuses a charset inside content_type; Prometheus reads the text format anyway.
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.timer(settings.state_interval_ms / 1000)
    async def tick() -> None:
        await worker.tick()

    return app, worker
