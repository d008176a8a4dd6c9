"""When each budgeted scope was (or would have been) blocked, in event-time order."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from spendgate.analysis.rebuild import Charge
from spendgate.domain.budgets import NO_BUDGET, Budget
from spendgate.domain.decide import ScopeStatus, decide
from spendgate.domain.ledger import WindowSpend
from spendgate.domain.windows import WindowSpec, window_bounds


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
