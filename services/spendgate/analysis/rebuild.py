"""Rebuild spend from ``spend.usage`` records with the worker's own accounting code."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from spendgate.accounting.ingest import RawRecord, plan_batch
from spendgate.accounting.ledgers import apply_deltas
from spendgate.accounting.seen import SeenIds, plan_with_seen
from spendgate.accounting.usage import parse_usage
from spendgate.domain.attribution import scopes_for
from spendgate.domain.budgets import Budget, parse_budget
from spendgate.domain.holds import MEMORY_S, HoldBook
from spendgate.domain.ledger import ScopeLedger
from spendgate.domain.registry import RegistryView

ScopeMatch = Callable[[str], bool]


def scope_matcher(pattern: str | None) -> ScopeMatch:
    """``fnmatch`` (case-sensitive) on the scope text; ``None`` matches every scope."""
    if not pattern:
        return lambda _scope: True
    return lambda scope: fnmatch.fnmatchcase(scope, pattern)


def parse_budget_file(raw: object) -> dict[str, Budget]:
    """``{scope: {limits, tz}}`` -> budgets; raises ``ValueError`` naming the scope at fault.

    A scope with ``null`` or ``[]`` limits has no budget (it is left out).
    """
    if not isinstance(raw, Mapping):
        raise ValueError("the budgets file must map scope -> {limits, tz}")
    out: dict[str, Budget] = {}
    for scope, body in raw.items():
        if not isinstance(scope, str) or ":" not in scope:
            raise ValueError(f"{scope!r} is not a scope (kind:id)")
        try:
            budget = parse_budget(body)
        except Exception as exc:  # InvalidInput, or anything parse_budget refuses
            raise ValueError(f"{scope}: {exc}") from None
        if not budget.is_unlimited:
            out[scope] = budget
    return out


# ------------------------------------------------------------------------------ rebuild


@dataclass(frozen=True, slots=True)
class Charge:
    """One counted event that charges at least one budgeted scope (for the simulation)."""

    at: float  # occurred_at, epoch seconds
    partition: int
    offset: int
    event_id: str
    nanos: int
    scopes: tuple[str, ...]  # its budgeted scopes only


@dataclass
class Rebuild:
    """Feed record batches with :meth:`feed`; read ``ledgers``, ``charges`` and the counters.

    ``start``/``end`` (epoch seconds, ``end`` exclusive) keep only events whose ``occurred_at``
    is inside; every record is still deduplicated, so a retry inside the range of an event
    first seen before it stays a duplicate, as in the live run.
    """

    registry: RegistryView
    topic: str = "spend.usage"
    budgets: Mapping[str, Budget] = field(default_factory=dict)
    start: float | None = None
    end: float | None = None
    horizon_s: float = float("inf")  # the worker's dedupe horizon; infinite: never forget an id
    seen: SeenIds = field(init=False)
    holds: HoldBook = field(init=False)
    ledgers: dict[str, ScopeLedger] = field(default_factory=dict)
    charges: list[Charge] = field(default_factory=list)
    positions: dict[int, int] = field(default_factory=dict)  # partition -> next offset
    records: int = 0
    events: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    out_of_range: int = 0

    def __post_init__(self) -> None:
        self.seen = SeenIds(self.horizon_s)
        self.holds = HoldBook(MEMORY_S)

    @property
    def filtered(self) -> bool:
        return self.start is not None or self.end is not None

    def feed(self, records: Sequence[RawRecord]) -> None:
        """Apply a batch (any partitions, offset order within each, after every earlier batch)."""
        if not records:
            return
        clock: dict[int, float] = {}  # partition -> latest record timestamp in this batch
        for record in records:
            if record.timestamp is not None:
                clock[record.partition] = max(record.timestamp, clock.get(record.partition, 0.0))
        plan, _ = plan_with_seen(
            self.seen,
            records,
            now=clock,
            progress={},
            registry=self.registry,
            topic=self.topic,
            holds=self.holds,
        )
        self.records += len(records)
        self.duplicates += plan.duplicates
        self.dead_letters += len(plan.dead_letters)
        for record in records:
            self.positions[record.partition] = max(self.positions.get(record.partition, 0), record.offset + 1)
        if not (self.budgets or self.filtered):
            self.events += plan.events
            apply_deltas(self.ledgers, plan.deltas)
            return
        dead = {(r.partition, r.offset) for r, _ in plan.dead_letters}
        kept: list[RawRecord] = []
        for record in records:
            if (record.partition, record.offset) in dead:
                continue
            event = parse_usage(record.value)  # valid: plan_batch accepted it
            if plan.seen_new.get(event.event_id) != (record.partition, record.offset):
                continue  # a duplicate
            at = event.occurred_at.timestamp()
            if (self.start is not None and at < self.start) or (self.end is not None and at >= self.end):
                self.out_of_range += 1
                continue
            kept.append(record)
            nanos = event.charge_nanos
            if nanos and self.budgets:
                budgeted = tuple(s for s in scopes_for(event, self.registry) if s in self.budgets)
                if budgeted:
                    self.charges.append(
                        Charge(at, record.partition, record.offset, event.event_id, nanos, budgeted)
                    )
        if not self.filtered:
            self.events += plan.events
            apply_deltas(self.ledgers, plan.deltas)
            return
        # Every kept record is new and unique: a second plan of just those gives their deltas.
        again = plan_batch(kept, seen=lambda _id: None, progress={}, registry=self.registry, topic=self.topic)
        self.events += again.events
        apply_deltas(self.ledgers, again.deltas)


def rebuild(
    batches: Iterable[Sequence[RawRecord]],
    registry: RegistryView,
    *,
    budgets: Mapping[str, Budget] | None = None,
    start: float | None = None,
    end: float | None = None,
    topic: str = "spend.usage",
    horizon_s: float = float("inf"),
) -> Rebuild:
    """Rebuild from record batches (each in offset order per partition). Pure."""
    state = Rebuild(registry, topic, budgets or {}, start, end, horizon_s)
    for batch in batches:
        state.feed(batch)
    return state


# --------------------------------------------------------------------------- simulation
