"""Replay analysis, pure: rebuild spend from ``spend.usage`` records, find the moments each
budgeted scope was (or would have been) blocked, back-test budgets, diff against live state.

Nothing here touches Kafka; ``spendgate.replay`` reads the topics and feeds this module.

Identical to the live worker by construction, not by imitation:

1. Records go through the worker's own :func:`~spendgate.accounting.ingest.plan_batch` (validation,
   dead letters, dedupe by ``event_id`` -- first occurrence wins -- attribution, minute
   buckets), fed in offset order within each partition, with the worker's own ``SeenIds``
   index. Its clock is the records' broker timestamps, so an id is forgotten
   ``horizon_s`` after it was appended, where the worker forgets it that long after processing
   it (the same moment give or take the worker's lag).
2. Its deltas are applied to :class:`~spendgate.domain.ledger.ScopeLedger` objects by stage B's
   own :func:`~spendgate.accounting.ledgers.apply_deltas`, so totals and window sums are
   computed by the same code that feeds ``spend.state``. Cross-partition
   interleaving does not change any sum.
3. Blocked/unblocked moments come from :func:`~spendgate.domain.decide.decide` evaluated after
   every charged event in event-time (``occurred_at``) order, and at every window reset.

Known, documented differences with a live run (see README "For analysts"): attribution uses
the registry *as of now* (the worker used the registry as of processing time), budgets are the
current ones (or a ``--budgets`` file) for the whole history, and event ids are remembered for
the whole replay (the worker forgets them after ``SPENDGATE_DEDUPE_HORIZON_H``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from spendgate.accounting.ingest import RawRecord, plan_batch
from spendgate.accounting.ledgers import apply_deltas
from spendgate.accounting.seen import SeenIds, plan_with_seen
from spendgate.accounting.usage import parse_usage
from spendgate.domain.attribution import scopes_for
from spendgate.domain.budgets import NO_BUDGET, Budget, parse_budget
from spendgate.domain.decide import ScopeStatus, decide
from spendgate.domain.holds import MEMORY_S, HoldBook
from spendgate.domain.ledger import ScopeLedger, WindowSpend
from spendgate.domain.money import format_usd, parse_usd
from spendgate.domain.registry import RegistryView
from spendgate.domain.windows import WindowSpec, window_bounds

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


@dataclass(frozen=True, slots=True)
class BlockPeriod:
    """The scope was blocked from ``start`` (the event that crossed) until ``until`` (a reset).

    ``until`` is ``None`` when it was still blocked at the end of the replay.
    """

    start: float
    until: float | None
    windows: tuple[str, ...]  # windows that bound at ``start``
    event_id: str


@dataclass(frozen=True, slots=True)
class OverLimit:
    """A call at or over the limit: the one that crossed it (``prevented=False``: it was
    allowed, the gate checks before a call) or one made while blocked (it would have been
    denied)."""

    event_id: str
    at: float
    nanos: int
    partition: int
    offset: int
    prevented: bool


@dataclass
class Timeline:
    blocked: list[BlockPeriod] = field(default_factory=list)
    over_limit: list[OverLimit] = field(default_factory=list)

    @property
    def prevented_nanos(self) -> int:
        return sum(o.nanos for o in self.over_limit if o.prevented)


class _Counters:
    """Window spends of one scope as time moves forward only (the simulation's SpendSource)."""

    __slots__ = ("total", "windows")

    def __init__(self) -> None:
        self.total = 0
        self.windows: dict[tuple[WindowSpec, str], list[int]] = {}

    def _window(self, spec: WindowSpec, tz: ZoneInfo, now: int) -> list[int]:
        key = (spec, tz.key)
        w = self.windows.get(key)
        if w is None or not w[0] <= now < w[1]:  # time only moves forward: a new window is empty
            start, end = window_bounds(spec, now, tz)
            w = self.windows[key] = [start, end, 0]
        return w

    def spend(self, spec: WindowSpec, tz: ZoneInfo, now: int) -> WindowSpend:
        if spec.is_total:
            return WindowSpend(None, None, self.total)
        w = self._window(spec, tz, now)
        return WindowSpend(w[0], w[1], w[2])

    def add(self, budget: Budget, now: int, nanos: int) -> None:
        self.total += nanos
        zone = budget.zone
        for limit in budget.limits:
            if not limit.window.is_total:
                self._window(limit.window, zone, now)[2] += nanos


@dataclass
class _ScopeSim:
    budget: Budget
    counters: _Counters = field(default_factory=_Counters)
    status: ScopeStatus | None = None
    open: BlockPeriod | None = None
    timeline: Timeline = field(default_factory=Timeline)

    @property
    def blocked(self) -> bool:
        return self.open is not None

    def advance(self, now: float) -> None:
        """Let windows that bind reset up to ``now``: record the unblock at the reset time."""
        while self.open is not None and self.status is not None:
            resets = [w.resets_at for w in self.status.binding if w.resets_at is not None]
            if not resets or min(resets) > now:
                return
            at = min(resets)
            self.status = decide(self.budget, self.counters, at)
            if not self.status.blocked:
                self.timeline.blocked.append(
                    BlockPeriod(self.open.start, at, self.open.windows, self.open.event_id)
                )
                self.open = None

    def charge(self, c: Charge) -> None:
        now = int(c.at)
        self.counters.add(self.budget, now, c.nanos)
        self.status = decide(self.budget, self.counters, now)
        if self.open is None and self.status.blocked:
            self.open = BlockPeriod(c.at, None, tuple(w.window for w in self.status.binding), c.event_id)
            self.timeline.over_limit.append(
                OverLimit(c.event_id, c.at, c.nanos, c.partition, c.offset, False)
            )

    def deny(self, c: Charge) -> None:
        self.timeline.over_limit.append(OverLimit(c.event_id, c.at, c.nanos, c.partition, c.offset, True))

    def finish(self) -> Timeline:
        if self.open is not None:
            self.timeline.blocked.append(self.open)
            self.open = None
        return self.timeline


def simulate(
    charges: Iterable[Charge], budgets: Mapping[str, Budget], *, end: float, what_if: bool
) -> dict[str, Timeline]:
    """Block/unblock moments and over-limit calls of every budgeted scope, in event-time order.

    - ``what_if=False`` (the live budgets): every event counts, as it did in the live run; an
      event charged while its scope was blocked is listed with ``prevented=True`` (the gate
      should have denied it) but still adds to spend.
    - ``what_if=True`` (a budgets file): an event is denied, and charges nothing anywhere, when
      any budgeted scope it touches is blocked at its ``occurred_at`` (the gate allows a call
      only if no scope of its set is blocked); it is listed under every scope that blocked it.

    A period ends at the reset of the windows that bound; ``end`` (epoch seconds) is when the
    replay stops looking. Ties in ``occurred_at`` are broken by (partition, offset).
    """
    sims: dict[str, _ScopeSim] = {}

    def sim(scope: str) -> _ScopeSim:
        s = sims.get(scope)
        if s is None:
            s = sims[scope] = _ScopeSim(budgets.get(scope, NO_BUDGET))
        return s

    for c in sorted(charges, key=lambda c: (c.at, c.partition, c.offset)):
        touched = [sim(scope) for scope in c.scopes if scope in budgets]
        for s in touched:
            s.advance(c.at)
        if what_if:
            blocking = [s for s in touched if s.blocked]
            if blocking:
                for s in blocking:
                    s.deny(c)
                continue
            for s in touched:
                s.charge(c)
        else:
            for s in touched:
                if s.blocked:
                    s.deny(c)
                    s.counters.add(s.budget, int(c.at), c.nanos)
                    s.status = decide(s.budget, s.counters, int(c.at))
                else:
                    s.charge(c)
    for s in sims.values():
        s.advance(end)
    return {scope: s.finish() for scope, s in sims.items()}


# ------------------------------------------------------------------------------- report


@dataclass(frozen=True, slots=True)
class ScopeReport:
    scope: str
    budget: Budget | None
    status: ScopeStatus  # windows at the reference time, from the rebuilt ledger
    timeline: Timeline
    reserved: int = 0  # nanos held by outstanding holds at the reference time (event-time expiry)


def report(
    state: Rebuild, budgets: Mapping[str, Budget], *, at: int, what_if: bool, match: ScopeMatch
) -> list[ScopeReport]:
    """Every matching scope that has spend or a budget, sorted by scope text."""
    scopes = sorted(s for s in set(state.ledgers) | set(budgets) if match(s))
    # A what-if denial depends on every budgeted scope of the call; live-budget scopes are
    # independent, so only the ones shown need simulating.
    simulated = budgets if what_if else {s: b for s, b in budgets.items() if match(s)}
    timelines = simulate(state.charges, simulated, end=at, what_if=what_if)
    out = []
    for scope in scopes:
        budget = budgets.get(scope)
        ledger = state.ledgers.get(scope) or ScopeLedger()
        status = decide(budget or NO_BUDGET, ledger, at)
        reserved = ledger.reserved(at * 1000)
        out.append(ScopeReport(scope, budget, status, timelines.get(scope) or Timeline(), reserved))
    return out


# --------------------------------------------------------------------------------- diff


@dataclass(frozen=True, slots=True)
class Difference:
    scope: str
    window: str
    live: str | None  # decimal string; None when live state has no record for the scope
    rebuilt: str

    def __str__(self) -> str:
        live = "missing" if self.live is None else self.live
        return f"{self.scope} {self.window}: live {live}, rebuilt {self.rebuilt}"


def _epoch(text: str | None) -> int | None:
    if text is None:
        return None
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).timestamp())


def diff_live(
    ledgers: Mapping[str, ScopeLedger], live: Mapping[str, Mapping[str, object] | None], match: ScopeMatch
) -> list[Difference]:
    """Compare the rebuilt spend with the latest ``spend.state`` record of every scope.

    For each live record: its ``total`` and every window it lists (summed over the record's own
    ``[start, resets_at)``, so the budget or time zone it was computed with does not matter),
    and ``reserved_usd`` (the rebuilt holds at the record's ``as_of``: expiry is event time, so
    the same log says the same thing about the same instant; window ``reserved:<window>``).
    A rebuilt scope with spend but no live record is a difference too. Sorted by scope.
    """
    out: list[Difference] = []
    for scope in sorted(set(ledgers) | {s for s, v in live.items() if v is not None}):
        if not match(scope):
            continue
        ledger = ledgers.get(scope) or ScopeLedger()
        record = live.get(scope)
        if record is None:
            if ledger.total:
                out.append(Difference(scope, "total", None, format_usd(ledger.total)))
            continue
        windows = record.get("windows") or []
        assert isinstance(windows, list)
        for w in windows:
            name = str(w["window"])
            if name == "total":
                rebuilt = ledger.total
            else:
                start, end = _epoch(w.get("start")), _epoch(w.get("resets_at"))
                if start is None or end is None:
                    continue
                rebuilt = ledger.sum_between(start, end)
            live_nanos = parse_usd(w["spend_usd"])
            if live_nanos != rebuilt:
                out.append(Difference(scope, name, format_usd(live_nanos), format_usd(rebuilt)))
            if "reserved_usd" in w:
                as_of = datetime.fromisoformat(str(record["as_of"]).replace("Z", "+00:00")).timestamp()
                held = ledger.reserved(int(as_of * 1000))
                live_held = parse_usd(w["reserved_usd"])
                if live_held != held:
                    out.append(Difference(scope, f"reserved:{name}", format_usd(live_held), format_usd(held)))
    return out


def iso_ms(instant: float | None) -> str | None:
    """Epoch seconds as RFC 3339 UTC with milliseconds when it has any."""
    if instant is None:
        return None
    moment = datetime.fromtimestamp(instant, UTC)
    text = moment.isoformat(timespec="milliseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")
