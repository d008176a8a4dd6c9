"""The control plane's rules: who may change what, what is a no-op, what blocks a delete.

Each change runs in one unit of work (``control.ports``): lock the entity, read the facts
authority needs, decide with the pure ``domain.authority.authorize`` on what was read (so the
check and the write see the same state), skip everything when the new value equals the stored
one (a repeated PUT is one change), else take the next version, save, and ``emit`` the audit and
outbox rows. Listeners hear of a change only after it committed. No SQL and no HTTP here: the
store raises its own failures and ``api.errors`` chooses the statuses.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from spendgate.control.ports import ControlStore, KeyActivity, UnitOfWork
from spendgate.control.steps import (
    budget_context,
    found,
    may_touch_key,
    may_write_key,
    page_limit,
    refuse_if_any,
    revoke,
    revoke_team_tokens,
    save,
)
from spendgate.domain.authority import (
    Action,
    AuditTarget,
    BudgetTarget,
    CollectionTarget,
    KeyTarget,
    MemberTarget,
    OrgTarget,
    Principal,
    Role,
    TeamTarget,
    TokenTarget,
    authorize,
    require,
)
from spendgate.domain.budgets import Budget
from spendgate.domain.errors import Unprocessable
from spendgate.domain.scopes import Scope
from spendgate.domain.tokens import IssuedToken, issue_token
from spendgate.records import (
    AnyConfigRecord,
    BudgetRecord,
    KeyRecord,
    LimitBody,
    MemberRecord,
    OrgRecord,
    TeamRecord,
    TokenRecord,
)
from spendgate.store.control import Page
from spendgate.store.deadline import bounded_methods
from spendgate.store.pool import DEFAULT_TIMEOUT_S

log = logging.getLogger(__name__)
T = TypeVar("T")

ChangeListener = Callable[[str, AnyConfigRecord | None], None]


@bounded_methods
class ControlService:
    """Orgs, teams, keys, members, budgets, tokens and the audit log, as a principal sees them.

    ``key_activity`` is the gate's knowledge of spend per key (the API process passes it), one of
    the facts authority needs to let a team admin register a key (only a key new to spendgate,
    or one of its team). Without it (a control plane with no gate, in tests) only budgets on the
    key count as use. Every public method answers within ``timeout_s`` (``store.deadline``).
    """

    def __init__(
        self,
        store: ControlStore,
        *,
        key_activity: KeyActivity | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.store = store
        self.timeout_s = timeout_s
        self._key_activity = key_activity
        self._listeners: list[ChangeListener] = []

    def subscribe(self, listener: ChangeListener) -> None:
        """Call ``listener(config_key, record_or_None)`` after each committed change."""
        self._listeners.append(listener)

    @asynccontextmanager
    async def _write(self, actor: Principal) -> AsyncIterator[UnitOfWork]:
        async with self.store.begin(actor) as uow:
            yield uow
        for key, record in uow.changes:  # committed: the block above did not raise
            for listener in self._listeners:
                try:
                    listener(key, record)
                except Exception:  # a listener bug must not turn a committed write into a 500
                    log.exception("change listener failed for %s", key)

    async def ping(self) -> None:
        await self.store.ping()

    # --- orgs ------------------------------------------------------------------------------

    async def put_org(self, actor: Principal, org_id: str) -> OrgRecord:
        require(authorize(actor, Action.WRITE, OrgTarget(org_id)))
        async with self._write(actor) as uow:
            before = await uow.lock(OrgRecord, org_id)
            if before is not None:
                return before
            record = OrgRecord(version=await uow.next_version(), org_id=org_id)
            await save(uow, "put_org", None, record)
            return record

    async def get_org(self, actor: Principal, org_id: str) -> OrgRecord:
        require(authorize(actor, Action.READ, OrgTarget(org_id)))
        async with self.store.read() as uow:
            return found(await uow.get(OrgRecord, org_id), f"org {org_id} does not exist")

    async def delete_org(self, actor: Principal, org_id: str) -> int:
        require(authorize(actor, Action.DELETE, OrgTarget(org_id)))
        async with self._write(actor) as uow:
            before = found(await uow.lock(OrgRecord, org_id), f"org {org_id} does not exist")
            teams = await uow.ids_of(TeamRecord, "org_id", org_id, limit=6)
            refuse_if_any(teams, f"org {org_id} still has teams", "delete or move them first", "teams")
            await uow.delete(before)
            return await uow.emit("delete_org", before, None)

    async def list_orgs(
        self, actor: Principal, *, limit: int = 100, after: str | None = None
    ) -> Page[OrgRecord]:
        require(authorize(actor, Action.READ, CollectionTarget("orgs")))
        return await self._page(OrgRecord, after, limit)

    # --- teams -----------------------------------------------------------------------------

    async def put_team(self, actor: Principal, team_id: str, org_id: str | None) -> TeamRecord:
        require(authorize(actor, Action.WRITE, TeamTarget(team_id)))
        async with self._write(actor) as uow:
            before = await uow.lock(TeamRecord, team_id)
            if org_id is not None and await uow.get(OrgRecord, org_id) is None:
                raise Unprocessable(f"org_id: org {org_id} does not exist", details={"field": "org_id"})
            if before is not None and before.org_id == org_id:
                return before
            if before is None:
                # A token bound to a team that does not exist is from an earlier team of this
                # id, deleted before deletion revoked tokens: it must not come back to life.
                await revoke_team_tokens(uow, team_id)
            record = TeamRecord(version=await uow.next_version(), team_id=team_id, org_id=org_id)
            await save(uow, "put_team", before, record)
            return record

    async def get_team(self, actor: Principal, team_id: str) -> TeamRecord:
        require(authorize(actor, Action.READ, TeamTarget(team_id)))
        async with self.store.read() as uow:
            return found(await uow.get(TeamRecord, team_id), f"team {team_id} does not exist")

    async def delete_team(self, actor: Principal, team_id: str) -> int:
        require(authorize(actor, Action.DELETE, TeamTarget(team_id)))
        async with self._write(actor) as uow:
            before = found(await uow.lock(TeamRecord, team_id), f"team {team_id} does not exist")
            keys = await uow.ids_of(KeyRecord, "team_id", team_id, limit=6)
            refuse_if_any(keys, f"team {team_id} still has keys", "delete or move them first", "keys")
            users = await uow.ids_of(MemberRecord, "team_id", team_id, limit=6)
            refuse_if_any(users, f"team {team_id} still has members", "remove them first", "members")
            await revoke_team_tokens(uow, team_id)
            await uow.delete(before)
            return await uow.emit("delete_team", before, None)

    async def list_teams(
        self, actor: Principal, *, limit: int = 100, after: str | None = None
    ) -> Page[TeamRecord]:
        require(authorize(actor, Action.READ, CollectionTarget("teams")))
        return await self._page(TeamRecord, after, limit)

    # --- keys ------------------------------------------------------------------------------

    async def put_key(
        self, actor: Principal, key_id: str, user_id: str | None, team_id: str | None
    ) -> KeyRecord:
        """Register, change or (admin only) re-register a revoked key."""
        async with self._write(actor) as uow:
            before = await uow.lock(KeyRecord, key_id)
            target = KeyTarget(key_id, team_id, user_id)
            require(await may_write_key(uow, actor, target, before, self._key_activity))
            if team_id is not None and await uow.get(TeamRecord, team_id) is None:
                raise Unprocessable(f"team_id: team {team_id} does not exist", details={"field": "team_id"})
            if before is not None and (before.user_id, before.team_id, before.revoked) == (
                user_id,
                team_id,
                False,
            ):
                return before
            record = KeyRecord(
                version=await uow.next_version(), key_id=key_id, user_id=user_id, team_id=team_id
            )
            await save(uow, "put_key", before, record)
            return record

    async def get_key(self, actor: Principal, key_id: str) -> KeyRecord:
        async with self.store.read() as uow:
            record = await uow.get(KeyRecord, key_id)
        require(may_touch_key(actor, Action.READ, key_id, record))
        return found(record, f"key {key_id} does not exist")

    async def delete_key(self, actor: Principal, key_id: str) -> int:
        """Revoke the key: the row stays, with its team and user; idempotent."""
        async with self._write(actor) as uow:
            before = await uow.lock(KeyRecord, key_id)
            require(may_touch_key(actor, Action.DELETE, key_id, before))
            before = found(before, f"key {key_id} does not exist")
            if before.revoked:
                return before.version
            record = before.model_copy(update={"revoked": True, "version": await uow.next_version()})
            await uow.save(record)
            return await uow.emit("revoke_key", before, record)

    async def list_keys(
        self, actor: Principal, *, team_id: str | None = None, limit: int = 100, after: str | None = None
    ) -> Page[KeyRecord]:
        target = CollectionTarget("keys") if team_id is None else TeamTarget(team_id)
        require(authorize(actor, Action.READ, target))
        return await self._page(KeyRecord, after, limit, team_id)

    # --- members ---------------------------------------------------------------------------

    async def put_member(self, actor: Principal, team_id: str, user_id: str) -> MemberRecord:
        require(authorize(actor, Action.WRITE, MemberTarget(team_id, user_id)))
        async with self._write(actor) as uow:
            before = await uow.lock(MemberRecord, team_id, user_id)
            if before is not None:
                return before
            found(await uow.get(TeamRecord, team_id), f"team {team_id} does not exist")
            record = MemberRecord(version=await uow.next_version(), team_id=team_id, user_id=user_id)
            await save(uow, "put_member", None, record)
            return record

    async def get_member(self, actor: Principal, team_id: str, user_id: str) -> MemberRecord:
        require(authorize(actor, Action.READ, MemberTarget(team_id, user_id)))
        async with self.store.read() as uow:
            record = await uow.get(MemberRecord, team_id, user_id)
        return found(record, f"user {user_id} is not a member of team {team_id}")

    async def delete_member(self, actor: Principal, team_id: str, user_id: str) -> int:
        require(authorize(actor, Action.DELETE, MemberTarget(team_id, user_id)))
        async with self._write(actor) as uow:
            before = await uow.lock(MemberRecord, team_id, user_id)
            before = found(before, f"user {user_id} is not a member of team {team_id}")
            await uow.delete(before)
            return await uow.emit("delete_member", before, None)

    async def list_members(
        self, actor: Principal, team_id: str, *, limit: int = 100, after: str | None = None
    ) -> Page[MemberRecord]:
        require(authorize(actor, Action.READ, TeamTarget(team_id)))
        return await self._page(MemberRecord, after, limit, team_id)

    # --- budgets ---------------------------------------------------------------------------

    async def put_budget(
        self, actor: Principal, scope: Scope, budget: Budget, *, limits_null: bool = False
    ) -> BudgetRecord:
        """Set the budget on ``scope`` (``limits_null``: the body said ``"limits": null``)."""
        async with self._write(actor) as uow:
            before = await uow.lock(BudgetRecord, str(scope))
            team_of_key, key_exists, parent = await budget_context(uow, scope)
            target = BudgetTarget(scope, budget)
            require(
                authorize(
                    actor,
                    Action.WRITE,
                    target,
                    team_of_key=team_of_key,
                    key_exists=key_exists,
                    parent_budget=parent,
                )
            )
            limits = (
                None if limits_null else [LimitBody.model_validate(lim.to_json()) for lim in budget.limits]
            )
            if before is not None and (before.limits, before.tz) == (limits, budget.tz):
                return before
            record = BudgetRecord(
                version=await uow.next_version(), scope=str(scope), limits=limits, tz=budget.tz
            )
            await save(uow, "put_budget", before, record)
            return record

    async def get_budget(self, actor: Principal, scope: Scope) -> BudgetRecord:
        async with self.store.read() as uow:
            record = await uow.get(BudgetRecord, str(scope))
            team_of_key, key_exists, _ = await budget_context(uow, scope)
        target = BudgetTarget(scope)
        require(authorize(actor, Action.READ, target, team_of_key=team_of_key, key_exists=key_exists))
        return found(record, f"no budget is set on {scope} (no limit applies to that scope itself)")

    async def delete_budget(self, actor: Principal, scope: Scope) -> int:
        async with self._write(actor) as uow:
            before = await uow.lock(BudgetRecord, str(scope))
            team_of_key, key_exists, _ = await budget_context(uow, scope)
            target = BudgetTarget(scope)
            require(authorize(actor, Action.DELETE, target, team_of_key=team_of_key, key_exists=key_exists))
            before = found(before, f"no budget is set on {scope}")
            await uow.delete(before)
            return await uow.emit("delete_budget", before, None)

    async def list_budgets(
        self, actor: Principal, *, team_id: str | None = None, limit: int = 100, after: str | None = None
    ) -> Page[BudgetRecord]:
        """Every budget, or (``team_id``) those on the team, its members, and its keys."""
        target = CollectionTarget("budgets") if team_id is None else TeamTarget(team_id)
        require(authorize(actor, Action.READ, target))
        return await self._page(BudgetRecord, after, limit, team_id)

    # --- tokens ----------------------------------------------------------------------------

    async def mint_token(
        self, actor: Principal, role: Role, team_id: str | None
    ) -> tuple[IssuedToken, TokenRecord]:
        """A new token; the bearer value is in the returned ``IssuedToken`` only, never stored."""
        require(authorize(actor, Action.WRITE, TokenTarget(role, team_id)))
        if role is Role.TEAM_ADMIN and team_id is None:
            raise Unprocessable("team_id: required for a team_admin token", details={"field": "team_id"})
        if role is not Role.TEAM_ADMIN and team_id is not None:
            raise Unprocessable(
                f"team_id: only team_admin tokens are bound to a team ({role} tokens are global)",
                details={"field": "team_id"},
            )
        issued = issue_token()
        async with self._write(actor) as uow:
            if team_id is not None and await uow.get(TeamRecord, team_id) is None:
                raise Unprocessable(f"team_id: team {team_id} does not exist", details={"field": "team_id"})
            version = await uow.next_version()
            record = TokenRecord(
                version=version, token_id=issued.token_id, hash=issued.hash, role=role.value, team_id=team_id
            )
            await save(uow, "mint_token", None, record)
        return issued, record

    async def revoke_token(self, actor: Principal, token_id: str) -> TokenRecord:
        """Revoke a token (idempotent). Revocation is published, never a tombstone."""
        require(authorize(actor, Action.DELETE, TokenTarget()))
        async with self._write(actor) as uow:
            before = found(await uow.lock(TokenRecord, token_id), f"token {token_id} does not exist")
            return before if before.revoked else await revoke(uow, before)

    async def list_tokens(
        self, actor: Principal, *, limit: int = 100, after: str | None = None
    ) -> Page[TokenRecord]:
        require(authorize(actor, Action.READ, TokenTarget()))
        return await self._page(TokenRecord, after, limit)

    async def all_tokens(self) -> list[TokenRecord]:
        """Every token (revoked ones too), to fill a ``TokenCache`` at start."""
        async with self.store.read() as uow:
            return await uow.every(TokenRecord)

    # --- audit -----------------------------------------------------------------------------

    async def list_audit(self, actor: Principal, *, limit: int = 100, after: int | None = None) -> Page[Any]:
        """Audit rows in the order they were written (``after`` = the last id seen)."""
        require(authorize(actor, Action.READ, AuditTarget()))
        async with self.store.read() as uow:
            return await uow.audit(after=after, limit=page_limit(limit))

    async def _page(self, kind: Any, after: str | None, limit: int, team_id: str | None = None) -> Page[Any]:
        async with self.store.read() as uow:
            return await uow.page(kind, after=after, limit=page_limit(limit), team_id=team_id)
