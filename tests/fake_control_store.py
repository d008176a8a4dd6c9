"""An in-memory ``control.ports.ControlStore``: the control plane's rules tested without Postgres.

A unit of work edits a copy of the rows and the store takes the copy only when the block ends
without raising, so a refused change leaves nothing behind, as a rolled-back transaction.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from pydantic import BaseModel

from spendgate.domain.authority import Principal
from spendgate.domain.scopes import Scope, ScopeKind
from spendgate.records import (
    AnyConfigRecord,
    BudgetRecord,
    KeyRecord,
    TokenRecord,
    config_ids,
    config_key_of,
    public,
)
from spendgate.store.control import Page

R = TypeVar("R", bound=AnyConfigRecord)
Rows = dict[tuple[type[BaseModel], tuple[str, ...]], Any]


class FakeUnitOfWork:
    def __init__(self, store: FakeControlStore, actor: Principal | None) -> None:
        self.store, self.actor = store, actor
        self.rows: Rows = dict(store.rows)
        self.outbox: list[tuple[int, str, str | None]] = []
        self.audit_rows: list[dict[str, Any]] = []
        self.changes: list[tuple[str, AnyConfigRecord | None]] = []

    async def lock(self, kind: type[R], *ids: str) -> R | None:
        assert self.actor is not None
        return await self.get(kind, *ids)

    async def get(self, kind: type[R], *ids: str) -> R | None:
        record: R | None = self.rows.get((kind, ids))
        return record

    def _of(self, kind: type[BaseModel]) -> list[Any]:
        return sorted((r for (k, _), r in self.rows.items() if k is kind), key=config_ids)

    async def ids_of(
        self, kind: type[BaseModel], column: str, value: str, limit: int | None = None
    ) -> list[str]:
        live = [r for r in self._of(kind) if getattr(r, column) == value and not getattr(r, "revoked", False)]
        return [config_ids(r)[-1] for r in live][:limit]

    async def key_has_budget(self, key_id: str) -> bool:
        scopes = (Scope.parse(r.scope) for r in self._of(BudgetRecord))
        return any(s.kind in (ScopeKind.KEY, ScopeKind.KEY_MODEL) and s.parts[0] == key_id for s in scopes)

    async def page(
        self, kind: type[R], *, after: str | None, limit: int, team_id: str | None = None
    ) -> Page[R]:
        records = [r for r in self._of(kind) if config_ids(r)[-1] > (after or "")]
        if team_id is not None:
            records = [r for r in records if getattr(r, "team_id", None) == team_id]
        more = len(records) > limit
        return Page(records[:limit], config_ids(records[limit - 1])[-1] if more else None)

    async def every(self, kind: type[R]) -> list[R]:
        return self._of(kind)

    async def audit(self, *, after: int | None, limit: int) -> Page[dict[str, Any]]:
        rows = [r for r in self.store.audit_rows if r["id"] > (after or 0)]
        return Page(rows[:limit], str(rows[limit - 1]["id"]) if len(rows) > limit else None)

    async def next_version(self) -> int:
        self.store.sequence += 1  # a sequence: never rolled back, as Postgres's
        return self.store.sequence

    async def save(self, record: AnyConfigRecord) -> None:
        self.rows[(type(record), config_ids(record))] = record

    async def delete(self, record: AnyConfigRecord) -> None:
        del self.rows[(type(record), config_ids(record))]

    async def emit(self, action: str, before: AnyConfigRecord | None, after: AnyConfigRecord | None) -> int:
        assert self.actor is not None
        entity = after if after is not None else before
        assert entity is not None
        key = config_key_of(entity)
        version = after.version if after is not None else await self.next_version()
        self.outbox.append((version, key, after.model_dump_json() if after else None))
        self.audit_rows.append(
            {
                "id": version,
                "actor": self.actor.token_id,
                "action": action,
                "target": key,
                "before": public(before),
                "after": public(after),
            }
        )
        self.changes.append((key, after))
        return version


class FakeControlStore:
    def __init__(self) -> None:
        self.rows: Rows = {}
        self.outbox: list[tuple[int, str, str | None]] = []
        self.audit_rows: list[dict[str, Any]] = []
        self.sequence = 0

    @asynccontextmanager
    async def begin(self, actor: Principal) -> AsyncIterator[FakeUnitOfWork]:
        uow = FakeUnitOfWork(self, actor)
        yield uow
        self.rows = uow.rows  # commit
        self.outbox += uow.outbox
        self.audit_rows += uow.audit_rows

    @asynccontextmanager
    async def read(self) -> AsyncIterator[FakeUnitOfWork]:
        yield FakeUnitOfWork(self, None)

    async def ping(self) -> None:
        return None

    def tokens(self) -> list[TokenRecord]:
        return [r for (k, _), r in self.rows.items() if k is TokenRecord]

    def key(self, key_id: str) -> KeyRecord | None:
        record: KeyRecord | None = self.rows.get((KeyRecord, (key_id,)))
        return record


class FakeWebhookUnitOfWork:
    """``control.webhooks.WebhookUnitOfWork`` over dicts; committed by ``FakeWebhookStore.begin``."""

    def __init__(self, store: FakeWebhookStore) -> None:
        self.store = store
        self.rows: dict[str, dict[str, Any]] = {k: dict(v) for k, v in store.rows.items()}
        self.audit_rows: list[dict[str, Any]] = []

    async def lock(self, webhook_id: str) -> dict[str, Any] | None:
        return self.rows.get(webhook_id)

    async def get(self, webhook_id: str) -> dict[str, Any] | None:
        return self.rows.get(webhook_id)

    async def key_teams(self, key_ids: Any) -> dict[str, str | None]:
        return {k: self.store.key_teams[k] for k in key_ids if k in self.store.key_teams}

    async def save(self, webhook_id: str, values: dict[str, Any], created_by: str) -> dict[str, Any]:
        self.rows[webhook_id] = {"webhook_id": webhook_id, **values, "created_by": created_by}
        return self.rows[webhook_id]

    async def delete(self, webhook_id: str) -> None:
        del self.rows[webhook_id]

    async def audit(self, actor: Principal, action: str, webhook_id: str, before: Any, after: Any) -> None:
        self.audit_rows.append({"action": action, "target": webhook_id, "before": before, "after": after})

    async def after(self, webhook_id: str, size: int) -> list[dict[str, Any]]:
        return [self.rows[k] for k in sorted(self.rows) if k > webhook_id][:size]

    async def deliveries(self, webhook_id: str, limit: int) -> list[dict[str, Any]]:
        return []


class FakeWebhookStore:
    def __init__(self, key_teams: dict[str, str | None] | None = None) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.audit_rows: list[dict[str, Any]] = []
        self.key_teams = key_teams or {}

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[FakeWebhookUnitOfWork]:
        uow = FakeWebhookUnitOfWork(self)
        yield uow
        self.rows, self.audit_rows = uow.rows, self.audit_rows + uow.audit_rows

    @asynccontextmanager
    async def read(self) -> AsyncIterator[FakeWebhookUnitOfWork]:
        yield FakeWebhookUnitOfWork(self)
