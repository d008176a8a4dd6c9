"""The gate's pure logic: may this request run, and if not, which windows bind and until when.

CONTRACT §2-§4. The scope set comes from the request's own fields and the registry only
(``attribution.scopes_for``): nothing from one request is remembered for the next. A scope of
the set binds when

(a) its latest decision is blocked and not every listed ``resets_at`` has passed (a ``total``
    window never resets), or
(b) it has a budget with a limit whose current window (the state entry with
    ``start <= now < resets_at``; an entry whose window is over counts as 0 spend) has
    ``spend + reserved >= limit``, or, with an estimate ``e``, ``spend + reserved + e > limit``,
    where ``reserved`` is what holds keep on the scope (``GateState.held``: its state record's,
    and this gate's own not reflected there yet; 0 without holds).

A request is allowed only if no scope binds. A deny is data: ``CheckResult(allowed=False, …)``.

A revoked key (``DELETE /v1/keys/K``; the registry keeps it with ``revoked``) is denied whatever
the budgets say, with one binding: ``key:K``, window ``total``, limit 0, never resetting, and
``code`` ``key_revoked`` (budget bindings carry no ``code``), so a client that reads only
``allowed``, ``blocked_by`` or ``retry_after_s`` keeps working.

Pure and fast: no I/O, no pydantic; money is integer nano-dollars, time is epoch seconds passed
in as ``now``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from spendgate.domain.attribution import scopes_for
from spendgate.domain.gate_state import CompiledBudget, GateState, HeldDecision, HeldState
from spendgate.domain.money import Nanos, format_usd
from spendgate.domain.scopes import encode_id
from spendgate.domain.windows import iso, window_bounds


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """What a gateway asks about (the fields of ``POST /v1/check``), money in nano-dollars."""

    key_id: str
    end_user_id: str | None = None
    model: str | None = None
    tags: Sequence[str] | None = ()
    user_id: str | None = None
    team_id: str | None = None
    org_id: str | None = None
    estimated_cost_nanos: Nanos | None = None


@dataclass(frozen=True, slots=True)
class Binding:
    """One window that denies the request."""

    scope: str
    window: str
    spend: Nanos
    limit: Nanos
    resets_at: float | None
    resets_at_text: str | None = None
    code: str | None = None  # ``key_revoked``; None for a budget window
    reserved: Nanos = 0  # held by outstanding holds; shown as ``reserved_usd`` when not 0
    frees_at: float | None = None  # denied by holds alone: when they have all expired (Retry-After)

    def to_json(self) -> dict[str, Any]:
        resets = self.resets_at_text
        if resets is None and self.resets_at is not None:
            resets = iso(int(self.resets_at))
        out = {
            "scope": self.scope,
            "window": self.window,
            "spend_usd": format_usd(self.spend),
            "limit_usd": format_usd(self.limit),
            "resets_at": resets,
        }
        if self.code is not None:
            out["code"] = self.code
        if self.reserved:
            out["reserved_usd"] = format_usd(self.reserved)
        return out


@dataclass(frozen=True, slots=True)
class CheckResult:
    allowed: bool
    blocked_by: tuple[Binding, ...] = ()
    retry_after_s: int | None = None
    degraded: bool = False

    def to_json(self, state_lag_ms: int) -> dict[str, Any]:
        """The body of ``POST /v1/check`` (CONTRACT §4)."""
        return {
            "allowed": self.allowed,
            "blocked_by": [b.to_json() for b in self.blocked_by],
            "retry_after_s": self.retry_after_s,
            "degraded": self.degraded,
            "state_lag_ms": state_lag_ms,
        }


ALLOWED = CheckResult(True)
DEGRADED_OPEN = CheckResult(True, degraded=True)
DEGRADED_CLOSED = CheckResult(False, degraded=True)


def degraded(fail_open: bool) -> CheckResult:
    """The answer when the gate's state cannot be trusted (not caught up, or too stale)."""
    return DEGRADED_OPEN if fail_open else DEGRADED_CLOSED


def check(request: CheckRequest, state: GateState, now: float) -> CheckResult:
    """Judge ``request`` against the materialized ``state`` at ``now`` (epoch seconds)."""
    registered = state.registry.keys.get(request.key_id)
    if registered is not None and registered.revoked:
        return revoked(request.key_id, state)
    decisions = state.decisions
    budgets = state.budgets
    states = state.states
    estimate = request.estimated_cost_nanos
    holding = bool(state.reserved or state.local.pending)
    found: list[Binding] | None = None
    for scope in scopes_for(request, state.registry):
        decision = decisions.get(scope)
        budget = budgets.get(scope)
        unblocked = decision is None or not decision[1]  # then only rule (b) can bind
        held = state.held(scope, now) if holding and budget is not None else 0
        if unblocked and (budget is None or not _over_budget(budget, states.get(scope), now, estimate, held)):
            continue
        bindings = scope_bindings(scope, decision, budget, states.get(scope), now, estimate, held)
        if held and bindings:
            bindings = _until_holds_end(bindings, state.held_until(scope, now), estimate)
        if bindings:
            if found is None:
                found = bindings
            else:
                found.extend(bindings)
    if not found:
        return ALLOWED
    return CheckResult(False, tuple(found), retry_after(found, now))


KEY_REVOKED = "key_revoked"


def revoked(key_id: str, state: GateState) -> CheckResult:
    """The answer for a revoked key: denied until an admin registers it again (no reset)."""
    scope = f"key:{encode_id(key_id)}"
    held = state.states.get(scope)
    total = held.by_window.get("total") if held is not None else None
    spend = total[2] if total is not None else 0
    return CheckResult(False, (Binding(scope, "total", spend, 0, None, None, KEY_REVOKED),), None)


def _over_budget(
    budget: CompiledBudget, state: HeldState | None, now: float, estimate: Nanos | None, reserved: Nanos = 0
) -> bool:
    """Rule (b) as a yes/no on plain tuples and one dict: the hot path of an allowed request."""
    by_window = state[2] if state is not None else _NO_WINDOWS
    for window, cap in budget[2]:
        held = by_window.get(window)
        if held is None:
            spend = 0
        else:
            start, resets, spend = held
            if resets is not None and not ((start is None or start <= now) and now < resets):
                spend = 0  # that window is over: nothing spent in the current one yet
        spend += reserved
        if spend >= cap or (estimate is not None and spend + estimate > cap):
            return True
    return False


_NO_WINDOWS: dict[str, tuple[float | None, float | None, Nanos]] = {}


def scope_bindings(
    scope: str,
    decision: HeldDecision | None,
    budget: CompiledBudget | None,
    state: HeldState | None,
    now: float,
    estimate: Nanos | None = None,
    reserved: Nanos = 0,
) -> list[Binding]:
    """The windows of one scope that bind at ``now`` (rules (a) and (b)), one per window.

    When a window binds by both rules, the state-derived entry (current spend and limit) wins.
    """
    out: dict[str, Binding] = {}
    if decision is not None and decision.blocked:
        for w in decision.windows:
            if w.resets_at is None or w.resets_at > now:
                out[w.window] = Binding(scope, w.window, w.spend, w.limit or 0, w.resets_at, w.resets_at_text)
    if budget is not None:
        held_windows = state.windows if state is not None else ()
        for limit in budget.limits:
            window = limit.window
            spend = 0
            resets_at: float | None = None
            resets_text: str | None = None
            known = False
            for held in held_windows:
                if held.window == window:
                    r = held.resets_at
                    if r is None or ((held.start is None or held.start <= now) and now < r):
                        spend, resets_at, resets_text, known = held.spend, r, held.resets_at_text, True
                    break
            cap = limit.max_nanos
            used = spend + reserved
            if used >= cap or (estimate is not None and used + estimate > cap):
                if not known and not limit.spec.is_total:
                    resets_at = float(window_bounds(limit.spec, int(now), budget.zone)[1])
                out[window] = Binding(scope, window, spend, cap, resets_at, resets_text, None, reserved)
    return list(out.values())


def _until_holds_end(
    bindings: list[Binding], frees_at: float | None, estimate: Nanos | None
) -> list[Binding]:
    """Mark the bindings that only holds make bind: they end when the holds do, at the latest
    (a settle usually ends them much sooner), not when the window resets hours later."""
    if frees_at is None:
        return bindings
    return [
        replace(b, frees_at=frees_at)
        if b.reserved and b.code is None and b.spend < b.limit and b.spend + (estimate or 0) <= b.limit
        else b
        for b in bindings
    ]


def retry_after(bindings: Sequence[Binding], now: float) -> int | None:
    """Whole seconds until every binding has ended (its window reset, or the holds that alone make
    it bind expired); None when one never ends."""
    latest = 0.0
    for b in bindings:
        ends = b.resets_at if b.frees_at is None else min(b.frees_at, b.resets_at or math.inf)
        if ends is None:
            return None
        latest = max(latest, ends)
    return max(1, math.ceil(latest - now))
