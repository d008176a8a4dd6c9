"""Postgres connections for the control plane, and the one place driver errors are translated.

Driver exceptions never leave the store: Postgres down or the pool exhausted raise
``store.errors.DatabaseUnavailable``, a lost race on a foreign or unique key ``Conflict``, a
value Postgres refuses (``DataError``, unencodable text) ``Unprocessable``, anything else from
the driver ``StoreError``. Which HTTP status each one is, ``api.errors`` alone decides.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from spendgate.domain.errors import Conflict, Failure, Unprocessable
from spendgate.store.errors import DatabaseUnavailable, StoreError

log = logging.getLogger(__name__)

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
