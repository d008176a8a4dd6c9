"""The adapters' own failures: what a broker outage means for the caller, never aiokafka's types."""

from __future__ import annotations

from typing import Any

from spendgate.domain.errors import Failure


class BrokerUnavailable(Failure):
    """The broker did not acknowledge in time: retry the whole batch later (``api.errors``: 503)."""

    code = "broker_unavailable"

    def __init__(self, message: str = "the broker did not acknowledge the events; retry", **kw: Any) -> None:
        super().__init__(message, **kw)
