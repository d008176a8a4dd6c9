"""The store's own failures: what a driver error means for the caller, never the driver's type.

``store.pool.guard`` re-raises psycopg's exceptions as these (or as the rule failures of
``domain.errors`` for a lost race or a value Postgres refuses); ``api.errors`` maps them to 503
and 500.
"""

from __future__ import annotations

from typing import Any

from spendgate.domain.errors import Failure


class DatabaseUnavailable(Failure):
    """Postgres is down, frozen, or the pool is exhausted: the caller may retry."""

    code = "database_unavailable"

    def __init__(
        self, message: str = "the control-plane database is unavailable; retry later", **kw: Any
    ) -> None:
        super().__init__(message, **kw)


class StoreError(Failure):
    """An unexpected database error (a bug or a schema mismatch); logged, never retried."""

    code = "store_error"
