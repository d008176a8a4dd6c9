"""Postgres adapter of alert webhooks: subscriptions (audited) and deliveries (the retry queue).

Subscriptions are not spend.config records: only the notifier needs them, it reads this table
(at most ``SUBSCRIPTION_TTL_S`` old), and their signing secrets must not travel on a topic.
Every change still runs in one transaction with its audit row (``action`` ``put_webhook`` /
``delete_webhook``, ``target`` ``webhook/{id}``, ``outbox_id`` NULL); the audit row and the
API never hold the secret, only ``secret_set``.

SQL only: who may manage a webhook, secrets and views are ``control.webhooks``'. Driver
exceptions leave as the store's failures (``store.pool.guard``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from spendgate.domain.authority import Principal
from spendgate.domain.scopes import encode_id
from spendgate.domain.webhooks import (
    ScopePattern,
)
from spendgate.store.pool import guard

Row = dict[str, Any]
MAX_PAGE = 1000
UNSET: Any = object()  # "secret" absent from a PUT body: keep the current one (or make one)


def webhook_key(webhook_id: str) -> str:
    return f"webhook/{encode_id(webhook_id)}"


@dataclass(frozen=True, slots=True)
class WebhookSpec:
    url: str
    patterns: tuple[ScopePattern, ...]
    kinds: tuple[str, ...]
    format: str
    secret: Any = UNSET  # str, None (unsigned) or UNSET


@dataclass(frozen=True, slots=True)
class Subscription:
    """What the notifier needs of a webhook."""

    webhook_id: str
    url: str
    patterns: tuple[ScopePattern, ...]
    kinds: tuple[str, ...]
    format: str
    secret: str | None


class PostgresWebhookUnitOfWork:
    """One transaction (``begin``) or one connection (``read``) over the webhooks tables."""

    def __init__(self, conn: AsyncConnection[Row]) -> None:
        self.conn = conn

    async def lock(self, webhook_id: str) -> Row | None:
        await self.conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (webhook_key(webhook_id),)
        )
        return await self._one("SELECT * FROM webhooks WHERE webhook_id = %s FOR UPDATE", webhook_id)

    async def get(self, webhook_id: str) -> Row | None:
        return await self._one("SELECT * FROM webhooks WHERE webhook_id = %s", webhook_id)

    async def key_teams(self, key_ids: Sequence[str]) -> dict[str, str | None]:
        """The team of each live key of ``key_ids`` (keys not registered are absent)."""
        cur = await self.conn.execute(
            "SELECT key_id, team_id FROM keys WHERE key_id = ANY(%s) AND NOT revoked",
            (list(key_ids),),
        )
        return {r["key_id"]: r["team_id"] for r in await cur.fetchall()}

    async def save(self, webhook_id: str, values: dict[str, Any], created_by: str) -> Row:
        row = await self._one(
            "INSERT INTO webhooks (webhook_id, url, scopes, kinds, format, secret, created_by)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (webhook_id) DO UPDATE SET"
            " url = EXCLUDED.url, scopes = EXCLUDED.scopes, kinds = EXCLUDED.kinds,"
            " format = EXCLUDED.format, secret = EXCLUDED.secret, updated_at = now() RETURNING *",
            webhook_id,
            values["url"],
            Jsonb(values["scopes"]),
            Jsonb(values["kinds"]),
            values["format"],
            values["secret"],
            created_by,
        )
        assert row is not None
        return row

    async def delete(self, webhook_id: str) -> None:
        await self.conn.execute("DELETE FROM webhooks WHERE webhook_id = %s", (webhook_id,))

    async def audit(
        self,
        actor: Principal,
        action: str,
        webhook_id: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> None:
        """One audit row; webhooks are not spend.config records, so no outbox row."""
        await self.conn.execute(
            "INSERT INTO audit (actor, actor_role, action, target, before, after, outbox_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, NULL)",
            (
                actor.token_id,
                actor.role.value,
                action,
                webhook_key(webhook_id),
                _jsonb(before),
                _jsonb(after),
            ),
        )

    async def after(self, webhook_id: str, size: int) -> list[Row]:
        """Up to ``size`` webhooks whose id sorts after ``webhook_id``, in order."""
        cur = await self.conn.execute(
            "SELECT * FROM webhooks WHERE webhook_id > %s ORDER BY webhook_id LIMIT %s", (webhook_id, size)
        )
        return await cur.fetchall()

    async def deliveries(self, webhook_id: str, limit: int) -> list[Row]:
        cur = await self.conn.execute(
            "SELECT * FROM webhook_deliveries WHERE webhook_id = %s ORDER BY id DESC LIMIT %s",
            (webhook_id, limit),
        )
        return await cur.fetchall()

    async def _one(self, sql: str, *params: Any) -> Row | None:
        cur = await self.conn.execute(sql, params)  # type: ignore[arg-type]
        return await cur.fetchone()


def _jsonb(value: dict[str, Any] | None) -> Jsonb | None:
    return None if value is None else Jsonb(value)


class WebhookStore:
    """Units of work for the control plane, deliveries for the notifier (one pool, either side)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def _conn(self, *, tx: bool = False) -> AsyncIterator[AsyncConnection[Row]]:
        async with guard(), self.pool.connection() as conn:
            if tx:
                async with conn.transaction():
                    yield cast(AsyncConnection[Row], conn)
            else:
                yield cast(AsyncConnection[Row], conn)

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[PostgresWebhookUnitOfWork]:
        async with self._conn(tx=True) as conn:
            yield PostgresWebhookUnitOfWork(conn)

    @asynccontextmanager
    async def read(self) -> AsyncIterator[PostgresWebhookUnitOfWork]:
        async with self._conn() as conn:
            yield PostgresWebhookUnitOfWork(conn)

    # --- the notifier's side ---------------------------------------------------------------

    async def subscriptions(self) -> list[Subscription]:
        async with self._conn() as conn:
            cur = await conn.execute("SELECT * FROM webhooks ORDER BY webhook_id")
            rows = await cur.fetchall()
        out = []
        for r in rows:
            try:
                patterns = tuple(ScopePattern.parse(p) for p in r["scopes"])
            except Exception:  # noqa: BLE001 - a row no version of the API could have written
                continue
            out.append(
                Subscription(r["webhook_id"], r["url"], patterns, tuple(r["kinds"]), r["format"], r["secret"])
            )
        return out

    async def schedule(self, items: Sequence[tuple[str, str, dict[str, Any]]]) -> int:
        """Durably queue (webhook_id, event_id, alert) deliveries, due now; duplicates (an alert
        read again after a restart) are ignored. Returns how many are new."""
        if not items:
            return 0
        async with self._conn(tx=True) as conn, conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO webhook_deliveries (webhook_id, event_id, alert)"
                " SELECT %s, %s, %s WHERE EXISTS (SELECT 1 FROM webhooks WHERE webhook_id = %s)"
                " ON CONFLICT (webhook_id, event_id) DO NOTHING",
                [(w, e, Jsonb(a), w) for w, e, a in items],
                returning=False,
            )
            return max(cur.rowcount, 0)

    async def claim(self, limit: int, lease_s: float, exclude: Sequence[str] = ()) -> list[Row]:
        """Take up to ``limit`` due deliveries for ``lease_s`` (skipping webhooks in ``exclude``),
        each with its webhook's current url, format and secret."""
        async with self._conn(tx=True) as conn:
            cur = await conn.execute(
                "UPDATE webhook_deliveries d SET locked_until = now() + make_interval(secs => %s)"
                " FROM webhooks w WHERE w.webhook_id = d.webhook_id AND d.id IN ("
                "   SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= now()"
                "   AND (locked_until IS NULL OR locked_until < now()) AND NOT (webhook_id = ANY(%s))"
                "   ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED)"
                " RETURNING d.id, d.webhook_id, d.event_id, d.alert, d.attempts, d.created_at,"
                " w.url, w.format, w.secret",
                (lease_s, list(exclude), limit),
            )
            return await cur.fetchall()

    async def release(self, ids: Sequence[int]) -> None:
        """Give back claimed deliveries this replica has no slot for (due again at once)."""
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE webhook_deliveries SET locked_until = NULL WHERE id = ANY(%s)", (list(ids),)
            )

    async def record(
        self,
        delivery_id: int,
        *,
        status: str,
        attempts: int,
        http_status: int | None,
        error: str | None,
        retry_in_s: float | None = None,
    ) -> None:
        """The result of one attempt: ``delivered``, ``failed`` (given up) or ``pending`` again."""
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE webhook_deliveries SET status = %s, attempts = %s, last_status = %s, last_error = %s,"
                " last_attempt_at = now(), locked_until = NULL,"
                " history = jsonb_path_query_array(history || jsonb_build_array(jsonb_build_object("
                "   'at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),"
                "   'status', %s::integer, 'error', %s::text)), '$[last - 9 to last]'),"
                " next_attempt_at = now() + make_interval(secs => %s),"
                " finished_at = CASE WHEN %s = 'pending' THEN NULL ELSE now() END WHERE id = %s",
                (
                    status,
                    attempts,
                    http_status,
                    error,
                    http_status,
                    error,
                    retry_in_s or 0.0,
                    status,
                    delivery_id,
                ),
            )

    async def next_due_in(self) -> float | None:
        """Seconds until the next pending delivery is due (0 if one is), None if none is pending."""
        async with self._conn() as conn:
            cur = await conn.execute(
                "SELECT GREATEST(0, EXTRACT(EPOCH FROM (min(GREATEST(next_attempt_at,"
                " COALESCE(locked_until, next_attempt_at))) - now()))) AS s"
                " FROM webhook_deliveries WHERE status = 'pending'"
            )
            row = await cur.fetchone()
        return None if row is None or row["s"] is None else float(row["s"])
