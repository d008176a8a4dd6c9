"""What the gate holds in memory: the registry, the latest decision and state of every scope.

Built only from the decoded JSON of ``spend.config``, ``spend.decisions`` and ``spend.state``
records (CONTRACT §2), applied in the order they arrive. Every ``apply_*`` is O(1) per record
(O(windows) for one record), idempotent, and ignores stale records:

- a config record whose ``version`` is lower than the one held for its key (``RegistryView``);
- a decision or state record that reflects less usage than the held one for its scope (see
  :func:`provenance_order`): a late record from a worker that has since lost the scope's
  partition can never roll the scope back;
- among records reflecting the same usage, a decision whose ``seq`` is not higher than the
  held one, a state record whose ``as_of`` is older (window resets and budget changes move a
  scope without new usage, and may legitimately lower a window's spend).

Everything the check reads is pre-parsed here (money to nano-dollars, timestamps to epoch
seconds, budgets to flat tuples) so ``domain.check.check`` does dictionary look-ups and integer
comparisons only. Records are kept as tuples, not objects, to keep 100,000 scopes compact.

Raises ``InvalidInput`` / ``KeyError`` / ``TypeError`` / ``ValueError`` for a record that is not
what the contract says; the caller (the follower) counts and skips it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo

from spendgate.domain.budgets import Budget
from spendgate.domain.holds import LocalHolds
from spendgate.domain.money import NANOS_PER_USD, Nanos, parse_usd
from spendgate.domain.registry import ConfigChange, RegistryView
from spendgate.domain.windows import WindowSpec


class HeldWindow(NamedTuple):
    """One window of a decision (binding) or a state record (current spend)."""

    window: str
    start: float | None  # state only; None for ``total`` and for decision windows
    resets_at: float | None  # epoch seconds; None = never (``total``)
    spend: Nanos
    limit: Nanos | None  # decision only
    resets_at_text: str | None  # as it came on the wire, for answers


Watermarks = Mapping[str, int]  # usage partition (decimal text, as on the wire) -> last offset


class HeldDecision(NamedTuple):
    seq: int
    blocked: bool
    windows: tuple[HeldWindow, ...]
    watermarks: Watermarks | None = None


class HeldState(NamedTuple):
    as_of: float
    windows: tuple[HeldWindow, ...]
    by_window: dict[str, tuple[float | None, float | None, Nanos]]  # window -> (start, resets_at, spend)
    watermarks: Watermarks | None = None


class CompiledLimit(NamedTuple):
    window: str
    spec: WindowSpec
    max_nanos: Nanos
    soft_nanos: Nanos | None


class CompiledBudget(NamedTuple):
    limits: tuple[CompiledLimit, ...]
    zone: ZoneInfo
    caps: tuple[tuple[str, Nanos], ...]  # (window, max_nanos) of every limit: the hot path's view


def nanos(value: object) -> Nanos:
    """A wire dollar amount (``"12.5"``) in nano-dollars, exactly; fast path for plain decimals."""
    if type(value) is str:
        whole, dot, frac = value.partition(".")
        if (
            whole.isascii()
            and whole.isdigit()
            and (not dot or (frac.isascii() and frac.isdigit() and len(frac) <= 9))
        ):
            return int(whole) * NANOS_PER_USD + (int(frac.ljust(9, "0")) if dot else 0)
    return parse_usd(value)


def provenance_order(new: Watermarks | None, held: Watermarks | None) -> int:
    """-1 when ``new`` reflects less usage than ``held``, 1 when more, 0 when the same (or unknown).

    A record's ``watermarks`` are the last ``spend.usage`` offset per partition its scope's
    ledger had applied. Every owner of a scope applies the same ordered stream of deltas to a
    ledger recovered from the same changelog, so the watermark maps of one scope only ever
    grow, one partition at a time: of two records, the one missing an offset the other has is
    the older, whatever the clocks or the amounts say. Records without the field (written
    before it existed) compare as 0, and the caller falls back to ``seq`` / ``as_of``.
    """
    if new is None or held is None or new == held:
        return 0
    for partition, offset in held.items():
        if new.get(partition, -1) < offset:
            return -1
    return 1


def state_supersedes(new: Mapping[str, Any], held: Mapping[str, Any]) -> bool:
    """Whether a reader holding ``spend.state`` record ``held`` takes ``new`` (same scope)."""
    order = provenance_order(new.get("watermarks"), held.get("watermarks"))
    if order:
        return order > 0
    return (epoch(new["as_of"]) or 0.0) >= (epoch(held["as_of"]) or 0.0)


def epoch(value: object) -> float | None:
    """An RFC 3339 timestamp (``…Z`` or with an offset) in epoch seconds; ``None`` stays ``None``."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("timestamp must be a string")
    return _epoch(value)


@lru_cache(maxsize=8192)
def _epoch(value: str) -> float:
    """Cached: a cold start reads the same window starts and resets on 100,000 records."""
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:  # the contract says "with offset"; a naive one is read as UTC
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


class GateState:
    """The gate's materialized view. Not thread-safe: one event loop applies and reads it."""

    __slots__ = ("registry", "decisions", "states", "budgets", "records_applied", "reserved", "local")

    def __init__(self, registry: RegistryView | None = None) -> None:
        self.registry = registry if registry is not None else RegistryView()
        self.decisions: dict[str, HeldDecision] = {}
        self.states: dict[str, HeldState] = {}
        self.budgets: dict[str, CompiledBudget] = {}
        self.records_applied = 0
        #: scope -> (nanos held per its latest state record, until when: epoch s) for scopes
        #: whose record shows holds; the check counts them only before ``until``
        self.reserved: dict[str, tuple[Nanos, float]] = {}
        #: holds this gate placed that no state record reflects yet (``domain.holds``)
        self.local = LocalHolds()
        for scope in self.registry.budgets:
            self._compile(scope)

    # --- apply ----------------------------------------------------------------------------

    def apply_config(self, key: str, value: Mapping[str, Any] | None) -> ConfigChange | None:
        """Apply one ``spend.config`` record (``value`` None = deleted); see ``RegistryView.apply``."""
        change = self.registry.apply(key, value)
        if change is not None and change.type == "budget" and change.scope is not None:
            self._compile(change.scope)
        self.records_applied += 1
        return change

    def apply_decision(self, value: Mapping[str, Any] | None, key: str | None = None) -> bool:
        """Apply one ``spend.decisions`` record; False when it was stale (module docstring).

        A tombstone (``value`` None, ``key`` = scope) forgets the scope's decision.
        """
        self.records_applied += 1
        if value is None:
            return key is not None and self.decisions.pop(key, None) is not None
        scope = value["scope"]
        seq = int(value["seq"])
        marks = _watermarks(value)
        held = self.decisions.get(scope)
        if held is not None:
            order = provenance_order(marks, held.watermarks)
            if order < 0 or (order == 0 and seq <= held.seq):
                return False
        blocked = bool(value["blocked"])
        windows = (
            tuple(
                HeldWindow(
                    w["window"],
                    None,
                    epoch(w.get("resets_at")),
                    nanos(w["spend_usd"]),
                    nanos(w["limit_usd"]),
                    w.get("resets_at"),
                )
                for w in value.get("windows") or ()
            )
            if blocked
            else ()
        )
        self.decisions[scope] = HeldDecision(seq, blocked, windows, marks)
        return True

    def apply_state(self, value: Mapping[str, Any] | None, key: str | None = None) -> bool:
        """Apply one ``spend.state`` record; False when older than the held one (module docstring)."""
        self.records_applied += 1
        if value is None:
            if key is not None:
                self.reserved.pop(key, None)
            return key is not None and self.states.pop(key, None) is not None
        scope = value["scope"]
        as_of = epoch(value["as_of"]) or 0.0
        marks = _watermarks(value)
        held = self.states.get(scope)
        if held is not None:
            order = provenance_order(marks, held.watermarks)
            if order < 0 or (order == 0 and as_of < held.as_of):
                return False
        raw = value.get("windows") or ()
        windows: list[HeldWindow] = []
        by_window: dict[str, tuple[float | None, float | None, Nanos]] = {}
        for w in raw:  # one pass, plain locals: 100,000 of these on a cold start
            window, start, resets_text = w["window"], epoch(w.get("start")), w.get("resets_at")
            resets_at = epoch(resets_text)
            spend = nanos(w["spend_usd"])
            windows.append(HeldWindow(window, start, resets_at, spend, None, resets_text))
            by_window[window] = (start, resets_at, spend)
        # parsed before anything is stored: a record that fails here is skipped whole
        reserved = max([nanos(w["reserved_usd"]) for w in raw if "reserved_usd" in w], default=0)
        until = epoch(value.get("holds_expire_at")) if reserved else None
        self.states[scope] = HeldState(as_of, tuple(windows), by_window, marks)
        if reserved and until is not None:
            self.reserved[scope] = (reserved, until)
        else:
            self.reserved.pop(scope, None)
        if self.local.pending:
            self.local.reflect(scope, marks)
        return True

    def held(self, scope: str, now: float) -> Nanos:
        """Nano-dollars held on ``scope`` at ``now``: its state record's holds (until they
        expire) plus the holds this gate placed that the record does not reflect yet."""
        local = self.local
        if local.pending:
            local.expire(now)
        extra = local.pending.get(scope, 0)
        reserved = self.reserved.get(scope)
        if reserved is not None and now < reserved[1]:
            extra += reserved[0]
        return extra

    def held_until(self, scope: str, now: float) -> float | None:
        """When every hold counting on ``scope`` at ``now`` has expired, at the latest."""
        ends = [self.local.latest_expiry(scope)]
        reserved = self.reserved.get(scope)
        if reserved is not None and now < reserved[1]:
            ends.append(reserved[1])
        return max((end for end in ends if end is not None), default=None)

    # --- read -----------------------------------------------------------------------------

    def current_window(self, scope: str, window: str, now: float) -> HeldWindow | None:
        """The state entry of ``scope``'s ``window`` when it holds ``now`` (None when over or unknown)."""
        state = self.states.get(scope)
        if state is None:
            return None
        for held in state.windows:
            if held.window == window:
                return held if is_current(held, now) else None
        return None

    def __len__(self) -> int:
        return len(self.decisions.keys() | self.states.keys() | self.budgets.keys())

    def _compile(self, scope: str) -> None:
        budget = self.registry.budgets.get(scope)
        if budget is None or budget.is_unlimited:
            self.budgets.pop(scope, None)
            return
        self.budgets[scope] = compile_budget(budget)


_COMPILED: dict[int, tuple[Budget, CompiledBudget]] = {}
"""Budgets compiled before, by identity (the ``Budget`` is kept, so its id is not reused): the
scopes that share one parsed budget (``domain.budgets`` hands out one object per budget text)
share one compiled form too. Bounded: cleared when full."""


def compile_budget(budget: Budget) -> CompiledBudget:
    """``budget`` as the check reads it: flat tuples, windows as text; immutable, so shared."""
    known = _COMPILED.get(id(budget))
    if known is not None and known[0] is budget:
        return known[1]
    limits = tuple(
        CompiledLimit(str(lim.window), lim.window, lim.max_nanos, lim.soft_nanos) for lim in budget.limits
    )
    compiled = CompiledBudget(limits, budget.zone, tuple((lim.window, lim.max_nanos) for lim in limits))
    if len(_COMPILED) >= 4096:
        _COMPILED.clear()
    _COMPILED[id(budget)] = (budget, compiled)
    return compiled


def _watermarks(value: Mapping[str, Any]) -> Watermarks | None:
    marks = value.get("watermarks")
    if marks is None:
        return None
    if not isinstance(marks, dict) or not all(type(o) is int for o in marks.values()):
        raise TypeError("watermarks must map partitions to integer offsets")
    return marks


def is_current(held: HeldWindow, now: float) -> bool:
    """A state window counts while ``start <= now < resets_at`` (``total`` always counts)."""
    resets = held.resets_at
    if resets is None:
        return True
    start = held.start
    return (start is None or start <= now) and now < resets
