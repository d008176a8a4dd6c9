"""Postgres adapter of the control plane: registry, budgets, tokens, audit log, outbox.

Every change runs in ONE transaction that:
1. takes a transaction-scoped advisory lock on the entity's spend.config key, so changes to one
   entity are serialized and their versions increase in commit order;
2. reads the entity (and the registry facts authority needs) and calls the pure
   ``domain.authority.authorize`` on them, so the check and the write see the same state;
3. skips everything when the new value equals the stored one (a repeated PUT is a no-op);
4. takes the next outbox id as the entity's ``version``, writes the row, one audit row and one
   outbox row holding the exact record JSON that will be produced to ``{prefix}config``.
Nothing is published here: the relay (``store.outbox``) produces committed outbox rows only,
so a rolled-back change is never published and a committed one is never lost.

Driver exceptions never leave this module: Postgres down or the pool exhausted raise
``store.errors.DatabaseUnavailable``, a lost race on a foreign key ``Conflict``, a value
Postgres refuses (``DataError``, unencodable text) ``Unprocessable``, anything else from the
driver ``StoreError``. Which HTTP status each one is, ``api.errors`` alone decides.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from pydantic import BaseModel

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
from spendgate.domain.budgets import Budget, parse_budget
from spendgate.domain.errors import Conflict, Failure, NotFound, Unprocessable
from spendgate.domain.registry import config_key
from spendgate.domain.scopes import Scope, ScopeKind
from spendgate.domain.tokens import IssuedToken, issue_token
from spendgate.domain.windows import rfc3339
from spendgate.records import (
    BudgetRecord,
    KeyRecord,
    LimitBody,
    MemberRecord,
    OrgRecord,
    TeamRecord,
    TokenRecord,
)
from spendgate.store.deadline import within
from spendgate.store.errors import DatabaseUnavailable, StoreError

log = logging.getLogger(__name__)

Row = dict[str, Any]
ConfigRecordT = OrgRecord | TeamRecord | KeyRecord | MemberRecord | BudgetRecord | TokenRecord
ChangeListener = Callable[[str, ConfigRecordT | None], None]
T = TypeVar("T")

MAX_PAGE = 1000
OUTBOX_CHANNEL = "spendgate_outbox"


# --- spend.config keys (ARCHITECTURE.md) ---------------------------------------------------


def org_key(org_id: str) -> str:
    return config_key("org", org_id)


def team_key(team_id: str) -> str:
    return config_key("team", team_id)


def key_key(key_id: str) -> str:
    return config_key("key", key_id)


def member_key(team_id: str, user_id: str) -> str:
    return config_key("member", team_id, user_id)


def budget_key(scope: Scope | str) -> str:
    return config_key("budget", str(scope))


def token_key(token_id: str) -> str:
    return config_key("token", token_id)


# --- rows <-> records ----------------------------------------------------------------------


def _org(row: Row) -> OrgRecord:
    return OrgRecord(version=row["version"], org_id=row["org_id"])


def _team(row: Row) -> TeamRecord:
    return TeamRecord(version=row["version"], team_id=row["team_id"], org_id=row["org_id"])


def _key(row: Row) -> KeyRecord:
    return KeyRecord(
        version=row["version"],
        key_id=row["key_id"],
        user_id=row["user_id"],
        team_id=row["team_id"],
        revoked=bool(row.get("revoked")),
    )


def _member(row: Row) -> MemberRecord:
    return MemberRecord(version=row["version"], team_id=row["team_id"], user_id=row["user_id"])


def _budget(row: Row) -> BudgetRecord:
    limits = row["limits"]
    return BudgetRecord(
        version=row["version"],
        scope=row["scope"],
        limits=None if limits is None else [LimitBody.model_validate(lim) for lim in limits],
        tz=row["tz"],
    )


def _token(row: Row) -> TokenRecord:
    return TokenRecord(
        version=row["version"],
        token_id=row["token_id"],
        hash=row["hash"],
        role=row["role"],
        team_id=row["team_id"],
        revoked=row["revoked"],
    )


def public(record: BaseModel | None) -> dict[str, Any] | None:
    """The HTTP / audit view of a config record: no envelope fields, never a token hash."""
    if record is None:
        return None
    exclude = {"v", "type", "hash"} if isinstance(record, TokenRecord) else {"v", "type"}
    return record.model_dump(mode="json", exclude=exclude)


def budget_of(row: Row | None) -> Budget | None:
    if row is None:
        return None
    return parse_budget({"limits": row["limits"], "tz": row["tz"]})


def _limits_json(budget: Budget, limits_null: bool) -> list[dict[str, str]] | None:
    return None if limits_null else [lim.to_json() for lim in budget.limits]


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    next: str | None

    def to_json(self) -> dict[str, Any]:
        return {"items": self.items, "next": self.next}


def _limit(limit: int) -> int:
    if not 1 <= limit <= MAX_PAGE:
        raise Unprocessable(f"limit: must be between 1 and {MAX_PAGE}", details={"field": "limit"})
    return limit


def _page(items: list[dict[str, Any]], rows: Sequence[Row], limit: int, cursor: str) -> Page:
    more = len(rows) > limit
    return Page(items[:limit], str(rows[limit - 1][cursor]) if more else None)


DEFAULT_TIMEOUT_S = 5.0


def unopened_pool(database_url: str, *, max_size: int = 10, timeout_s: float = 5.0) -> AsyncConnectionPool:
    """The pool, built without I/O (the app mounts its routes before the lifespan opens it)."""
    return AsyncConnectionPool(
        database_url,
        min_size=1,
        max_size=max_size,
        timeout=timeout_s,
        open=False,
        kwargs={"autocommit": True, "row_factory": dict_row},
        check=AsyncConnectionPool.check_connection,
        reconnect_timeout=0,  # keep retrying in the background forever
    )


async def open_pool(database_url: str, *, max_size: int = 10, timeout_s: float = 5.0) -> AsyncConnectionPool:
    """An open pool that does not wait for Postgres: while it is down, requests answer 503."""
    pool = unopened_pool(database_url, max_size=max_size, timeout_s=timeout_s)
    await pool.open(wait=False)
    return pool


@asynccontextmanager
async def guard() -> AsyncIterator[None]:
    """Translate driver exceptions into the store's failures (they never escape the adapter)."""
    try:
        yield
    except Failure:
        raise
    except PoolTimeout as exc:
        log.warning("postgres pool timeout: %s", exc)
        raise DatabaseUnavailable() from None
    except psycopg.errors.ForeignKeyViolation:
        raise Conflict("a referenced team or org changed concurrently; retry") from None
    except psycopg.errors.UniqueViolation:
        raise Conflict("the entity was created concurrently; retry") from None
    except psycopg.OperationalError as exc:
        log.warning("postgres unavailable: %s", exc)
        raise DatabaseUnavailable() from None
    except (psycopg.DataError, UnicodeEncodeError) as exc:
        # A value Postgres cannot store or compare (a NUL character, a lone surrogate) that
        # validation let through: the request is at fault, not the server.
        log.warning("postgres refused a value: %s", exc)
        raise Unprocessable("a value in the request cannot be stored (e.g. a NUL character)") from None
    except psycopg.Error as exc:
        log.exception("unexpected database error")
        raise StoreError(f"database error: {type(exc).__name__}") from None


KeyActivity = Callable[[str], bool | None]
"""Whether key K has recorded spend as this API's gate knows it (``None``: not caught up yet)."""


class ControlRepo:
    """The control plane's repository and service layer (the routes are parse + call + render).

    ``key_activity`` is the gate's knowledge of spend per key (the API process passes it), one of
    the facts authority needs to let a team admin register a key (CONTRACT §4: only a key new to
    spendgate, or one of its team). Without it (a control plane with no gate, in tests) only
    budgets on the key count as use.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        key_activity: KeyActivity | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._pool = pool
        self.timeout_s = timeout_s  # every public method answers within it (see ``_bounded``)
        self._listeners: list[ChangeListener] = []
        self._key_activity = key_activity

    @property
    def pool(self) -> AsyncConnectionPool:
        return self._pool

    def subscribe(self, listener: ChangeListener) -> None:
        """Call ``listener(config_key, record_or_None)`` after each committed change."""
        self._listeners.append(listener)

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[_Tx]:
        tx = _Tx()
        async with guard(), self._pool.connection() as conn, conn.transaction():
            tx.conn = cast(AsyncConnection[Row], conn)
            yield tx
        for key, record in tx.changes:
            for listener in self._listeners:
                try:
                    listener(key, record)
                except Exception:  # a listener bug must not turn a committed write into a 500
                    log.exception("change listener failed for %s", key)

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection[Row]]:
        async with guard(), self._pool.connection() as conn:
            yield cast(AsyncConnection[Row], conn)

    async def ping(self) -> None:
        """Raises ``DatabaseUnavailable`` unless Postgres answers."""
        async with self._read() as conn:
            await conn.execute("SELECT 1")

    # --- orgs ------------------------------------------------------------------------------

    async def put_org(self, actor: Principal, org_id: str) -> OrgRecord:
        require(authorize(actor, Action.WRITE, OrgTarget(org_id)))
        key = org_key(org_id)
        async with self._tx() as tx:
            before = await tx.lock_and_get(key, "SELECT * FROM orgs WHERE org_id = %s FOR UPDATE", org_id)
            if before is not None:
                return _org(before)
            version = await tx.next_version()
            record = OrgRecord(version=version, org_id=org_id)
            await tx.conn.execute("INSERT INTO orgs (org_id, version) VALUES (%s, %s)", (org_id, version))
            await tx.emit(actor, "put_org", key, None, record)
            return record

    async def get_org(self, actor: Principal, org_id: str) -> OrgRecord:
        require(authorize(actor, Action.READ, OrgTarget(org_id)))
        async with self._read() as conn:
            row = await _one(conn, "SELECT * FROM orgs WHERE org_id = %s", org_id)
        if row is None:
            raise NotFound(f"org {org_id} does not exist")
        return _org(row)

    async def delete_org(self, actor: Principal, org_id: str) -> int:
        require(authorize(actor, Action.DELETE, OrgTarget(org_id)))
        key = org_key(org_id)
        async with self._tx() as tx:
            before = await tx.lock_and_get(key, "SELECT * FROM orgs WHERE org_id = %s FOR UPDATE", org_id)
            if before is None:
                raise NotFound(f"org {org_id} does not exist")
            teams = await _column(
                tx.conn, "SELECT team_id FROM teams WHERE org_id = %s ORDER BY team_id LIMIT 6", org_id
            )
            if teams:
                raise Conflict(
                    f"org {org_id} still has teams ({_names(teams)}); delete or move them first",
                    details={"teams": teams[:5]},
                )
            await tx.conn.execute("DELETE FROM orgs WHERE org_id = %s", (org_id,))
            return await tx.emit(actor, "delete_org", key, _org(before), None)

    async def list_orgs(self, actor: Principal, *, limit: int = 100, after: str | None = None) -> Page:
        require(authorize(actor, Action.READ, CollectionTarget("orgs")))
        rows = await self._list("SELECT * FROM orgs WHERE org_id > %s ORDER BY org_id LIMIT %s", after, limit)
        return _page([public(_org(r)) for r in rows], rows, limit, "org_id")  # type: ignore[misc]

    # --- teams -----------------------------------------------------------------------------

    async def put_team(self, actor: Principal, team_id: str, org_id: str | None) -> TeamRecord:
        require(authorize(actor, Action.WRITE, TeamTarget(team_id)))
        key = team_key(team_id)
        async with self._tx() as tx:
            before = await tx.lock_and_get(key, "SELECT * FROM teams WHERE team_id = %s FOR UPDATE", team_id)
            if (
                org_id is not None
                and await _one(tx.conn, "SELECT 1 AS x FROM orgs WHERE org_id = %s FOR SHARE", org_id) is None
            ):
                raise Unprocessable(f"org_id: org {org_id} does not exist", details={"field": "org_id"})
            if before is not None and before["org_id"] == org_id:
                return _team(before)
            if before is None:
                # A token bound to a team that does not exist is from an earlier team of this
                # id, deleted before deletion revoked tokens: it must not come back to life.
                await self._revoke_team_tokens(tx, actor, team_id)
            version = await tx.next_version()
            record = TeamRecord(version=version, team_id=team_id, org_id=org_id)
            await tx.conn.execute(
                "INSERT INTO teams (team_id, org_id, version) VALUES (%s, %s, %s) ON CONFLICT (team_id)"
                " DO UPDATE SET org_id = EXCLUDED.org_id, version = EXCLUDED.version, updated_at = now()",
                (team_id, org_id, version),
            )
            await tx.emit(actor, "put_team", key, _team(before) if before else None, record)
            return record

    async def get_team(self, actor: Principal, team_id: str) -> TeamRecord:
        require(authorize(actor, Action.READ, TeamTarget(team_id)))
        async with self._read() as conn:
            row = await _one(conn, "SELECT * FROM teams WHERE team_id = %s", team_id)
        if row is None:
            raise NotFound(f"team {team_id} does not exist")
        return _team(row)

    async def delete_team(self, actor: Principal, team_id: str) -> int:
        require(authorize(actor, Action.DELETE, TeamTarget(team_id)))
        key = team_key(team_id)
        async with self._tx() as tx:
            before = await tx.lock_and_get(key, "SELECT * FROM teams WHERE team_id = %s FOR UPDATE", team_id)
            if before is None:
                raise NotFound(f"team {team_id} does not exist")
            keys = await _column(
                tx.conn,
                "SELECT key_id FROM keys WHERE team_id = %s AND NOT revoked ORDER BY key_id LIMIT 6",
                team_id,
            )
            if keys:
                raise Conflict(
                    f"team {team_id} still has keys ({_names(keys)}); delete or move them first",
                    details={"keys": keys[:5]},
                )
            users = await _column(
                tx.conn, "SELECT user_id FROM members WHERE team_id = %s ORDER BY user_id LIMIT 6", team_id
            )
            if users:
                raise Conflict(
                    f"team {team_id} still has members ({_names(users)}); remove them first",
                    details={"members": users[:5]},
                )
            await self._revoke_team_tokens(tx, actor, team_id)
            await tx.conn.execute("DELETE FROM teams WHERE team_id = %s", (team_id,))
            return await tx.emit(actor, "delete_team", key, _team(before), None)

    async def _revoke_team_tokens(self, tx: _Tx, actor: Principal, team_id: str) -> None:
        """Revoke every live token bound to ``team_id`` (one audit row each): when the team is
        deleted, and when it is created (tokens of an earlier team of that id), so no token of a
        deleted team comes back to life with a new team of the same id."""
        ids = await _column(
            tx.conn,
            "SELECT token_id FROM tokens WHERE team_id = %s AND NOT revoked ORDER BY token_id",
            team_id,
        )
        for token_id in ids:
            key = token_key(token_id)
            before = await tx.lock_and_get(
                key, "SELECT * FROM tokens WHERE token_id = %s FOR UPDATE", token_id
            )
            if before is None or before["revoked"]:
                continue
            version = await tx.next_version()
            await tx.conn.execute(
                "UPDATE tokens SET revoked = true, revoked_at = now(), version = %s WHERE token_id = %s",
                (version, token_id),
            )
            after = _token({**before, "revoked": True, "version": version})
            await tx.emit(actor, "revoke_token", key, _token(before), after)

    async def list_teams(self, actor: Principal, *, limit: int = 100, after: str | None = None) -> Page:
        require(authorize(actor, Action.READ, CollectionTarget("teams")))
        rows = await self._list(
            "SELECT * FROM teams WHERE team_id > %s ORDER BY team_id LIMIT %s", after, limit
        )
        return _page([public(_team(r)) for r in rows], rows, limit, "team_id")  # type: ignore[misc]

    # --- keys ------------------------------------------------------------------------------

    async def put_key(
        self, actor: Principal, key_id: str, user_id: str | None, team_id: str | None
    ) -> KeyRecord:
        """Register, change or (admin only) re-register a revoked key."""
        key = key_key(key_id)
        async with self._tx() as tx:
            before = await tx.lock_and_get(key, "SELECT * FROM keys WHERE key_id = %s FOR UPDATE", key_id)
            in_use, is_member = await self._claim_facts(tx.conn, actor, key_id, before, team_id, user_id)
            require(
                authorize(
                    actor,
                    Action.WRITE,
                    KeyTarget(key_id, team_id, user_id),
                    team_of_key=before["team_id"] if before else None,
                    key_exists=before is not None,
                    key_user=before["user_id"] if before else None,
                    key_revoked=bool(before and before["revoked"]),
                    key_in_use=in_use,
                    user_is_member=is_member,
                )
            )
            if (
                team_id is not None
                and await _one(tx.conn, "SELECT 1 AS x FROM teams WHERE team_id = %s FOR SHARE", team_id)
                is None
            ):
                raise Unprocessable(f"team_id: team {team_id} does not exist", details={"field": "team_id"})
            if before is not None and (before["user_id"], before["team_id"], before["revoked"]) == (
                user_id,
                team_id,
                False,
            ):
                return _key(before)
            version = await tx.next_version()
            record = KeyRecord(version=version, key_id=key_id, user_id=user_id, team_id=team_id)
            await tx.conn.execute(
                "INSERT INTO keys (key_id, user_id, team_id, version) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (key_id) DO UPDATE SET user_id = EXCLUDED.user_id,"
                " team_id = EXCLUDED.team_id, version = EXCLUDED.version, updated_at = now(),"
                " revoked = false, revoked_at = NULL",
                (key_id, user_id, team_id, version),
            )
            await tx.emit(actor, "put_key", key, _key(before) if before else None, record)
            return record

    async def get_key(self, actor: Principal, key_id: str) -> KeyRecord:
        async with self._read() as conn:
            row = await _one(conn, "SELECT * FROM keys WHERE key_id = %s", key_id)
        require(
            authorize(
                actor,
                Action.READ,
                KeyTarget(key_id),
                team_of_key=row["team_id"] if row else None,
                key_exists=row is not None,
            )
        )
        if row is None:
            raise NotFound(f"key {key_id} does not exist")
        return _key(row)

    async def delete_key(self, actor: Principal, key_id: str) -> int:
        """Revoke the key (CONTRACT §4): the row stays, with its team and user; idempotent."""
        key = key_key(key_id)
        async with self._tx() as tx:
            before = await tx.lock_and_get(key, "SELECT * FROM keys WHERE key_id = %s FOR UPDATE", key_id)
            require(
                authorize(
                    actor,
                    Action.DELETE,
                    KeyTarget(key_id),
                    team_of_key=before["team_id"] if before else None,
                    key_exists=before is not None,
                )
            )
            if before is None:
                raise NotFound(f"key {key_id} does not exist")
            if before["revoked"]:
                return int(before["version"])
            version = await tx.next_version()
            record = _key({**before, "revoked": True, "version": version})
            await tx.conn.execute(
                "UPDATE keys SET revoked = true, revoked_at = now(), version = %s, updated_at = now()"
                " WHERE key_id = %s",
                (version, key_id),
            )
            return await tx.emit(actor, "revoke_key", key, _key(before), record)

    async def _claim_facts(
        self,
        conn: AsyncConnection[Row],
        actor: Principal,
        key_id: str,
        before: Row | None,
        team_id: str | None,
        user_id: str | None,
    ) -> tuple[bool | None, bool]:
        """(is the unregistered key in use, is ``user_id`` a member of ``team_id``) for a team admin.

        In use: the gate has recorded spend for it, or a budget is set on ``key:K`` or
        ``key_model:K/…``. Only asked for a team admin registering a new key (admins need no facts).
        """
        if actor.role is not Role.TEAM_ADMIN or before is not None:
            return False, False
        in_use: bool | None = self._key_activity(key_id) if self._key_activity else False
        if in_use is False:
            in_use = (
                await _one(
                    conn,
                    "SELECT 1 AS x FROM budgets WHERE kind IN ('key', 'key_model') AND part1 = %s LIMIT 1",
                    key_id,
                )
                is not None
            )
        is_member = (
            user_id is not None
            and team_id is not None
            and await _one(
                conn,
                "SELECT 1 AS x FROM members WHERE team_id = %s AND user_id = %s FOR SHARE",
                team_id,
                user_id,
            )
            is not None
        )
        return in_use, is_member

    async def list_keys(
        self, actor: Principal, *, team_id: str | None = None, limit: int = 100, after: str | None = None
    ) -> Page:
        if team_id is None:
            require(authorize(actor, Action.READ, CollectionTarget("keys")))
            rows = await self._list(
                "SELECT * FROM keys WHERE key_id > %s ORDER BY key_id LIMIT %s", after, limit
            )
        else:
            require(authorize(actor, Action.READ, TeamTarget(team_id)))
            rows = await self._list(
                "SELECT * FROM keys WHERE team_id = %s AND key_id > %s ORDER BY key_id LIMIT %s",
                after,
                limit,
                team_id,
            )
        return _page([public(_key(r)) for r in rows], rows, limit, "key_id")  # type: ignore[misc]

    # --- members ---------------------------------------------------------------------------

    async def put_member(self, actor: Principal, team_id: str, user_id: str) -> MemberRecord:
        require(authorize(actor, Action.WRITE, MemberTarget(team_id, user_id)))
        key = member_key(team_id, user_id)
        async with self._tx() as tx:
            before = await tx.lock_and_get(
                key, "SELECT * FROM members WHERE team_id = %s AND user_id = %s FOR UPDATE", team_id, user_id
            )
            if before is not None:
                return _member(before)
            if await _one(tx.conn, "SELECT 1 AS x FROM teams WHERE team_id = %s FOR SHARE", team_id) is None:
                raise NotFound(f"team {team_id} does not exist")
            version = await tx.next_version()
            record = MemberRecord(version=version, team_id=team_id, user_id=user_id)
            await tx.conn.execute(
                "INSERT INTO members (team_id, user_id, version) VALUES (%s, %s, %s)",
                (team_id, user_id, version),
            )
            await tx.emit(actor, "put_member", key, None, record)
            return record

    async def get_member(self, actor: Principal, team_id: str, user_id: str) -> MemberRecord:
        require(authorize(actor, Action.READ, MemberTarget(team_id, user_id)))
        async with self._read() as conn:
            row = await _one(
                conn, "SELECT * FROM members WHERE team_id = %s AND user_id = %s", team_id, user_id
            )
        if row is None:
            raise NotFound(f"user {user_id} is not a member of team {team_id}")
        return _member(row)

    async def delete_member(self, actor: Principal, team_id: str, user_id: str) -> int:
        require(authorize(actor, Action.DELETE, MemberTarget(team_id, user_id)))
        key = member_key(team_id, user_id)
        async with self._tx() as tx:
            before = await tx.lock_and_get(
                key, "SELECT * FROM members WHERE team_id = %s AND user_id = %s FOR UPDATE", team_id, user_id
            )
            if before is None:
                raise NotFound(f"user {user_id} is not a member of team {team_id}")
            await tx.conn.execute(
                "DELETE FROM members WHERE team_id = %s AND user_id = %s", (team_id, user_id)
            )
            return await tx.emit(actor, "delete_member", key, _member(before), None)

    async def list_members(
        self, actor: Principal, team_id: str, *, limit: int = 100, after: str | None = None
    ) -> Page:
        require(authorize(actor, Action.READ, TeamTarget(team_id)))
        rows = await self._list(
            "SELECT * FROM members WHERE team_id = %s AND user_id > %s ORDER BY user_id LIMIT %s",
            after,
            limit,
            team_id,
        )
        return _page([public(_member(r)) for r in rows], rows, limit, "user_id")  # type: ignore[misc]

    # --- budgets ---------------------------------------------------------------------------

    async def _budget_context(
        self, conn: AsyncConnection[Row], scope: Scope, *, lock: bool
    ) -> tuple[str | None, bool, Budget | None]:
        """(team of the scope's key, whether that key exists, the owning team's budget)."""
        share = " FOR SHARE" if lock else ""
        team_of_key: str | None = None
        key_exists = False
        owner: str | None = None
        if scope.kind in (ScopeKind.KEY, ScopeKind.KEY_MODEL):
            row = await _one(conn, f"SELECT team_id FROM keys WHERE key_id = %s{share}", scope.parts[0])
            key_exists = row is not None
            team_of_key = owner = row["team_id"] if row else None
        elif scope.kind is ScopeKind.MEMBER:
            owner = scope.parts[0]
        parent = None
        if owner is not None:
            parent = budget_of(
                await _one(
                    conn,
                    f"SELECT limits, tz FROM budgets WHERE scope = %s{share}",
                    str(Scope.of("team", owner)),
                )
            )
        return team_of_key, key_exists, parent

    async def put_budget(
        self, actor: Principal, scope: Scope, budget: Budget, *, limits_null: bool = False
    ) -> BudgetRecord:
        """Set the budget on ``scope`` (``limits_null``: the body said ``"limits": null``)."""
        key = budget_key(scope)
        async with self._tx() as tx:
            before = await tx.lock_and_get(
                key, "SELECT * FROM budgets WHERE scope = %s FOR UPDATE", str(scope)
            )
            team_of_key, key_exists, parent = await self._budget_context(tx.conn, scope, lock=True)
            require(
                authorize(
                    actor,
                    Action.WRITE,
                    BudgetTarget(scope, budget),
                    team_of_key=team_of_key,
                    key_exists=key_exists,
                    parent_budget=parent,
                )
            )
            limits = _limits_json(budget, limits_null)
            if before is not None and before["limits"] == limits and before["tz"] == budget.tz:
                return _budget(before)
            version = await tx.next_version()
            record = _budget({"version": version, "scope": str(scope), "limits": limits, "tz": budget.tz})
            await tx.conn.execute(
                "INSERT INTO budgets (scope, kind, part1, part2, limits, tz, version)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (scope) DO UPDATE SET"
                " limits = EXCLUDED.limits, tz = EXCLUDED.tz, version = EXCLUDED.version, updated_at = now()",
                (
                    str(scope),
                    scope.kind.value,
                    scope.parts[0],
                    scope.parts[1] if len(scope.parts) > 1 else None,
                    None if limits is None else Jsonb(limits),
                    budget.tz,
                    version,
                ),
            )
            await tx.emit(actor, "put_budget", key, _budget(before) if before else None, record)
            return record

    async def get_budget(self, actor: Principal, scope: Scope) -> BudgetRecord:
        async with self._read() as conn:
            row = await _one(conn, "SELECT * FROM budgets WHERE scope = %s", str(scope))
            team_of_key, key_exists, _ = await self._budget_context(conn, scope, lock=False)
        require(
            authorize(actor, Action.READ, BudgetTarget(scope), team_of_key=team_of_key, key_exists=key_exists)
        )
        if row is None:
            raise NotFound(f"no budget is set on {scope} (no limit applies to that scope itself)")
        return _budget(row)

    async def delete_budget(self, actor: Principal, scope: Scope) -> int:
        key = budget_key(scope)
        async with self._tx() as tx:
            before = await tx.lock_and_get(
                key, "SELECT * FROM budgets WHERE scope = %s FOR UPDATE", str(scope)
            )
            team_of_key, key_exists, _ = await self._budget_context(tx.conn, scope, lock=True)
            require(
                authorize(
                    actor, Action.DELETE, BudgetTarget(scope), team_of_key=team_of_key, key_exists=key_exists
                )
            )
            if before is None:
                raise NotFound(f"no budget is set on {scope}")
            await tx.conn.execute("DELETE FROM budgets WHERE scope = %s", (str(scope),))
            return await tx.emit(actor, "delete_budget", key, _budget(before), None)

    async def list_budgets(
        self, actor: Principal, *, team_id: str | None = None, limit: int = 100, after: str | None = None
    ) -> Page:
        """Every budget, or (``team_id``) those on the team, its members, and its keys."""
        if team_id is None:
            require(authorize(actor, Action.READ, CollectionTarget("budgets")))
            rows = await self._list(
                "SELECT * FROM budgets WHERE scope > %s ORDER BY scope LIMIT %s", after, limit
            )
        else:
            require(authorize(actor, Action.READ, TeamTarget(team_id)))
            rows = await self._list(
                "SELECT * FROM budgets WHERE ((kind IN ('team', 'member') AND part1 = %(t)s)"
                " OR (kind IN ('key', 'key_model')"
                " AND part1 IN (SELECT key_id FROM keys WHERE team_id = %(t)s)))"
                " AND scope > %(after)s ORDER BY scope LIMIT %(limit)s",
                after,
                limit,
                team_id,
                named=True,
            )
        return _page([public(_budget(r)) for r in rows], rows, limit, "scope")  # type: ignore[misc]

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
        key = token_key(issued.token_id)
        async with self._tx() as tx:
            if (
                team_id is not None
                and await _one(tx.conn, "SELECT 1 AS x FROM teams WHERE team_id = %s FOR SHARE", team_id)
                is None
            ):
                raise Unprocessable(f"team_id: team {team_id} does not exist", details={"field": "team_id"})
            version = await tx.next_version()
            record = TokenRecord(
                version=version, token_id=issued.token_id, hash=issued.hash, role=role.value, team_id=team_id
            )
            await tx.conn.execute(
                "INSERT INTO tokens (token_id, hash, role, team_id, created_by, version)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                (issued.token_id, issued.hash, role.value, team_id, actor.token_id, version),
            )
            await tx.emit(actor, "mint_token", key, None, record)
        return issued, record

    async def revoke_token(self, actor: Principal, token_id: str) -> TokenRecord:
        """Revoke a token (idempotent). Revocation is published, never a tombstone."""
        require(authorize(actor, Action.DELETE, TokenTarget()))
        key = token_key(token_id)
        async with self._tx() as tx:
            before = await tx.lock_and_get(
                key, "SELECT * FROM tokens WHERE token_id = %s FOR UPDATE", token_id
            )
            if before is None:
                raise NotFound(f"token {token_id} does not exist")
            if before["revoked"]:
                return _token(before)
            version = await tx.next_version()
            record = _token({**before, "revoked": True, "version": version})
            await tx.conn.execute(
                "UPDATE tokens SET revoked = true, revoked_at = now(), version = %s WHERE token_id = %s",
                (version, token_id),
            )
            await tx.emit(actor, "revoke_token", key, _token(before), record)
            return record

    async def list_tokens(self, actor: Principal, *, limit: int = 100, after: str | None = None) -> Page:
        require(authorize(actor, Action.READ, TokenTarget()))
        rows = await self._list(
            "SELECT * FROM tokens WHERE token_id > %s ORDER BY token_id LIMIT %s", after, limit
        )
        return _page([public(_token(r)) for r in rows], rows, limit, "token_id")  # type: ignore[misc]

    async def all_tokens(self) -> list[TokenRecord]:
        """Every token (revoked ones too), to fill a ``TokenCache`` at start."""
        async with self._read() as conn:
            cur = await conn.execute("SELECT * FROM tokens ORDER BY token_id")
            return [_token(r) for r in await cur.fetchall()]

    # --- audit -----------------------------------------------------------------------------

    async def list_audit(self, actor: Principal, *, limit: int = 100, after: int | None = None) -> Page:
        """Audit rows in the order they were written (``after`` = the last id seen)."""
        require(authorize(actor, Action.READ, AuditTarget()))
        async with self._read() as conn:
            cur = await conn.execute(
                "SELECT id, at, actor, actor_role, action, target, before, after FROM audit"
                " WHERE id > %s ORDER BY id LIMIT %s",
                (after or 0, _limit(limit) + 1),
            )
            rows = await cur.fetchall()
        items = [{**r, "at": rfc3339(r["at"])} for r in rows]
        return _page(items, rows, limit, "id")

    # --- helpers ---------------------------------------------------------------------------

    async def _list(
        self, sql: str, after: str | None, limit: int, team_id: str | None = None, *, named: bool = False
    ) -> list[Row]:
        n = _limit(limit) + 1
        params: Any
        if named:
            params = {"t": team_id, "after": after or "", "limit": n}
        elif team_id is not None:
            params = (team_id, after or "", n)
        else:
            params = (after or "", n)
        async with self._read() as conn:
            cur = await conn.execute(sql, params)  # type: ignore[arg-type]
            return await cur.fetchall()


def _bounded(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Make a ``ControlRepo`` method answer within ``self.timeout_s`` (``store.deadline``)."""

    @functools.wraps(method)
    async def run(self: ControlRepo, *args: Any, **kwargs: Any) -> T:
        return await within(method(self, *args, **kwargs), self.timeout_s, method.__name__)

    return run


for _name, _method in list(vars(ControlRepo).items()):
    if not _name.startswith("_") and inspect.iscoroutinefunction(_method):
        setattr(ControlRepo, _name, _bounded(_method))


class _Tx:
    """One control-plane transaction: the connection plus the changes to announce on commit."""

    conn: AsyncConnection[Row]

    def __init__(self) -> None:
        self.changes: list[tuple[str, ConfigRecordT | None]] = []

    async def lock_and_get(self, config_key: str, sql: str, *params: Any) -> Row | None:
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (config_key,))
        return await _one(self.conn, sql, *params)

    async def next_version(self) -> int:
        row = await _one(self.conn, "SELECT nextval(pg_get_serial_sequence('outbox', 'id')) AS v")
        assert row is not None
        return int(row["v"])

    async def emit(
        self,
        actor: Principal,
        action: str,
        config_key: str,
        before: ConfigRecordT | None,
        after: ConfigRecordT | None,
    ) -> int:
        """Write the audit row and the outbox row of one change; returns its version (the row id)."""
        version = after.version if after is not None else await self.next_version()
        value = after.model_dump_json() if after is not None else None
        await self.conn.execute(
            "INSERT INTO outbox (id, topic_key, value) VALUES (%s, %s, %s)", (version, config_key, value)
        )
        await self.conn.execute(
            "INSERT INTO audit (actor, actor_role, action, target, before, after, outbox_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                actor.token_id,
                actor.role.value,
                action,
                config_key,
                _jsonb(public(before)),
                _jsonb(public(after)),
                version,
            ),
        )
        await self.conn.execute("SELECT pg_notify(%s, %s)", (OUTBOX_CHANNEL, str(version)))
        self.changes.append((config_key, after))
        return version


def _jsonb(value: Mapping[str, Any] | None) -> Jsonb | None:
    return None if value is None else Jsonb(value)


async def _one(conn: AsyncConnection[Row], sql: str, *params: Any) -> Row | None:
    cur = await conn.execute(sql, params)  # type: ignore[arg-type]
    return await cur.fetchone()


async def _column(conn: AsyncConnection[Row], sql: str, *params: Any) -> list[str]:
    cur = await conn.execute(sql, params)  # type: ignore[arg-type]
    return [next(iter(r.values())) for r in await cur.fetchall()]


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", …" if len(names) > 5 else "")


async def snapshot(conn: AsyncConnection[Row]) -> list[tuple[str, str]]:
    """The whole current state as (spend.config key, record JSON) with current versions."""
    out: list[tuple[str, str]] = []

    async def each(sql: str, to_record: Callable[[Row], BaseModel], to_key: Callable[[Row], str]) -> None:
        cur = await conn.execute(sql)
        for row in await cur.fetchall():
            out.append((to_key(row), to_record(row).model_dump_json()))

    await each("SELECT * FROM orgs ORDER BY org_id", _org, lambda r: org_key(r["org_id"]))
    await each("SELECT * FROM teams ORDER BY team_id", _team, lambda r: team_key(r["team_id"]))
    await each("SELECT * FROM keys ORDER BY key_id", _key, lambda r: key_key(r["key_id"]))
    await each(
        "SELECT * FROM members ORDER BY team_id, user_id",
        _member,
        lambda r: member_key(r["team_id"], r["user_id"]),
    )
    await each("SELECT * FROM budgets ORDER BY scope", _budget, lambda r: budget_key(r["scope"]))
    await each("SELECT * FROM tokens ORDER BY token_id", _token, lambda r: token_key(r["token_id"]))
    return out
