"""``GET /v1/spend/{scope}``: spend, limits and what remains of one scope, from memory."""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.
from typing import Any
from urllib.parse import unquote

from fastapi import APIRouter, Request

from spendgate.api.deps import Caller, GateDep
from spendgate.api.errors import Unprocessable, error_responses
from spendgate.api.paths import scope_in_path
from spendgate.domain.authority import Action, BudgetTarget, GateTarget, Principal, Role, authorize, require
from spendgate.domain.check import scope_bindings
from spendgate.domain.errors import InvalidInput
from spendgate.domain.gate_state import GateState, is_current
from spendgate.domain.money import format_usd
from spendgate.domain.scopes import Scope, ScopeKind
from spendgate.domain.windows import iso, window_bounds

router = APIRouter(prefix="/v1", tags=["gate"], responses=error_responses(400, 401, 403, 413, 415, 422))


def spend_view(scope: str, state: GateState, now: float) -> dict[str, Any]:
    """``GET /v1/spend/{scope}``: every budget window plus ``total``, from the materialized state."""
    budget = state.budgets.get(scope)
    held = state.states.get(scope)
    reserved = state.held(scope, now)  # what holds keep: counted in every current window
    windows: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(window: str, spend: int, limit: int | None, soft: int | None, resets: str | None) -> None:
        seen.add(window)
        windows.append(
            {
                "window": window,
                "spend_usd": format_usd(spend),
                "limit_usd": None if limit is None else format_usd(limit),
                "remaining_usd": None if limit is None else format_usd(max(0, limit - spend - reserved)),
                "soft_usd": None if soft is None else format_usd(soft),
                "reserved_usd": format_usd(reserved),
                "resets_at": resets,
            }
        )

    for lim in budget.limits if budget else ():
        current = state.current_window(scope, lim.window, now)
        if current is not None:
            add(lim.window, current.spend, lim.max_nanos, lim.soft_nanos, current.resets_at_text)
        else:
            resets = None if lim.spec.is_total else iso(window_bounds(lim.spec, int(now), budget.zone)[1])  # type: ignore[union-attr]
            add(lim.window, 0, lim.max_nanos, lim.soft_nanos, resets)
    for w in held.windows if held else ():
        if w.window not in seen and is_current(w, now):
            add(w.window, w.spend, None, None, w.resets_at_text)
    if "total" not in seen:
        add("total", 0, None, None, None)
    blocked = bool(scope_bindings(scope, state.decisions.get(scope), budget, held, now, None, reserved))
    if not blocked and scope.startswith("key:"):
        key = state.registry.keys.get(unquote(scope[4:]))
        blocked = key is not None and key.revoked  # every check of a revoked key is denied
    return {"scope": scope, "blocked": blocked, "windows": windows}


@router.get("/spend/{scope:path}", summary="Spend, limits and remaining of one scope (viewer+)")
async def get_spend(request: Request, scope: str, caller: Caller, gate: GateDep) -> dict[str, Any]:
    try:
        parsed = scope_in_path(request, "/v1/spend/")
    except InvalidInput as exc:
        raise Unprocessable(f"scope: {exc.reason}", details={"field": "scope"}) from None
    text = str(parsed)
    authorize_read(caller, parsed, gate.state)
    return spend_view(text, gate.state, gate.clock())


def authorize_read(caller: Principal, scope: Scope, state: GateState) -> None:
    """May ``caller`` read ``scope``'s spend (a team admin: only its team's scopes)."""
    if caller.role is Role.GATEWAY:
        decision = authorize(caller, Action.CHECK, GateTarget())
    else:
        team_of_key = None
        if scope.kind in (ScopeKind.KEY, ScopeKind.KEY_MODEL):
            info = state.registry.keys.get(scope.parts[0])
            team_of_key = info.team_id if info else None
        decision = authorize(caller, Action.READ, BudgetTarget(scope), team_of_key=team_of_key)
    require(decision)
