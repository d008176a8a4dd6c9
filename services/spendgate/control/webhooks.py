"""The rules of alert webhooks: who may manage which, secrets, no-op PUTs, what a listing shows.

Over a unit of work of ``store.webhooks`` (or a fake in tests), like ``control.service``: the
store only reads and writes rows. A webhook's secret is shown once, when a call sets it, and
never kept in the audit log or any answer (``secret_set`` instead).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from typing import Any, Protocol

from spendgate.domain.authority import Principal, require
from spendgate.domain.errors import Forbidden, NotFound, Unprocessable
from spendgate.domain.webhooks import ScopePattern, authorize_webhook, keys_named
from spendgate.domain.windows import rfc3339
from spendgate.store.deadline import bounded_methods
from spendgate.store.webhooks import UNSET, Row, WebhookSpec

MAX_PAGE = 1000
SCAN = 1000  # rows read per round while filtering a listing by what the caller may see


class WebhookUnitOfWork(Protocol):
    async def lock(self, webhook_id: str) -> Row | None: ...
    async def get(self, webhook_id: str) -> Row | None: ...
    async def key_teams(self, key_ids: Sequence[str]) -> dict[str, str | None]: ...
    async def save(self, webhook_id: str, values: dict[str, Any], created_by: str) -> Row: ...
    async def delete(self, webhook_id: str) -> None: ...
    async def audit(
        self,
        actor: Principal,
        action: str,
        webhook_id: str,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> None: ...
    async def after(self, webhook_id: str, size: int) -> list[Row]: ...
    async def deliveries(self, webhook_id: str, limit: int) -> list[Row]: ...


class WebhookStorePort(Protocol):
    def begin(self) -> AbstractAsyncContextManager[WebhookUnitOfWork]: ...
    def read(self) -> AbstractAsyncContextManager[WebhookUnitOfWork]: ...


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def webhook_view(row: Row) -> dict[str, Any]:
    """The API view of a webhook: never its secret."""
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


def audit_view(row: Row | None) -> dict[str, Any] | None:
    """What the audit log keeps of a webhook: its view without the timestamps."""
    if row is None:
        return None
    view = webhook_view(row)
    del view["created_at"], view["updated_at"]
    return view


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


def require_manager(actor: Principal) -> None:
    """Viewers and gateways are refused before any lookup (a 404 would leak existence)."""
    require(authorize_webhook(actor, [], {}))


@bounded_methods
class WebhookService:
    """Subscriptions as a principal may manage them; every public method answers within ``timeout_s``."""

    def __init__(self, store: WebhookStorePort, *, timeout_s: float = 5.0) -> None:
        self.store = store
        self.timeout_s = timeout_s

    async def put(
        self, actor: Principal, webhook_id: str, spec: WebhookSpec
    ) -> tuple[dict[str, Any], str | None]:
        """Create or change; returns the view and the secret when this call set one."""
        require_manager(actor)
        async with self.store.begin() as uow:
            before = await uow.lock(webhook_id)
            if before is not None:  # may the caller touch the webhook as it is now?
                await _check(uow, actor, before["scopes"])
            await _check(uow, actor, spec.patterns)
            secret, shown = _secret_of(spec, before)
            values = {
                "url": spec.url,
                "scopes": [str(p) for p in spec.patterns],
                "kinds": list(spec.kinds),
                "format": spec.format,
                "secret": secret,
            }
            if before is not None and all(_same(before[k], v) for k, v in values.items()):
                return webhook_view(before), None
            after = await uow.save(webhook_id, values, actor.token_id)
            await uow.audit(actor, "put_webhook", webhook_id, audit_view(before), audit_view(after))
            return webhook_view(after), shown

    async def get(self, actor: Principal, webhook_id: str) -> dict[str, Any]:
        require_manager(actor)
        async with self.store.read() as uow:
            return webhook_view(await _existing(uow, actor, webhook_id))

    async def delete(self, actor: Principal, webhook_id: str) -> None:
        """Delete it and its deliveries (pending ones are not sent any more)."""
        require_manager(actor)
        async with self.store.begin() as uow:
            before = await _existing(uow, actor, webhook_id, lock=True)
            await uow.delete(webhook_id)
            await uow.audit(actor, "delete_webhook", webhook_id, audit_view(before), None)

    async def list_webhooks(
        self, actor: Principal, *, limit: int = 100, after: str | None = None
    ) -> dict[str, Any]:
        """Admins: every webhook. A team admin: those whose scopes lie inside its team."""
        require_manager(actor)
        _check_limit(limit)
        found: list[Row] = []
        cursor = after or ""
        async with self.store.read() as uow:
            while len(found) <= limit:
                rows = await uow.after(cursor, SCAN)
                for row in rows:
                    try:
                        await _check(uow, actor, row["scopes"])
                    except Forbidden:
                        continue
                    found.append(row)
                if len(rows) < SCAN:
                    break
                cursor = rows[-1]["webhook_id"]
        more = len(found) > limit
        return {
            "items": [webhook_view(r) for r in found[:limit]],
            "next": found[limit - 1]["webhook_id"] if more else None,
        }

    async def deliveries(self, actor: Principal, webhook_id: str, *, limit: int = 50) -> dict[str, Any]:
        """The newest deliveries of a webhook (pending, delivered, failed), newest first."""
        require_manager(actor)
        _check_limit(limit)
        async with self.store.read() as uow:
            await _existing(uow, actor, webhook_id)
            rows = await uow.deliveries(webhook_id, limit)
        return {"items": [delivery_view(r) for r in rows]}


async def _check(uow: WebhookUnitOfWork, actor: Principal, scopes: Sequence[Any]) -> None:
    patterns = [p if isinstance(p, ScopePattern) else ScopePattern.parse(p) for p in scopes]
    names = sorted(keys_named(patterns))
    require(authorize_webhook(actor, patterns, await uow.key_teams(names) if names else {}))


async def _existing(uow: WebhookUnitOfWork, actor: Principal, webhook_id: str, *, lock: bool = False) -> Row:
    row = await (uow.lock(webhook_id) if lock else uow.get(webhook_id))
    if row is None:
        raise NotFound(f"webhook {webhook_id} does not exist")
    await _check(uow, actor, row["scopes"])
    return row


def _secret_of(spec: WebhookSpec, before: Row | None) -> tuple[str | None, str | None]:
    """(the secret to keep, the secret to show once): a new webhook without one gets one made."""
    if spec.secret is UNSET:
        secret = before["secret"] if before is not None else new_secret()
        return secret, secret if before is None else None
    changed = before is None or before["secret"] != spec.secret
    return spec.secret, spec.secret if changed else None


def _same(stored: Any, value: Any) -> bool:
    return (list(stored) if isinstance(stored, list | tuple) else stored) == value


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise Unprocessable(f"limit: must be between 1 and {MAX_PAGE}", details={"field": "limit"})


def _iso(value: datetime | None) -> str | None:
    return None if value is None else rfc3339(value)
