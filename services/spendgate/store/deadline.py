"""Answer within a deadline even when Postgres is frozen.

Why a task of its own: a frozen Postgres (SIGSTOP) keeps its sockets open, so no driver or pool
timeout fires, and cancelling psycopg mid-query waits for the server's answer to the cancel (up
to 10 s) before closing the connection. The caller gets ``DatabaseUnavailable`` (503) at the
bound; the abandoned call is cancelled and finishes in the background. A transaction is atomic,
so a write answered 503 was either applied whole (if its COMMIT had already reached the server)
or not at all; every write is idempotent, so the client just repeats it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from spendgate.background import abandon
from spendgate.store.errors import DatabaseUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

_abandoned: set[asyncio.Future[Any]] = set()  # calls answered 503, still finishing


async def within(call: Awaitable[T], timeout_s: float, what: str) -> T:
    """``await call``, or raise ``DatabaseUnavailable`` after ``timeout_s`` (module docstring)."""
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if task in done:
        return task.result()
    abandon(task, _abandoned)
    log.warning("postgres did not answer %s within %.1fs", what, timeout_s)
    raise DatabaseUnavailable(
        f"the control-plane database did not answer within {timeout_s:g}s; retry later"
        " (the change was applied whole or not at all; repeating it is safe)"
    )


C = TypeVar("C", bound=type)


def bounded_methods(cls: C) -> C:
    """Make every public coroutine method of ``cls`` answer within ``self.timeout_s`` (503 past it)."""
    for name, method in list(vars(cls).items()):
        if not name.startswith("_") and inspect.iscoroutinefunction(method):
            setattr(cls, name, _bounded(method))
    return cls


def _bounded(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(method)
    async def run(self: Any, *args: Any, **kwargs: Any) -> T:
        return await within(method(self, *args, **kwargs), self.timeout_s, method.__name__)

    return run
