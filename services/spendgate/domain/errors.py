"""Domain errors: each names what the caller must do with the input (reject it)."""

from __future__ import annotations

from typing import Any


class InvalidInput(ValueError):
    """The input is wrong and retrying it unchanged will fail again: reject it (4xx / DLQ).

    ``field`` names the offending field (dotted path) when there is one.
    """

    def __init__(self, reason: str, *, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field

    def at(self, prefix: str) -> InvalidInput:
        """The same error with ``prefix`` prepended to its field path."""
        return InvalidInput(self.reason, field=f"{prefix}.{self.field}" if self.field else prefix)


class Failure(Exception):
    """A request the service will not carry out, named by a stable ``code`` (CONTRACT §4).

    Raised by the rules and the store; the API alone chooses the HTTP status (``api.errors``).
    ``details`` is what a client needs to act (e.g. ``{"field": ...}``).
    """

    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class NotFound(Failure):
    code = "not_found"


class Conflict(Failure):
    """The request collides with the current state (a team that still has keys, a race lost)."""

    code = "conflict"


class Forbidden(Failure):
    """The caller's authority does not cover the request (``domain.authority.Denied``)."""

    code = "forbidden"


class Unprocessable(Failure):
    """A value the request names is wrong in context (an org that does not exist, a page size)."""

    code = "invalid"
