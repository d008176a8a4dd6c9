"""decide: is a scope blocked, by which windows, and when could that change.

A scope is blocked while, in some window of its budget, spend >= limit (so a limit of 0
blocks at once). Pure: the spend comes from anything with ``spend(spec, tz, now)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol
from zoneinfo import ZoneInfo

from spendgate.domain.budgets import Budget
from spendgate.domain.ledger import WindowSpend
from spendgate.domain.windows import TOTAL, WindowSpec


class SpendSource(Protocol):
    def spend(self, spec: WindowSpec, tz: ZoneInfo, now: int) -> WindowSpend: ...


@dataclass(frozen=True, slots=True)
class WindowStatus:
    window: str
    start: int | None
    resets_at: int | None
    spend: int
    limit: int | None = None
    soft: int | None = None

    @property
    def binding(self) -> bool:
        return self.limit is not None and self.spend >= self.limit

    @property
    def soft_crossed(self) -> bool:
        return self.soft is not None and self.spend >= self.soft


@dataclass(frozen=True, slots=True)
class ScopeStatus:
    windows: tuple[WindowStatus, ...]
    """Every window of the budget (sorted by window text) plus ``total`` when it has no limit."""

    @property
    def binding(self) -> tuple[WindowStatus, ...]:
        return tuple(w for w in self.windows if w.binding)

    @property
    def blocked(self) -> bool:
        return any(w.binding for w in self.windows)

    @property
    def next_change_at(self) -> int | None:
        """The earliest reset of a window that binds or crossed its soft limit (a timer's due time)."""
        resets = [
            w.resets_at for w in self.windows if w.resets_at is not None and (w.binding or w.soft_crossed)
        ]
        return min(resets) if resets else None

    def decision_key(self) -> tuple[tuple[str, int | None, int | None], ...]:
        """What a published decision states: the binding windows, their resets and limits."""
        return tuple((w.window, w.resets_at, w.limit) for w in self.binding)


def decide(budget: Budget, spend: SpendSource, now: int) -> ScopeStatus:
    zone = budget.zone
    windows = []
    for limit in budget.limits:
        s = spend.spend(limit.window, zone, now)
        windows.append(
            WindowStatus(str(limit.window), s.start, s.resets_at, s.nanos, limit.max_nanos, limit.soft_nanos)
        )
    if budget.limit_for(TOTAL) is None:
        s = spend.spend(TOTAL, zone, now)
        windows.append(WindowStatus("total", None, None, s.nanos))
    return ScopeStatus(tuple(windows))
