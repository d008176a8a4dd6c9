"""Domain errors: each names what the caller must do with the input (reject it)."""

from __future__ import annotations


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
