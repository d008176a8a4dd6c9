"""Spend over time, top spenders and the budget overview: the dashboard's data (issue 17), pure.

Where the history comes from (the design, CONTRACT §4 "Dashboard data"): the API already follows
the compacted ``spend.state`` topic. Every accepted state record carries the scope's lifetime
``total``; :class:`SpendHistory` charges the increase of that total since the scope's previous
record to the UTC hour and UTC day of the record's ``as_of`` (when the worker published it). So a
bucket is "spend that became visible in that hour": for live traffic that is the hour the calls
ran (state is coalesced every 100 ms), an event delivered late counts in the hour it arrived,
and the buckets of a scope always add up exactly to the increase of its total.

The history is a pure function of the ``spend.state`` log the API reads: an API that restarts
rebuilds the same buckets from whatever the topic still holds. A compacted topic keeps at least
the latest record per scope, so spend before the oldest retained record of a scope counts in
that record's hour (written down in the README). ``spend.decisions`` gives blocked periods the
same way (block start and end = the decision records' ``as_of``).

Bounded: hourly buckets for ``hours_kept`` hours (48), daily buckets for ``days_kept`` days
(90), ``periods_kept`` blocked periods (20) per scope, counted back from the newest ``as_of``
seen, never from the wall clock, so the same log always gives the same answer.

Nothing here does I/O; ``now`` is always passed in.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from spendgate.domain.gate_state import CompiledBudget, GateState
from spendgate.domain.money import Nanos

HOUR = 3600
DAY = 86_400
BUCKETS = {"1h": HOUR, "1d": DAY}
#: top-N windows: how far back each reaches, in UTC hours or days counted from ``now``'s bucket
TOP_WINDOWS = ("1h", "1d", "7d", "30d", "90d", "total")
MAX_POINTS = 2_200  # 90 days of hours (2,160) + a little: a longer range is refused


class ScopeHistory:
    """One scope's buckets: epoch hour -> nanos, epoch day -> nanos, blocked periods."""

    __slots__ = ("total", "hours", "days", "periods")

    def __init__(self) -> None:
        self.total: Nanos = 0
        self.hours: dict[int, Nanos] = {}
        self.days: dict[int, Nanos] = {}
        self.periods: list[list[float | None]] = []  # [start, end | None (still blocked)]


@dataclass
class SpendHistory:
    """Per-scope spend buckets and blocked periods, fed from ``spend.state``/``spend.decisions``.

    Not thread-safe: the follower's event loop applies, the routes read (like ``GateState``).
    Every ``apply_*`` is O(1) amortized and idempotent for a repeated record (same total, same
    blocked flag: nothing changes).
    """

    hours_kept: int = 48
    days_kept: int = 90
    periods_kept: int = 20
    scopes: dict[str, ScopeHistory] = field(default_factory=dict)
    by_kind: dict[str, set[str]] = field(default_factory=dict)
    newest: float = 0.0  # the newest as_of applied (epoch s)

    def _get(self, scope: str) -> ScopeHistory:
        held = self.scopes.get(scope)
        if held is None:
            held = self.scopes[scope] = ScopeHistory()
            kind = scope.partition(":")[0]
            same_kind = self.by_kind.get(kind)
            if same_kind is None:
                same_kind = self.by_kind[kind] = set()
            same_kind.add(scope)
        return held

    def apply_state(self, scope: str, as_of: float, total: Nanos) -> None:
        """A state record was accepted: charge ``total - previous total`` to ``as_of``'s buckets.

        A lower total (never in a correct log: the total only grows) moves the baseline
        without charging anything.
        """
        held = self._get(scope)
        delta = total - held.total
        held.total = total
        if as_of > self.newest:
            self.newest = as_of
        if delta <= 0:
            return
        hour, day = int(as_of // HOUR), int(as_of // DAY)
        hours = held.hours
        if hour not in hours:
            floor = int(self.newest // HOUR) - self.hours_kept
            for old in [h for h in hours if h <= floor]:
                del hours[old]
        hours[hour] = hours.get(hour, 0) + delta
        days = held.days
        if day not in days:
            floor = int(self.newest // DAY) - self.days_kept
            for old in [d for d in days if d <= floor]:
                del days[old]
        days[day] = days.get(day, 0) + delta

    def apply_decision(self, scope: str, as_of: float, blocked: bool) -> None:
        """A decision record was accepted: open or close the scope's current blocked period."""
        held = self.scopes.get(scope)
        if held is None:
            if not blocked:
                return
            held = self._get(scope)
        periods = held.periods
        open_period = bool(periods) and periods[-1][1] is None
        if blocked and not open_period:
            periods.append([as_of, None])
            if len(periods) > self.periods_kept:
                del periods[0]
        elif not blocked and open_period:
            periods[-1][1] = as_of

    # --- read -----------------------------------------------------------------------------

    def series(self, scope: str, bucket: str, start: int, end: int) -> list[tuple[int, Nanos]]:
        """``(bucket start, nanos)`` for every ``bucket`` (``1h``/``1d``) in ``[start, end)``,
        zeros included; ``start`` and ``end`` are aligned down/up to the bucket."""
        size = BUCKETS[bucket]
        held = self.scopes.get(scope)
        source = {} if held is None else (held.hours if size == HOUR else held.days)
        first, last = start // size, -(-end // size)
        return [(b * size, source.get(b, 0)) for b in range(first, last)]

    def spend_between(self, scope: str, start: int, end: int) -> Nanos:
        """Spend of ``scope`` in ``[start, end)``: hours when both ends are on hour boundaries
        and the range is within the hourly retention, else whole UTC days."""
        held = self.scopes.get(scope)
        if held is None:
            return 0
        return _sum_range(held, start, end)

    def blocked_periods(self, scope: str, start: float, end: float) -> list[tuple[float, float | None]]:
        held = self.scopes.get(scope)
        if held is None:
            return []
        return [
            (float(s), e)  # type: ignore[arg-type]
            for s, e in held.periods
            if s is not None and s < end and (e is None or e > start)
        ]

    def top(
        self,
        kind: str,
        window: str,
        now: float,
        limit: int,
        visible: Callable[[str], bool] | None = None,
        among: Iterable[str] | None = None,
    ) -> tuple[int | None, list[tuple[str, Nanos]]]:
        """The ``limit`` scopes of ``kind`` that spent most in ``window`` (see :func:`window_bounds_of`),
        highest first, ties by scope name; only those ``visible`` says yes to; zero spend left out.
        ``among``: only these scopes (of ``kind``; a slice, for a caller that yields between slices).
        Returns (window start or None for ``total``, items)."""
        bounds = window_bounds_of(window, now)
        scopes: Iterable[str] = tuple(self.by_kind.get(kind, ())) if among is None else among
        if visible is not None:
            scopes = (s for s in scopes if visible(s))
        held = self.scopes
        if bounds is None:
            pairs: Iterator[tuple[str, Nanos]] = ((s, held[s].total) for s in scopes)
        else:
            start, end = bounds
            pairs = ((s, _sum_range(held[s], start, end)) for s in scopes)
        best = heapq.nsmallest(limit, ((-n, s) for s, n in pairs if n > 0))
        return (None if bounds is None else bounds[0]), [(s, -n) for n, s in best]


def _sum_range(held: ScopeHistory, start: int, end: int) -> Nanos:
    # tuple(d.items()) is one C call (atomic under the GIL): safe while the loop thread applies
    if start % DAY == 0 and end % DAY == 0:
        first, last, buckets = start // DAY, end // DAY, held.days
    else:
        first, last, buckets = start // HOUR, end // HOUR, held.hours
    if last - first == 1:  # one bucket (this hour, today): the common case of top-N
        return buckets.get(first, 0)
    return sum(n for b, n in tuple(buckets.items()) if first <= b < last)


def window_bounds_of(window: str, now: float) -> tuple[int, int] | None:
    """``[start, end)`` of a top-N ``window``: ``1h`` the current UTC hour, ``1d`` the current UTC
    day, ``7d``/``30d``/``90d`` that many UTC days including today; ``total`` None (lifetime).
    Raises ``ValueError`` for another window."""
    if window == "total":
        return None
    if window == "1h":
        hour = int(now // HOUR) * HOUR
        return hour, hour + HOUR
    if window in ("1d", "7d", "30d", "90d"):
        today = int(now // DAY)
        return (today - int(window[:-1]) + 1) * DAY, (today + 1) * DAY
    raise ValueError(f"window must be one of {', '.join(TOP_WINDOWS)}")


# --- the overview: every budgeted scope, most urgent first ------------------------------------


class OverviewRow(NamedTuple):
    order: tuple[int, float, int, str]  # first, so rows sort natively: see _urgency
    scope: str
    blocked: bool
    resets_at: str | None  # when a blocked scope unblocks (the latest resets_at of its block)
    resets_at_s: float | None
    ratio_ppm: int  # spend / limit of its most used window, in millionths (sort key)
    window: str | None  # that window
    spend: Nanos
    limit: Nanos | None
    soft_crossed: bool  # some window's spend >= its soft limit


def overview_row(state: GateState, scope: str, budget: CompiledBudget, now: float) -> OverviewRow:
    """One budgeted scope's line of the overview: its most used window, blocked or not, soft."""
    held = state.states.get(scope)
    by_window = held.by_window if held is not None else None
    reserved = state.held(scope, now)  # holds count in every window, as a check counts them
    best: tuple[int, str | None, Nanos, Nanos | None] = (-1, None, 0, None)
    soft = held_full = False
    for lim in budget.limits:
        spend = 0
        if by_window is not None:
            entry = by_window.get(lim.window)
            if entry is not None:
                w_start, w_resets, w_spend = entry
                if (w_resets is None) or ((w_start is None or w_start <= now) and now < w_resets):
                    spend = w_spend
        cap = lim.max_nanos
        held_full = held_full or (reserved > 0 and spend + reserved >= cap)
        used = spend + reserved
        ratio = used * 1_000_000 // cap if cap > 0 else (10**12 if used > 0 else 1_000_000)
        if ratio > best[0]:
            best = (ratio, lim.window, spend, cap)
        if lim.soft_nanos is not None and spend >= lim.soft_nanos:
            soft = True
    decision = state.decisions.get(scope)
    blocked, resets, resets_text = False, None, None
    if decision is not None and decision.blocked:
        live = [w for w in decision.windows if w.resets_at is None or w.resets_at > now]
        if live:
            blocked = True
            finite = [w for w in live if w.resets_at is not None]
            if finite and len(finite) == len(live):
                last = max(finite, key=lambda w: w.resets_at or 0.0)
                resets, resets_text = last.resets_at, last.resets_at_text
    if not blocked and held_full:  # denied by holds alone: blocked until they end (no countdown)
        blocked = True
    ratio = max(best[0], 0)
    order = _urgency(scope, blocked, resets, ratio)
    return OverviewRow(order, scope, blocked, resets_text, resets, ratio, *best[1:], soft)


def overview_rows(
    state: GateState, now: float, budgets: Iterable[tuple[str, CompiledBudget]] | None = None
) -> list[OverviewRow]:
    """Every budgeted scope of ``state``: blocked first (soonest to unblock first), then by share of
    limit used, highest first, ties by scope. O(budgeted scopes x limits).

    ``budgets``: a snapshot (or a slice of one) of ``state.budgets.items()`` to walk instead, so a
    caller may compute in slices while records keep being applied (see :func:`merge_sorted`).
    """
    items = state.budgets.items() if budgets is None else budgets
    rows = [overview_row(state, scope, budget, now) for scope, budget in items]
    rows.sort()
    return rows


#: an overview line reduced to what orders, counts and filters it: (*order, soft_crossed)
OrderKey = tuple[int, float, int, str, bool]


def overview_order(
    state: GateState, now: float, budgets: Iterable[tuple[str, CompiledBudget]] | None = None
) -> list[OrderKey]:
    """Like :func:`overview_rows`, but each line reduced to its :data:`OrderKey` (``key[3]`` is the
    scope, ``key[0] == 0`` blocked, ``key[4]`` soft limit crossed): 5 atomic values, which the
    cyclic garbage collector stops tracking, instead of a row object per budgeted scope. A page
    then builds its 50 rows with :func:`overview_row`."""
    items = state.budgets.items() if budgets is None else budgets
    keys: list[OrderKey] = []
    for scope, budget in items:
        row = overview_row(state, scope, budget, now)
        keys.append((*row.order, row.soft_crossed))
    keys.sort()
    return keys


def _urgency(
    scope: str, blocked: bool, resets_at_s: float | None, ratio_ppm: int
) -> tuple[int, float, int, str]:
    """Blocked first, soonest to unblock first; then the highest share of limit; then by scope."""
    if blocked:
        return (0, resets_at_s if resets_at_s is not None else float("inf"), 0, scope)
    return (1, 0.0, -ratio_ppm, scope)


def merge_sorted(parts: list[list[Any]]) -> Iterator[Any]:
    """The lines of sorted ``parts`` (from :func:`overview_rows` or :func:`overview_order` over
    slices of the budgets) in overview order; lazy, so a caller can take it in slices."""
    return heapq.merge(*parts)


def page(items: list[Any], offset: int, limit: int) -> list[Any]:
    """``limit`` rows from ``offset`` (offset past the end: empty)."""
    return items[offset : offset + limit]


def percent(ratio_ppm: int) -> str:
    """Millionths as an exact percent string with up to 4 decimals (``875000`` -> ``"87.5"``)."""
    whole, frac = divmod(ratio_ppm, 10_000)
    return f"{whole}.{frac:04d}".rstrip("0").rstrip(".") if frac else str(whole)


__all__ = [
    "BUCKETS",
    "MAX_POINTS",
    "TOP_WINDOWS",
    "OverviewRow",
    "SpendHistory",
    "overview_rows",
    "OrderKey",
    "merge_sorted",
    "overview_order",
    "overview_row",
    "page",
    "percent",
    "window_bounds_of",
]
