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
