"""What the control-plane service needs from a store: units of work (Postgres, or a fake in tests)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel

from spendgate.domain.authority import Principal
from spendgate.records import AnyConfigRecord
from spendgate.store.control import Page

R = TypeVar("R", bound=AnyConfigRecord)

KeyActivity = Callable[[str], bool | None]
"""Whether key K has recorded spend as this API's gate knows it (``None``: not caught up yet)."""


class UnitOfWork(Protocol):
    """One transaction: reads see, and writes commit, all or nothing.

    ``changes`` lists ``(config key, record or None)`` of every ``emit``, announced after commit.
    """

    changes: list[tuple[str, AnyConfigRecord | None]]

    async def lock(self, kind: type[R], *ids: str) -> R | None: ...
    async def get(self, kind: type[R], *ids: str) -> R | None: ...
    async def ids_of(
        self, kind: type[BaseModel], column: str, value: str, limit: int | None = None
    ) -> list[str]: ...
    async def key_has_budget(self, key_id: str) -> bool: ...
    async def page(
        self, kind: type[R], *, after: str | None, limit: int, team_id: str | None = None
    ) -> Page[R]: ...
    async def every(self, kind: type[R]) -> list[R]: ...
    async def audit(self, *, after: int | None, limit: int) -> Page[dict[str, Any]]: ...
    async def next_version(self) -> int: ...
    async def save(self, record: AnyConfigRecord) -> None: ...
    async def delete(self, record: AnyConfigRecord) -> None: ...
    async def emit(
        self, action: str, before: AnyConfigRecord | None, after: AnyConfigRecord | None
    ) -> int: ...


class ControlStore(Protocol):
    def begin(self, actor: Principal) -> AbstractAsyncContextManager[UnitOfWork]: ...
    def read(self) -> AbstractAsyncContextManager[UnitOfWork]: ...
    async def ping(self) -> None: ...
