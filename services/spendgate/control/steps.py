"""Steps the control-plane service repeats: save-and-emit, revocations, the facts authority needs."""

from __future__ import annotations

from typing import TypeVar

from spendgate.control.ports import KeyActivity, UnitOfWork
from spendgate.domain.authority import Action, Decision, KeyTarget, Principal, Role, authorize
from spendgate.domain.budgets import Budget, parse_budget
from spendgate.domain.errors import Conflict, NotFound, Unprocessable
from spendgate.domain.scopes import Scope, ScopeKind
from spendgate.records import AnyConfigRecord, BudgetRecord, KeyRecord, MemberRecord, TokenRecord

T = TypeVar("T")
MAX_PAGE = 1000


async def save(uow: UnitOfWork, action: str, before: AnyConfigRecord | None, record: AnyConfigRecord) -> int:
    await uow.save(record)
    return await uow.emit(action, before, record)


async def revoke(uow: UnitOfWork, before: TokenRecord) -> TokenRecord:
    record = before.model_copy(update={"revoked": True, "version": await uow.next_version()})
    await save(uow, "revoke_token", before, record)
    return record


async def revoke_team_tokens(uow: UnitOfWork, team_id: str) -> None:
    """Revoke every live token bound to ``team_id`` (one audit row each): when the team is
    deleted, and when it is created (tokens of an earlier team of that id), so no token of a
    deleted team comes back to life with a new team of the same id."""
    for token_id in await uow.ids_of(TokenRecord, "team_id", team_id):
        before = await uow.lock(TokenRecord, token_id)
        if before is not None and not before.revoked:
            await revoke(uow, before)


async def budget_context(uow: UnitOfWork, scope: Scope) -> tuple[str | None, bool, Budget | None]:
    """(team of the scope's key, whether that key exists, the owning team's budget)."""
    team_of_key: str | None = None
    key_exists = False
    owner: str | None = None
    if scope.kind in (ScopeKind.KEY, ScopeKind.KEY_MODEL):
        key = await uow.get(KeyRecord, scope.parts[0])
        key_exists = key is not None
        team_of_key = owner = key.team_id if key else None
    elif scope.kind is ScopeKind.MEMBER:
        owner = scope.parts[0]
    parent = await uow.get(BudgetRecord, str(Scope.of("team", owner))) if owner is not None else None
    return team_of_key, key_exists, budget_of(parent)


def budget_of(record: BudgetRecord | None) -> Budget | None:
    if record is None:
        return None
    return parse_budget({"limits": record.limits_json(), "tz": record.tz})


def may_touch_key(actor: Principal, action: Action, key_id: str, record: KeyRecord | None) -> Decision:
    return authorize(
        actor,
        action,
        KeyTarget(key_id),
        team_of_key=record.team_id if record else None,
        key_exists=record is not None,
    )


def found(record: T | None, message: str) -> T:
    if record is None:
        raise NotFound(message)
    return record


def refuse_if_any(ids: list[str], what: str, remedy: str, field: str) -> None:
    if ids:
        names = ", ".join(ids[:5]) + (", …" if len(ids) > 5 else "")
        raise Conflict(f"{what} ({names}); {remedy}", details={field: ids[:5]})


def page_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise Unprocessable(f"limit: must be between 1 and {MAX_PAGE}", details={"field": "limit"})
    return limit


async def may_write_key(
    uow: UnitOfWork,
    actor: Principal,
    target: KeyTarget,
    before: KeyRecord | None,
    key_activity: KeyActivity | None,
) -> Decision:
    """Authority over registering ``target`` (``before``: the key as stored), with the facts a
    team admin's claim needs: is the unregistered key in use (the gate has recorded spend for it,
    or a budget is set on ``key:K`` or ``key_model:K/…``), is its user a member of its team.
    Admins need no facts, and neither does a key already registered."""
    in_use: bool | None = False
    is_member = False
    if actor.role is Role.TEAM_ADMIN and before is None:
        in_use = key_activity(target.key_id) if key_activity else False
        if in_use is False:
            in_use = await uow.key_has_budget(target.key_id)
        is_member = (
            target.user_id is not None
            and target.team_id is not None
            and await uow.get(MemberRecord, target.team_id, target.user_id) is not None
        )
    return authorize(
        actor,
        Action.WRITE,
        target,
        team_of_key=before.team_id if before else None,
        key_exists=before is not None,
        key_user=before.user_id if before else None,
        key_revoked=bool(before and before.revoked),
        key_in_use=in_use,
        user_is_member=is_member,
    )
