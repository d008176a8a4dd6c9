"""Postgres adapter of alert webhooks: subscriptions (audited) and deliveries (the retry queue).

Subscriptions are not spend.config records: only the notifier needs them, it reads this table
(at most ``SUBSCRIPTION_TTL_S`` old), and their signing secrets must not travel on a topic.
Every change still runs in one transaction with its audit row (``action`` ``put_webhook`` /
``delete_webhook``, ``target`` ``webhook/{id}``, ``outbox_id`` NULL); the audit row and the
API never hold the secret, only ``secret_set``.

Driver exceptions leave as the API's errors (``store.pool.guard``): 503 when Postgres is down.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from psycopg import AsyncConnection
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from spendgate.domain.authority import Principal, require
from spendgate.domain.errors import Forbidden, NotFound, Unprocessable
from spendgate.domain.scopes import encode_id
from spendgate.domain.webhooks import (
    ScopePattern,
    authorize_webhook,
    keys_named,
)
from spendgate.domain.windows import rfc3339
from spendgate.store.deadline import within
from spendgate.store.pool import guard

Row = dict[str, Any]
MAX_PAGE = 1000
UNSET: Any = object()  # "secret" absent from a PUT body: keep the current one (or make one)


def webhook_key(webhook_id: str) -> str:
    return f"webhook/{encode_id(webhook_id)}"


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


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


def _iso(value: datetime | None) -> str | None:
    return None if value is None else rfc3339(value)


def public(row: Row) -> dict[str, Any]:
    """The API / audit view of a webhook: never its secret."""
    return {
        "webhook_id": row["webhook_id"],
        "url": row["url"],
        "scopes": list(row["scopes"]),
        "kinds": list(row["kinds"]),
        "format": row["format"],
        "secret_set": row.get("secret") is not None,
        "created_at": _iso(row.get("created_at")),
        "updated_at": _iso(row.get("updated_at")),
    }


def _audit_view(row: Row | None) -> Jsonb | None:
    if row is None:
        return None
    view = public(row)
    view.pop("created_at", None)
    view.pop("updated_at", None)
    return Jsonb(view)


def delivery_view(row: Row) -> dict[str, Any]:
    alert = row["alert"]
    return {
        "event_id": row["event_id"],
        "status": row["status"],
        "attempts": row["attempts"],
        "last_status": row["last_status"],
        "last_error": row["last_error"],
        "last_attempt_at": _iso(row["last_attempt_at"]),
        "next_attempt_at": _iso(row["next_attempt_at"]) if row["status"] == "pending" else None,
        "created_at": _iso(row["created_at"]),
        "finished_at": _iso(row["finished_at"]),
        "history": row.get("history") or [],
        "alert": {k: alert.get(k) for k in ("scope", "kind", "window", "as_of")},
    }


class WebhookStore:
    """Subscriptions for the control plane, deliveries for the notifier (one pool, either side)."""

    def __init__(self, pool: AsyncConnectionPool, *, timeout_s: float = 5.0) -> None:
        self.pool = pool
        self.timeout_s = timeout_s

    @asynccontextmanager
    async def _conn(self, *, tx: bool = False) -> AsyncIterator[AsyncConnection[Row]]:
        async with guard(), self.pool.connection() as conn:
            if tx:
                async with conn.transaction():
                    yield cast(AsyncConnection[Row], conn)
            else:
                yield cast(AsyncConnection[Row], conn)

    async def _bounded(self, coro: Any) -> Any:
        """Answer within ``timeout_s`` or 503, even when Postgres is frozen (``store.deadline``)."""
        return await within(coro, self.timeout_s, "a webhooks call")

    # --- authority --------------------------------------------------------------------------

    @staticmethod
    async def _key_teams(
        conn: AsyncConnection[Row], patterns: Sequence[ScopePattern]
    ) -> dict[str, str | None]:
        names = sorted(keys_named(patterns))
        if not names:
            return {}
        cur = await conn.execute(
            "SELECT key_id, team_id FROM keys WHERE key_id = ANY(%s) AND NOT revoked", (names,)
        )
        return {r["key_id"]: r["team_id"] for r in await cur.fetchall()}

    async def _check(self, conn: AsyncConnection[Row], actor: Principal, scopes: Sequence[Any]) -> None:
        patterns = [p if isinstance(p, ScopePattern) else ScopePattern.parse(p) for p in scopes]
        require(authorize_webhook(actor, patterns, await self._key_teams(conn, patterns)))

    @staticmethod
    def require_manager(actor: Principal) -> None:
        """Viewers and gateways are refused before any lookup (a 404 would leak existence)."""
        require(authorize_webhook(actor, [], {}))

    # --- subscriptions (control plane) ---------------------------------------------------------

    async def put(
        self, actor: Principal, webhook_id: str, spec: WebhookSpec
    ) -> tuple[dict[str, Any], str | None]:
        """Create or change; returns the public view and the secret when this call set one."""
        self.require_manager(actor)
        return cast(
            tuple[dict[str, Any], str | None], await self._bounded(self._put(actor, webhook_id, spec))
        )

    async def _put(
        self, actor: Principal, webhook_id: str, spec: WebhookSpec
    ) -> tuple[dict[str, Any], str | None]:
        async with self._conn(tx=True) as conn:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (webhook_key(webhook_id),)
            )
            cur = await conn.execute("SELECT * FROM webhooks WHERE webhook_id = %s FOR UPDATE", (webhook_id,))
            before = await cur.fetchone()
            if before is not None:  # may the caller touch the webhook as it is now?
                await self._check(conn, actor, before["scopes"])
            await self._check(conn, actor, spec.patterns)
            shown: str | None = None
            if spec.secret is UNSET:
                secret = before["secret"] if before is not None else new_secret()
                shown = secret if before is None else None
            else:
                secret = spec.secret
                changed = before is None or before["secret"] != secret
                shown = secret if changed else None
            scopes = [str(p) for p in spec.patterns]
            after_values = (spec.url, scopes, list(spec.kinds), spec.format, secret)
            if (
                before is not None
                and (
                    before["url"],
                    list(before["scopes"]),
                    list(before["kinds"]),
                    before["format"],
                    before["secret"],
                )
                == after_values
            ):
                return public(before), None
            cur = await conn.execute(
                "INSERT INTO webhooks (webhook_id, url, scopes, kinds, format, secret, created_by)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (webhook_id) DO UPDATE SET"
                " url = EXCLUDED.url, scopes = EXCLUDED.scopes, kinds = EXCLUDED.kinds,"
                " format = EXCLUDED.format, secret = EXCLUDED.secret, updated_at = now() RETURNING *",
                (
                    webhook_id,
                    spec.url,
                    Jsonb(scopes),
                    Jsonb(list(spec.kinds)),
                    spec.format,
                    secret,
                    actor.token_id,
                ),
            )
            after = await cur.fetchone()
            assert after is not None
            await self._audit(conn, actor, "put_webhook", webhook_id, before, after)
            return public(after), shown

    async def get(self, actor: Principal, webhook_id: str) -> dict[str, Any]:
        self.require_manager(actor)
        return cast(dict[str, Any], await self._bounded(self._get(actor, webhook_id)))

    async def _get(self, actor: Principal, webhook_id: str) -> dict[str, Any]:
        async with self._conn() as conn:
            row = await self._existing(conn, actor, webhook_id)
        return public(row)

    async def _existing(
        self, conn: AsyncConnection[Row], actor: Principal, webhook_id: str, lock: str = ""
    ) -> Row:
        cur = await conn.execute(f"SELECT * FROM webhooks WHERE webhook_id = %s {lock}", (webhook_id,))
        row = await cur.fetchone()
        if row is None:
            raise NotFound(f"webhook {webhook_id} does not exist")
        await self._check(conn, actor, row["scopes"])
        return row

    async def delete(self, actor: Principal, webhook_id: str) -> None:
        """Delete it and its deliveries (pending ones are not sent any more)."""
        self.require_manager(actor)
        await self._bounded(self._delete(actor, webhook_id))

    async def _delete(self, actor: Principal, webhook_id: str) -> None:
        async with self._conn(tx=True) as conn:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (webhook_key(webhook_id),)
            )
            before = await self._existing(conn, actor, webhook_id, "FOR UPDATE")
            await conn.execute("DELETE FROM webhooks WHERE webhook_id = %s", (webhook_id,))
            await self._audit(conn, actor, "delete_webhook", webhook_id, before, None)

    async def list_webhooks(
        self, actor: Principal, *, limit: int = 100, after: str | None = None
    ) -> dict[str, Any]:
        """Admins: every webhook. A team admin: those whose scopes lie inside its team."""
        self.require_manager(actor)
        if not 1 <= limit <= MAX_PAGE:
            raise Unprocessable(f"limit: must be between 1 and {MAX_PAGE}", details={"field": "limit"})
        return cast(dict[str, Any], await self._bounded(self._list(actor, limit, after)))

    async def _list(self, actor: Principal, limit: int, after: str | None) -> dict[str, Any]:
        found: list[Row] = []
        cursor = after or ""
        async with self._conn() as conn:
            while len(found) <= limit:
                cur = await conn.execute(
                    "SELECT * FROM webhooks WHERE webhook_id > %s ORDER BY webhook_id LIMIT %s",
                    (cursor, MAX_PAGE),
                )
                rows = await cur.fetchall()
                for row in rows:
                    try:
                        await self._check(conn, actor, row["scopes"])
                    except Forbidden:
                        continue
                    found.append(row)
                if len(rows) < MAX_PAGE:
                    break
                cursor = rows[-1]["webhook_id"]
        more = len(found) > limit
        return {
            "items": [public(r) for r in found[:limit]],
            "next": found[limit - 1]["webhook_id"] if more else None,
        }

    async def deliveries(self, actor: Principal, webhook_id: str, *, limit: int = 50) -> dict[str, Any]:
        """The newest deliveries of a webhook (pending, delivered, failed), newest first."""
        self.require_manager(actor)
        if not 1 <= limit <= MAX_PAGE:
            raise Unprocessable(f"limit: must be between 1 and {MAX_PAGE}", details={"field": "limit"})
        return cast(dict[str, Any], await self._bounded(self._deliveries(actor, webhook_id, limit)))

    async def _deliveries(self, actor: Principal, webhook_id: str, limit: int) -> dict[str, Any]:
        async with self._conn() as conn:
            await self._existing(conn, actor, webhook_id)
            cur = await conn.execute(
                "SELECT * FROM webhook_deliveries WHERE webhook_id = %s ORDER BY id DESC LIMIT %s",
                (webhook_id, limit),
            )
            rows = await cur.fetchall()
        return {"items": [delivery_view(r) for r in rows]}

    @staticmethod
    async def _audit(
        conn: AsyncConnection[Row],
        actor: Principal,
        action: str,
        webhook_id: str,
        before: Row | None,
        after: Row | None,
    ) -> None:
        await conn.execute(
            "INSERT INTO audit (actor, actor_role, action, target, before, after, outbox_id)"
            " VALUES (%s, %s, %s, %s, %s, %s, NULL)",
            (
                actor.token_id,
                actor.role.value,
                action,
                webhook_key(webhook_id),
                _audit_view(before),
                _audit_view(after),
            ),
        )

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
