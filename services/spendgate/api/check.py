"""``POST /v1/check`` (the hot path) and ``GET /v1/authorize`` (the same answer as 200 or 429).

The check reads memory only (``GateState``, fed by the follower): a broker outage never makes a
check wait; it makes the answer ``degraded`` once the state is older than
``SPENDGATE_MAX_STALENESS_S`` (or before the gate caught up at start), and then the answer
follows ``SPENDGATE_FAIL_MODE``.
"""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.
from collections.abc import Awaitable, Callable
from typing import Annotated

import orjson
from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from spendgate.api.auth import TokenCache, gate_caller
from spendgate.api.deps import Checker, GateDep
from spendgate.api.errors import Unprocessable, error_responses, response_for
from spendgate.api.gate_service import Gate
from spendgate.api.limits import CONTROL_BODY_LIMIT, RequestGuard, guarded_body, read_capped
from spendgate.domain.authority import Action
from spendgate.domain.check import CheckRequest
from spendgate.domain.money import parse_cost
from spendgate.records import CostUsd, Id

router = APIRouter(prefix="/v1", tags=["gate"], responses=error_responses(400, 401, 403, 413, 415, 422))


class CheckBody(BaseModel):
    """``POST /v1/check``; unknown fields are refused (422)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: Id
    end_user_id: Id | None = None
    model: Id | None = None
    tags: Annotated[list[Id], Field(max_length=64)] = Field(default_factory=list)
    user_id: Id | None = None
    team_id: Id | None = None
    org_id: Id | None = None
    estimated_cost_usd: CostUsd | None = None
    request_id: Id | None = None  # one rule for every id: its hold is released by it in a path
    reserve: bool = Field(False, description="hold estimated_cost_usd for request_id when allowed")
    hold_ttl_s: Annotated[int, Field(ge=1, le=3600)] | None = Field(None, description="default 600")

    @model_validator(mode="after")
    def _reserve_needs_request_and_estimate(self) -> "CheckBody":
        if self.reserve and (not self.request_id or self.estimated_cost_usd is None):
            raise ValueError("reserve needs request_id and estimated_cost_usd")
        return self

    def to_request(self) -> CheckRequest:
        return CheckRequest(
            key_id=self.key_id,
            end_user_id=self.end_user_id,
            model=self.model,
            tags=self.tags,
            user_id=self.user_id,
            team_id=self.team_id,
            org_id=self.org_id,
            estimated_cost_nanos=self.estimated_cost_usd,
        )


CHECK_SCHEMA = CheckBody.model_json_schema(ref_template="#/components/schemas/{model}")


def check_handler(gate: Gate, tokens: TokenCache) -> Callable[[Request], Awaitable[Response]]:
    """``POST /v1/check``: the hot path.

    The body is parsed by the model straight from bytes and the answer written with orjson.
    Served as a FastAPI route (OpenAPI, tests) and, in ``spendgate api``, by
    :func:`with_check_fast_path` ahead of the framework's middleware stack.
    """

    async def post_check(request: Request) -> Response:
        gate_caller(request, tokens, Action.CHECK)
        raw = guarded_body(request.scope)
        if raw is None:  # no body announced, or no guard in front
            raw = await read_capped(request, CONTROL_BODY_LIMIT)
        try:
            body = CheckBody.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_url=False)]
            ) from None
        if body.reserve and gate.holds is not None:
            assert body.request_id is not None  # the model requires it with reserve
            result, lag = gate.holds.reserve(gate, body.to_request(), body.request_id, body.hold_ttl_s)
        else:
            result, lag = gate.judge(body.to_request())
        return Response(orjson.dumps(result.to_json(lag)), media_type="application/json")

    return post_check


def with_check_fast_path(app: ASGIApp, handler: Callable[[Request], Awaitable[Response]]) -> ASGIApp:
    """Answer ``POST /v1/check`` with ``handler`` directly; everything else goes to ``app``.

    Why: at 2,000 checks/s on one core most of a check's time was Starlette/FastAPI routing and
    middleware, not the check. Same guard (auth before the body, caps, content type), same
    handler, same error envelope (``response_for``).
    """

    async def check(scope: AsgiScope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except Exception as exc:  # noqa: BLE001 - mapped to the envelope like the app does
            response = await response_for(request, exc)
        await response(scope, receive, send)

    guarded = RequestGuard(check, app.state.tokens.authenticate)  # type: ignore[attr-defined]

    async def asgi(scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/check" and scope["method"] == "POST":
            await guarded(scope, receive, send)
            return
        await app(scope, receive, send)

    return asgi


def check_route(handler: Callable[[Request], Awaitable[Response]]) -> APIRouter:
    """``POST /v1/check`` served by ``handler`` (built once per app by :func:`check_handler`)."""
    route = APIRouter(prefix="/v1", tags=["gate"], responses=error_responses(400, 401, 403, 413, 415, 422))
    route.add_api_route(
        "/check",
        handler,
        methods=["POST"],
        summary="May this request run? (memory only; never waits on the broker)",
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": CHECK_SCHEMA}}}
        },
    )
    return route


@router.get("/authorize", summary="Like /v1/check for gateways that read status codes: 200 or 429")
async def get_authorize(
    _: Checker,
    gate: GateDep,
    key_id: Annotated[str, Query(min_length=1, max_length=256)],
    end_user_id: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    model: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    tags: Annotated[str | None, Query(description="comma-separated")] = None,
    user_id: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    team_id: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    org_id: Annotated[str | None, Query(min_length=1, max_length=256)] = None,
    estimated_cost_usd: str | None = None,
) -> Response:
    tag_list = tuple(t for t in (tags or "").split(",") if t)
    if len(tag_list) > 64 or any(len(t) > 256 for t in tag_list):
        raise Unprocessable("tags: at most 64 tags of at most 256 characters", details={"field": "tags"})
    estimate = None
    if estimated_cost_usd is not None:
        estimate = parse_cost(estimated_cost_usd, field="estimated_cost_usd")
    request = CheckRequest(key_id, end_user_id, model, tag_list, user_id, team_id, org_id, estimate)
    result, lag = gate.judge(request)
    headers = {}
    if not result.allowed and result.retry_after_s is not None:
        headers["Retry-After"] = str(result.retry_after_s)
    return JSONResponse(result.to_json(lag), status_code=200 if result.allowed else 429, headers=headers)
