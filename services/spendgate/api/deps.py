"""What a control-plane route may ask for, as ``Annotated`` dependencies (one home).

Everything comes from ``app.state``, which ``install_control_plane`` (called by ``create_app``)
fills: the routes are module-level and hold no references of their own.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request, Response

from spendgate.adapters.usage_producer import UsageProducer
from spendgate.api.auth import gate_caller, principal_of
from spendgate.api.gate_service import Gate
from spendgate.api.visibility import WriteVisibility
from spendgate.control.service import ControlService
from spendgate.domain.authority import Action, Principal

VERSION_HEADER = "Spendgate-Version"


async def _caller(request: Request) -> Principal:
    return principal_of(request, request.app.state.tokens)


async def _checker(request: Request) -> Principal:
    """A caller allowed to check (gateway or admin)."""
    return gate_caller(request, request.app.state.tokens, Action.CHECK)


async def _ingester(request: Request) -> Principal:
    """A caller allowed to send usage events and release holds (gateway or admin)."""
    return gate_caller(request, request.app.state.tokens, Action.INGEST)


def _gate(request: Request) -> Gate:
    gate: Gate = request.app.state.gate
    return gate


def _producer(request: Request) -> UsageProducer:
    producer: UsageProducer = request.app.state.producer
    return producer


def _control(request: Request) -> ControlService:
    control: ControlService = request.app.state.control
    return control


class Writes:
    """How a write answers: once its change is visible (read-your-writes, CONTRACT §4), naming
    the change's version in the ``Spendgate-Version`` header."""

    def __init__(self, visibility: WriteVisibility | None) -> None:
        self.visibility = visibility

    async def visible(self, response: Response, version: int) -> None:
        response.headers[VERSION_HEADER] = str(version)
        if self.visibility is not None:
            await self.visibility.wait(version)

    async def deleted(self, version: int) -> Response:
        response = Response(status_code=204)
        await self.visible(response, version)
        return response


def _writes(request: Request) -> Writes:
    return Writes(getattr(request.app.state, "visibility", None))


Caller = Annotated[Principal, Depends(_caller)]
Checker = Annotated[Principal, Depends(_checker)]
Ingester = Annotated[Principal, Depends(_ingester)]
GateDep = Annotated[Gate, Depends(_gate)]
Producer = Annotated[UsageProducer, Depends(_producer)]
Control = Annotated[ControlService, Depends(_control)]
Written = Annotated[Writes, Depends(_writes)]
Limit = Annotated[int, Query(ge=1, le=1000, description="page size")]
After = Annotated[str | None, Query(description="the `next` cursor of the previous page")]
