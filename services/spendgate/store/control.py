"""The control plane's tables in Postgres: a unit of work per transaction, SQL only.

The rules (who may, what is a no-op, what blocks a delete) live in ``control.service``; this
module only reads and writes rows, as records. A writing unit of work is ONE transaction:
- ``lock`` takes a transaction-scoped advisory lock on the entity's ``spend.config`` key, then
  reads its row ``FOR UPDATE``, so changes to one entity are serialized and their versions
  increase in commit order; every other read in it is ``FOR SHARE``;
- ``next_version`` takes the next outbox id, the version of the change;
- ``emit`` writes one audit row and one outbox row holding the exact record JSON that will be
  produced to ``{prefix}config``. Nothing is published here: the relay (``store.outbox``)
  produces committed outbox rows only, so a rolled-back change is never published and a
  committed one is never lost.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from spendgate.domain.authority import Principal
from spendgate.domain.registry import config_key
from spendgate.domain.scopes import Scope
from spendgate.domain.windows import rfc3339
from spendgate.records import (
    AnyConfigRecord,
    BudgetRecord,
    KeyRecord,
    LimitBody,
    MemberRecord,
    OrgRecord,
    TeamRecord,
    TokenRecord,
    config_ids,
    config_key_of,
    public,
)
from spendgate.store.pool import guard

Row = dict[str, Any]
R = TypeVar("R", bound=AnyConfigRecord)
T = TypeVar("T")

OUTBOX_CHANNEL = "spendgate_outbox"


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; ``next`` is the cursor of the following page (``None``: last)."""

    items: list[T]
    next: str | None

    def to_json(self) -> dict[str, Any]:
        items = [public(i) if isinstance(i, BaseModel) else i for i in self.items]
        return {"items": items, "next": self.next}


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


@dataclass(frozen=True, slots=True)
class _Table:
    name: str
    ids: tuple[str, ...]  # the columns naming an entity, in ``config_ids`` order
    record: Callable[[Row], Any]
    revocable: bool = False  # revoked rows stay, flagged (keys, tokens)

    @property
    def cursor(self) -> str:
        return self.ids[-1]

    def where(self) -> str:
        return " AND ".join(f"{c} = %s" for c in self.ids)


TABLES: dict[type[BaseModel], _Table] = {
    OrgRecord: _Table("orgs", ("org_id",), _org),
    TeamRecord: _Table("teams", ("team_id",), _team),
    KeyRecord: _Table("keys", ("key_id",), _key, revocable=True),
    MemberRecord: _Table("members", ("team_id", "user_id"), _member),
    BudgetRecord: _Table("budgets", ("scope",), _budget),
    TokenRecord: _Table("tokens", ("token_id",), _token, revocable=True),
}

_UPSERT: dict[type[BaseModel], str] = {
    OrgRecord: "INSERT INTO orgs (org_id, version) VALUES (%(org_id)s, %(version)s)",
    TeamRecord: "INSERT INTO teams (team_id, org_id, version) VALUES (%(team_id)s, %(org_id)s, %(version)s)"
    " ON CONFLICT (team_id) DO UPDATE SET org_id = EXCLUDED.org_id, version = EXCLUDED.version,"
    " updated_at = now()",
    KeyRecord: "INSERT INTO keys (key_id, user_id, team_id, version, revoked, revoked_at)"
    " VALUES (%(key_id)s, %(user_id)s, %(team_id)s, %(version)s, %(revoked)s,"
    " CASE WHEN %(revoked)s THEN now() END)"
    " ON CONFLICT (key_id) DO UPDATE SET user_id = EXCLUDED.user_id, team_id = EXCLUDED.team_id,"
    " version = EXCLUDED.version, updated_at = now(), revoked = EXCLUDED.revoked,"
    " revoked_at = EXCLUDED.revoked_at",
    MemberRecord: "INSERT INTO members (team_id, user_id, version)"
    " VALUES (%(team_id)s, %(user_id)s, %(version)s)",
    BudgetRecord: "INSERT INTO budgets (scope, kind, part1, part2, limits, tz, version)"
    " VALUES (%(scope)s, %(kind)s, %(part1)s, %(part2)s, %(limits)s, %(tz)s, %(version)s)"
    " ON CONFLICT (scope) DO UPDATE SET limits = EXCLUDED.limits, tz = EXCLUDED.tz,"
    " version = EXCLUDED.version, updated_at = now()",
    TokenRecord: "INSERT INTO tokens (token_id, hash, role, team_id, created_by, version, revoked)"
    " VALUES (%(token_id)s, %(hash)s, %(role)s, %(team_id)s, %(created_by)s, %(version)s, %(revoked)s)"
    " ON CONFLICT (token_id) DO UPDATE SET version = EXCLUDED.version, revoked = EXCLUDED.revoked,"
    " revoked_at = CASE WHEN EXCLUDED.revoked THEN now() END",
}

# Listings: (record type, filtered by team) -> SQL over %(after)s, %(limit)s and %(team)s.
_LISTINGS: dict[tuple[type[BaseModel], bool], str] = {
    (OrgRecord, False): "SELECT * FROM orgs WHERE org_id > %(after)s ORDER BY org_id LIMIT %(limit)s",
    (TeamRecord, False): "SELECT * FROM teams WHERE team_id > %(after)s ORDER BY team_id LIMIT %(limit)s",
    (KeyRecord, False): "SELECT * FROM keys WHERE key_id > %(after)s ORDER BY key_id LIMIT %(limit)s",
    (KeyRecord, True): "SELECT * FROM keys WHERE team_id = %(team)s AND key_id > %(after)s"
    " ORDER BY key_id LIMIT %(limit)s",
    (MemberRecord, True): "SELECT * FROM members WHERE team_id = %(team)s AND user_id > %(after)s"
    " ORDER BY user_id LIMIT %(limit)s",
    (BudgetRecord, False): "SELECT * FROM budgets WHERE scope > %(after)s ORDER BY scope LIMIT %(limit)s",
    # A team's budgets: on the team, its members, and its keys.
    (BudgetRecord, True): "SELECT * FROM budgets WHERE ((kind IN ('team', 'member') AND part1 = %(team)s)"
    " OR (kind IN ('key', 'key_model') AND part1 IN (SELECT key_id FROM keys WHERE team_id = %(team)s)))"
    " AND scope > %(after)s ORDER BY scope LIMIT %(limit)s",
    (TokenRecord, False): "SELECT * FROM tokens WHERE token_id > %(after)s ORDER BY token_id LIMIT %(limit)s",
}


def _params(record: AnyConfigRecord, actor: Principal | None) -> dict[str, Any]:
    params = record.model_dump(mode="json", exclude={"v", "type"})
    if isinstance(record, BudgetRecord):
        scope = Scope.parse(record.scope)
        limits = record.limits_json()
        params.update(
            kind=scope.kind.value,
            part1=scope.parts[0],
            part2=scope.parts[1] if len(scope.parts) > 1 else None,
            limits=None if limits is None else Jsonb(limits),
        )
    if isinstance(record, TokenRecord):
        params["created_by"] = actor.token_id if actor else None
    return params


def _page(items: list[Any], rows: list[Row], limit: int, cursor: str) -> Page[Any]:
    more = len(rows) > limit
    return Page(items[:limit], str(rows[limit - 1][cursor]) if more else None)


class PostgresUnitOfWork:
    """One transaction (writing) or one connection (reading) of the control plane."""

    def __init__(self, conn: AsyncConnection[Row], actor: Principal | None) -> None:
        self.conn = conn
        self.actor = actor  # None: read only
        self.changes: list[tuple[str, AnyConfigRecord | None]] = []

    # --- reads -----------------------------------------------------------------------------

    async def lock(self, kind: type[R], *ids: str) -> R | None:
        """Serialize changes to the entity (advisory lock on its config key), then read it."""
        assert self.actor is not None, "lock() in a read-only unit of work"
        key = config_key(cast(str, kind.model_fields["type"].default), *ids)
        await self.conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
        return await self._get(kind, ids, " FOR UPDATE")

    async def get(self, kind: type[R], *ids: str) -> R | None:
        """The entity, or ``None``; in a writing unit of work it stays as read until commit."""
        return await self._get(kind, ids, " FOR SHARE" if self.actor else "")

    async def _get(self, kind: type[R], ids: tuple[str, ...], lock: str) -> R | None:
        table = TABLES[kind]
        row = await self._one(f"SELECT * FROM {table.name} WHERE {table.where()}{lock}", *ids)
        return None if row is None else cast(R, table.record(row))

    async def ids_of(
        self, kind: type[BaseModel], column: str, value: str, limit: int | None = None
    ) -> list[str]:
        """Ids (the cursor column) of the live entities whose ``column`` is ``value``, in order."""
        table = TABLES[kind]
        live = " AND NOT revoked" if table.revocable else ""
        bound = f" LIMIT {int(limit)}" if limit is not None else ""
        cur = await self.conn.execute(
            f"SELECT {table.cursor} AS id FROM {table.name} WHERE {column} = %s{live}"
            f" ORDER BY {table.cursor}{bound}",
            (value,),
        )
        return [r["id"] for r in await cur.fetchall()]

    async def key_has_budget(self, key_id: str) -> bool:
        """Whether a budget is set on ``key:K`` or any ``key_model:K/…``."""
        row = await self._one(
            "SELECT 1 AS x FROM budgets WHERE kind IN ('key', 'key_model') AND part1 = %s LIMIT 1", key_id
        )
        return row is not None

    async def page(
        self, kind: type[R], *, after: str | None, limit: int, team_id: str | None = None
    ) -> Page[R]:
        sql = _LISTINGS[(kind, team_id is not None)]
        cur = await self.conn.execute(sql, {"after": after or "", "limit": limit + 1, "team": team_id})
        rows = await cur.fetchall()
        table = TABLES[kind]
        return _page([table.record(r) for r in rows], rows, limit, table.cursor)

    async def every(self, kind: type[R]) -> list[R]:
        table = TABLES[kind]
        cur = await self.conn.execute(f"SELECT * FROM {table.name} ORDER BY {', '.join(table.ids)}")
        return [cast(R, table.record(r)) for r in await cur.fetchall()]

    async def audit(self, *, after: int | None, limit: int) -> Page[dict[str, Any]]:
        cur = await self.conn.execute(
            "SELECT id, at, actor, actor_role, action, target, before, after FROM audit"
            " WHERE id > %s ORDER BY id LIMIT %s",
            (after or 0, limit + 1),
        )
        rows = await cur.fetchall()
        return _page([{**r, "at": rfc3339(r["at"])} for r in rows], rows, limit, "id")

    # --- writes ----------------------------------------------------------------------------

    async def next_version(self) -> int:
        row = await self._one("SELECT nextval(pg_get_serial_sequence('outbox', 'id')) AS v")
        assert row is not None
        return int(row["v"])

    async def save(self, record: AnyConfigRecord) -> None:
        """Insert or update the entity's row to ``record``."""
        await self.conn.execute(_UPSERT[type(record)], _params(record, self.actor))

    async def delete(self, record: AnyConfigRecord) -> None:
        table = TABLES[type(record)]
        await self.conn.execute(f"DELETE FROM {table.name} WHERE {table.where()}", config_ids(record))

    async def emit(self, action: str, before: AnyConfigRecord | None, after: AnyConfigRecord | None) -> int:
        """Write the audit row and the outbox row of one change; returns its version (the row id)."""
        assert self.actor is not None, "emit() in a read-only unit of work"
        entity = after if after is not None else before
        assert entity is not None
        key = config_key_of(entity)
        version = after.version if after is not None else await self.next_version()
        value = after.model_dump_json() if after is not None else None
        await self.conn.execute(
            "INSERT INTO outbox (id, topic_key, value) VALUES (%s, %s, %s)", (version, key, value)
        )
        await self.conn.execute(
            "INSERT INTO audit (actor, actor_role, action, target, before, after, outbox_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                self.actor.token_id,
                self.actor.role.value,
                action,
                key,
                _jsonb(public(before)),
                _jsonb(public(after)),
                version,
            ),
        )
        await self.conn.execute("SELECT pg_notify(%s, %s)", (OUTBOX_CHANNEL, str(version)))
        self.changes.append((key, after))
        return version

    async def _one(self, sql: str, *params: Any) -> Row | None:
        cur = await self.conn.execute(sql, params)  # type: ignore[arg-type]
        return await cur.fetchone()


class PostgresControlStore:
    """Hands out units of work over the pool."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def begin(self, actor: Principal) -> AsyncIterator[PostgresUnitOfWork]:
        """A transaction: committed when the block ends, rolled back if it raises."""
        async with guard(), self.pool.connection() as conn, conn.transaction():
            yield PostgresUnitOfWork(cast(AsyncConnection[Row], conn), actor)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[PostgresUnitOfWork]:
        async with guard(), self.pool.connection() as conn:
            yield PostgresUnitOfWork(cast(AsyncConnection[Row], conn), None)

    async def ping(self) -> None:
        """Raises ``DatabaseUnavailable`` unless Postgres answers."""
        async with self.read() as uow:
            await uow.conn.execute("SELECT 1")


def _jsonb(value: Mapping[str, Any] | None) -> Jsonb | None:
    return None if value is None else Jsonb(value)


async def snapshot(conn: AsyncConnection[Row]) -> list[tuple[str, str]]:
    """The whole current state as (spend.config key, record JSON) with current versions."""
    uow = PostgresUnitOfWork(conn, None)
    out: list[tuple[str, str]] = []
    for kind in TABLES:
        records = cast(list[AnyConfigRecord], await uow.every(kind))  # type: ignore[type-var]
        out.extend((config_key_of(r), r.model_dump_json()) for r in records)
    return out
