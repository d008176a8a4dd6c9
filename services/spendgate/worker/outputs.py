"""The worker's outputs: decisions, alerts and coalesced ``spend.state``, and the timer tick.

A mixin of :class:`spendgate.worker.app.Worker` (kept apart so each file stays readable): it reads
the worker's ledgers, registry and bookkeeping, computes records with ``accounting.publish`` and
hands them to the producer. Every record is computed from durable ledger state and only for
partitions this worker may publish about (``Worker.publishable``); see ``tick``.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import faust

from spendgate.accounting.ledgers import partition_of
from spendgate.accounting.publish import Publisher, state_json
from spendgate.domain import holds as hold_ops
from spendgate.domain.decide import decide
from spendgate.domain.ledger import ScopeLedger
from spendgate.domain.registry import RegistryView
from spendgate.records import Source, source_at
from spendgate.settings import Settings
from spendgate.worker import metrics
from spendgate.worker.partitions import partitions_ready
from spendgate.worker.sends import flush, send_batches
from spendgate.worker.takeover import takeover_chunk


class Outputs:
    """What ``Worker`` provides to the methods below (declared for the type checker)."""

    settings: Settings
    app: faust.App
    registry: RegistryView
    config_ready: asyncio.Event
    publisher: Publisher
    ledgers: dict[str, ScopeLedger]
    backlog: dict[str, None]
    unflushed: set[str]
    publishing: asyncio.Lock
    dirty: dict[str, Source | None]
    sources: dict[str, Source]
    due: list[tuple[float, str]]
    hold_due: dict[str, float]
    outputs: dict[str, faust.TopicT]
    deltas: faust.TopicT

    if TYPE_CHECKING:

        def _ledger(self, scope: str) -> ScopeLedger: ...
        def _owns(self, scope: str, partitions: frozenset[int]) -> bool: ...
        def ensure_ledgers(self, *, recovered: bool = False) -> None: ...
        def publishable(self) -> frozenset[int]: ...

    def _due_at_hold_expiry(self, scope: str, ledger: ScopeLedger, now: float) -> None:
        """Queue the scope for its next hold expiry, so its state (``reserved_usd``) and its
        decision are published again the moment a hold stops counting."""
        if not ledger.hot.holds:
            return
        following, _ = hold_ops.expiry(ledger.hot.holds, int(now * 1000))
        if following is None:
            self.hold_due.pop(scope, None)
            ledger.hot.holds.clear()  # all expired: they never count again (written with the next delta)
            return
        at = following / 1000 + 0.05
        if self.hold_due.get(scope) != at:
            self.hold_due[scope] = at
            heapq.heappush(self.due, (at, scope))

    def _holds_of(self, scope: str, ledger: ScopeLedger, now: float) -> tuple[int, float | None]:
        """What the scope's holds reserve at ``now`` and when the last of them expires."""
        if not ledger.hot.holds:
            return 0, None
        now_ms = int(now * 1000)
        _, last = hold_ops.expiry(ledger.hot.holds, now_ms)
        return ledger.reserved(now_ms), None if last is None else last / 1000

    def _source(self, scope: str) -> Source | None:
        """What a record about ``scope`` reflects: its last delta, else what its ledger has seen."""
        source = self.sources.get(scope)
        marks = self._ledger(scope).hot.watermarks if source is None else None
        if marks:
            partition, offset = max(marks.items(), key=lambda item: item[1])
            source = self.sources[scope] = source_at(partition, offset)
        return source

    def _evaluate(
        self, scopes: Iterable[tuple[str, Source | None]], now: float, owned: frozenset[int]
    ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
        """Decide the owned ``scopes``; the decisions and alerts that must go out. No I/O."""
        decisions, alerts = [], []
        for scope, given in scopes:
            if not self._owns(scope, owned):
                continue
            source = given or self._source(scope)
            ledger = self._ledger(scope)
            out = self.publisher.evaluate(
                scope, self.registry.budget(scope), ledger, now, source, ledger.hot.watermarks
            )
            if out.decision is not None:
                decisions.append((scope.encode(), out.decision.model_dump_json().encode()))
                metrics.DECISIONS.labels(blocked=str(out.decision.blocked).lower()).inc()
                self.dirty.setdefault(scope, source)
            alerts += [(scope.encode(), alert.model_dump_json().encode()) for alert in out.alerts]
            if out.status is not None and out.status.next_change_at is not None:
                heapq.heappush(self.due, (out.status.next_change_at + 0.05, scope))
        return decisions, alerts

    async def _publish(self, scopes: Sequence[tuple[str, Source | None]], now: float) -> None:
        """Decide ``scopes`` and send what changed: one round trip for all of them.

        During a rebalance nothing is decided: the scopes are due again, and the next
        generation decides them if this worker still owns them (``_rebuild_ledgers``).
        """
        if not scopes:
            return
        async with self.publishing:
            owned = self.publishable()
            if not owned:
                for scope, _ in scopes:
                    heapq.heappush(self.due, (now, scope))
                return
            decisions, alerts = self._evaluate(scopes, now, owned)
            futures = await self._enqueue_keyed(self.outputs["decisions"], decisions)
            futures += await self._enqueue_keyed(self.outputs["alerts"], alerts)
        await flush(self.app, futures)

    # ---- timers ---------------------------------------------------------------------------

    async def tick(self) -> None:
        """Re-decide due scopes (window resets, budget changes) and flush coalesced state, then
        the next chunk of a generation's takeover republish (``worker.takeover``).

        Every record is computed from durable ledger state: a scope of the aggregate batch
        whose changelog writes are in flight (``unflushed``) waits for the next tick, so a
        state record never shows spend a crash could still lose and the next owner, recovering
        from the changelog, never publishes less than this one did. Computing and handing the
        records to the producer happen under ``publishing``, for owned partitions only
        (``publishable``), so decisions of one scope reach the topic in ``seq`` order.
        """
        if not self.config_ready.is_set() or not partitions_ready(self.app, self.deltas):
            return
        async with self.publishing:
            self.ensure_ledgers()
            owned = self.publishable()
            if not owned:
                return
            now = time.time()
            unflushed = self.unflushed
            due: dict[str, None] = {}
            later = []
            while self.due and self.due[0][0] <= now:
                _, scope = heapq.heappop(self.due)
                if scope in unflushed:
                    later.append(scope)
                elif self._owns(scope, owned):
                    due[scope] = None
            for scope in later:
                heapq.heappush(self.due, (now + 0.05, scope))
            decisions, alerts = self._evaluate(due.items(), now, owned)
            for scope in due:
                self.dirty.setdefault(scope, None)
            dirty, self.dirty = self.dirty, {}
            dirty.update(dict.fromkeys(takeover_chunk(self.backlog, dirty, unflushed)))
            records = self._state_records(dirty, unflushed, owned, now)
            futures = await self._enqueue_keyed(self.outputs["decisions"], decisions)
            futures += await self._enqueue_keyed(self.outputs["alerts"], alerts)
            futures += await self._enqueue_keyed(self.outputs["state"], records)
        await flush(self.app, futures)
        metrics.STATE_RECORDS.inc(len(records))

    def _state_records(
        self, dirty: dict[str, Source | None], unflushed: set[str], owned: frozenset[int], now: float
    ) -> list[tuple[bytes, bytes]]:
        """The ``spend.state`` records of the ``dirty`` scopes; a scope with writes in flight
        stays dirty for the next tick. No I/O."""
        records = []
        for scope, source in dirty.items():
            if scope in unflushed:
                self.dirty[scope] = source  # the next tick, once its writes are acked
                continue
            if not self._owns(scope, owned):
                continue  # its partition left: the new owner publishes it
            ledger = self._ledger(scope)
            status = decide(self.registry.budget(scope), ledger, int(now))
            held, until = self._holds_of(scope, ledger, now)
            self._due_at_hold_expiry(scope, ledger, now)
            watermarks = ledger.hot.watermarks
            record = state_json(scope, status, now, source or self._source(scope), watermarks, held, until)
            records.append((scope.encode(), record))
        return records

    async def _enqueue_keyed(
        self, topic: faust.TopicT, records: list[tuple[bytes, bytes]]
    ) -> list[asyncio.Future]:
        """Hand keyed records to the producer in per-partition batches (the default
        partitioner's partitions); returns the futures of their acks."""
        by_partition: dict[int, list[tuple[bytes | None, bytes | None]]] = {}
        for key, value in records:
            by_partition.setdefault(partition_of(key.decode(), self.settings.partitions), []).append(
                (key, value)
            )
        name = topic.get_topic_name()
        return [f for p, rs in by_partition.items() for f in await send_batches(self.app, name, p, rs)]
