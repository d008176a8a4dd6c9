"""Gate routes (CONTRACT §4): check, authorize, ingest usage events, read spend, health.

Routes are parse -> domain -> render. The check path reads memory only (``GateState``, fed by the
follower): a broker outage never makes a check wait; it makes the answer ``degraded`` once the
state is older than ``SPENDGATE_MAX_STALENESS_S`` (or before the gate caught up at start), and
then the answer follows ``SPENDGATE_FAIL_MODE``.

``POST /v1/events`` is the one route that talks to the broker: it answers 202 only after every
valid event was acknowledged with ``acks=all``; when the broker does not acknowledge them in time
it answers 503 and the gateway retries the whole batch (events are deduplicated by ``event_id``).
"""

# No "from __future__ import annotations": FastAPI must see the route-local Annotated aliases.
import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Annotated, Any, Literal, Protocol
from urllib.parse import unquote

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from spendgate.api.auth import TokenCache, gate_dependency, principal_dependency
from spendgate.api.errors import (
    ApiError,
    BadRequest,
    Unprocessable,
    describe_errors,
    error_responses,
    response_for,
)
from spendgate.api.holds import Holds
from spendgate.api.limits import CONTROL_BODY_LIMIT, EVENTS_BODY_LIMIT, RequestGuard, guarded_body
from spendgate.api.metrics import GateMetrics
from spendgate.api.paths import scope_in_path
from spendgate.background import abandon
from spendgate.domain.authority import (
    Action,
    BudgetTarget,
    GateTarget,
    Principal,
    Role,
    authorize,
    require,
)
from spendgate.domain.check import CheckRequest, CheckResult, check, degraded, scope_bindings
from spendgate.domain.errors import InvalidInput
from spendgate.domain.gate_state import GateState, is_current
from spendgate.domain.money import format_usd, parse_cost
from spendgate.domain.scopes import Scope, ScopeKind, encode_id
from spendgate.domain.windows import iso, window_bounds
from spendgate.records import CostUsd, Id, UsageEvent
from spendgate.settings import FailMode, Settings

log = logging.getLogger(__name__)

MAX_EVENTS = 1000
EVENTS_ACK_TIMEOUT_S = 5.0


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class BrokerUnavailable(ApiError):
    """The broker did not acknowledge the events in time: retry the whole batch later (503)."""

    status, code = 503, "broker_unavailable"

    def __init__(self, message: str = "the broker did not acknowledge the events; retry", **kw: Any) -> None:
        kw.setdefault("headers", {"Retry-After": "1"})
        super().__init__(message, **kw)


class EventResult(BaseModel):
    index: int
    status: Literal["accepted", "rejected"]
    event_id: str | None = Field(None, description="for an accepted event")
    errors: list[dict[str, Any]] | None = Field(None, description="for a rejected event: field and reason")


class EventsResult(BaseModel):
    """The answer of ``POST /v1/events`` (202 all accepted, 207 mixed)."""

    accepted: int
    rejected: int
    results: list[EventResult]


def document_events_body(spec: dict[str, Any]) -> dict[str, Any]:
    """Describe ``POST /v1/events``' body in ``spec`` (the route reads it raw, to answer per index).

    The body is an array of 1 to ``MAX_EVENTS`` usage events (CONTRACT §2); their schemas go
    into ``components`` like every other model's.
    """
    event = UsageEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(event.pop("$defs", {}))
    schemas["UsageEvent"] = event
    item = {"$ref": "#/components/schemas/UsageEvent"}
    body = {"type": "array", "minItems": 1, "maxItems": MAX_EVENTS, "items": item}
    spec["paths"]["/v1/events"]["post"]["requestBody"] = {
        "required": True,
        "content": {"application/json": {"schema": body}},
    }
    return spec


class FollowerStatus(Protocol):
    @property
    def ready(self) -> bool: ...

    def state_lag_ms(self, now: float | None = None) -> int | None: ...


class Gate:
    """The check service: the materialized state, how fresh it is, and the fail mode."""

    holds: "Holds | None" = None  # reserving checks (api.holds); set by the app factory

    def __init__(
        self,
        state: GateState,
        follower: FollowerStatus,
        settings: Settings,
        metrics: GateMetrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.follower = follower
        self.metrics = metrics
        self.clock = clock
        self.fail_open = settings.fail_mode == FailMode.OPEN
        self.fail_mode = str(settings.fail_mode)
        self.max_lag_ms = settings.max_staleness_s * 1000
        self._started = time.monotonic()

    def lag_ms(self) -> int:
        lag = self.follower.state_lag_ms()
        return int((time.monotonic() - self._started) * 1000) if lag is None else lag

    def key_activity(self, key_id: str) -> bool | None:
        """Whether key K has recorded spend (a state or decision record of ``key:K``), as far as
        this gate knows; ``None`` before it caught up. A fact for authority (claiming keys)."""
        if not self.follower.ready:
            return None
        scope = f"key:{encode_id(key_id)}"
        return scope in self.state.states or scope in self.state.decisions

    def judge(self, request: CheckRequest) -> tuple[CheckResult, int]:
        """The answer to ``request`` and the state lag it was based on (ms)."""
        started = time.perf_counter()
        lag = self.lag_ms()
        reason = None
        if not self.follower.ready:
            reason = "not_ready"
        elif lag > self.max_lag_ms:
            reason = "stale"
        if reason == "stale" and self.fail_open:
            # Fail open means "don't deny for want of news", not "forget blocks we know of":
            # a scope held blocked in memory stays blocked (no silent bypass; seed 001 in
            # docs/FAILURE-MODES.md).
            result = replace(check(request, self.state, self.clock()), degraded=True)
            self.metrics.degraded.labels(reason, self.fail_mode).inc()
        elif reason is not None:
            result = degraded(self.fail_open)
            self.metrics.degraded.labels(reason, self.fail_mode).inc()
        else:
            result = check(request, self.state, self.clock())
        self.metrics.check_latency.observe(time.perf_counter() - started)
        self.metrics.checks.labels("allowed" if result.allowed else "blocked").inc()
        return result, lag


class UsageProducer:
    """Produces usage events to ``{prefix}usage`` (acks=all); starts lazily, reconnects after errors.

    Raises ``BrokerUnavailable`` when the broker does not acknowledge within ``timeout_s``
    (``SPENDGATE_DEPENDENCY_TIMEOUT_S``); aiokafka exceptions do not escape. The bound covers
    everything a request waits for: the start lock, the producer's start and metadata, the
    acknowledgements. Why the work runs in a task of its own: cancelling aiokafka against a
    frozen broker (and stopping the producer) can itself take its request timeout (40 s), so a
    timed-out send is abandoned to finish or fail in the background while the request answers.
    """

    def __init__(
        self, factory: Callable[[], AIOKafkaProducer], topic: str, timeout_s: float = EVENTS_ACK_TIMEOUT_S
    ):
        self._factory = factory
        self.topic = topic
        self._timeout_s = timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._abandoned: set[asyncio.Future[Any]] = set()

    async def _get(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = self._factory()
                try:
                    await asyncio.wait_for(producer.start(), self._timeout_s)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def send_all(self, records: list[tuple[bytes, bytes]]) -> None:
        """Send ``(key, value)`` records and wait until the broker acknowledged every one."""
        task = asyncio.create_task(self._send_all(records), name="usage-send")
        try:
            done, _ = await asyncio.wait({task}, timeout=self._timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done and task.exception() is None:
            return
        if task in done:
            exc: BaseException | None = task.exception()
        else:
            exc = TimeoutError(f"no acknowledgement within {self._timeout_s:g}s")
            abandon(task, self._abandoned)
        if not isinstance(exc, KafkaError | TimeoutError | OSError):
            raise exc  # type: ignore[misc]  # a bug, not an outage: the 500 handler logs it
        log.warning("events: broker did not acknowledge %d records: %r", len(records), exc)
        producer, self._producer = self._producer, None  # the next request starts a fresh one
        if producer is not None:
            abandon(
                asyncio.create_task(_stop_quietly(producer), name="usage-producer-stop"),
                self._abandoned,
                cancel=False,
            )
        raise BrokerUnavailable(
            f"the broker did not acknowledge the events within {self._timeout_s:g}s; retry the"
            " batch with the same event ids (an event may already be counted, never twice)"
        ) from None


    async def _send_all(self, records: list[tuple[bytes, bytes]]) -> None:
        producer = await self._get()
        futures = [await producer.send(self.topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_quietly(producer)

    async def close(self, timeout_s: float = 10.0) -> None:
        """At shutdown: stop the producer and the abandoned sends, waiting at most ``timeout_s``."""
        pending = {*self._abandoned, asyncio.create_task(self.stop())}
        await asyncio.wait(pending, timeout=timeout_s)


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    with contextlib.suppress(Exception):
        await producer.stop()


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


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body: larger than {limit} bytes", details={"field": "body"})
    chunks = bytearray()
    async for chunk in request.stream():
        chunks.extend(chunk)
        if len(chunks) > limit:
            raise PayloadTooLarge(f"body: larger than {limit} bytes", details={"field": "body"})
    return bytes(chunks)


def _errors_of(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {"field": e["field"], "message": e["message"]} for e in describe_errors(exc.errors(), whole="event")
    ]


def spend_view(scope: str, state: GateState, now: float) -> dict[str, Any]:
    """``GET /v1/spend/{scope}``: every budget window plus ``total``, from the materialized state."""
    budget = state.budgets.get(scope)
    held = state.states.get(scope)
    reserved = state.held(scope, now)  # what holds keep: counted in every current window
    windows: list[dict[str, Any]] = []
    seen: set[str] = set()

    def add(window: str, spend: int, limit: int | None, soft: int | None, resets: str | None) -> None:
        seen.add(window)
        windows.append(
            {
                "window": window,
                "spend_usd": format_usd(spend),
                "limit_usd": None if limit is None else format_usd(limit),
                "remaining_usd": None if limit is None else format_usd(max(0, limit - spend - reserved)),
                "soft_usd": None if soft is None else format_usd(soft),
                "reserved_usd": format_usd(reserved),
                "resets_at": resets,
            }
        )

    for lim in budget.limits if budget else ():
        current = state.current_window(scope, lim.window, now)
        if current is not None:
            add(lim.window, current.spend, lim.max_nanos, lim.soft_nanos, current.resets_at_text)
        else:
            resets = None if lim.spec.is_total else iso(window_bounds(lim.spec, int(now), budget.zone)[1])  # type: ignore[union-attr]
            add(lim.window, 0, lim.max_nanos, lim.soft_nanos, resets)
    for w in held.windows if held else ():
        if w.window not in seen and is_current(w, now):
            add(w.window, w.spend, None, None, w.resets_at_text)
    if "total" not in seen:
        add("total", 0, None, None, None)
    blocked = bool(scope_bindings(scope, state.decisions.get(scope), budget, held, now, None, reserved))
    if not blocked and scope.startswith("key:"):
        key = state.registry.keys.get(unquote(scope[4:]))
        blocked = key is not None and key.revoked  # every check of a revoked key is denied
    return {"scope": scope, "blocked": blocked, "windows": windows}


CHECK_SCHEMA = CheckBody.model_json_schema(ref_template="#/components/schemas/{model}")


def check_handler(gate: Gate, tokens: TokenCache) -> Callable[[Request], Awaitable[Response]]:
    """``POST /v1/check``: the hot path.

    The body is parsed by the model straight from bytes and the answer written with orjson.
    Served as a FastAPI route (OpenAPI, tests) and, in ``spendgate api``, by
    :func:`with_check_fast_path` ahead of the framework's middleware stack.
    """
    check_caller = gate_dependency(tokens, Action.CHECK)

    async def post_check(request: Request) -> Response:
        await check_caller(request)
        raw = guarded_body(request.scope)
        if raw is None:  # no body announced, or no guard in front
            raw = await _read_capped(request, CONTROL_BODY_LIMIT)
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


def gate_router(
    gate: Gate,
    tokens: TokenCache,
    producer: UsageProducer,
    post_check: Callable[[Request], Awaitable[Response]],
) -> APIRouter:
    """The gate routes under ``/v1`` (check, authorize, events, spend)."""
    router = APIRouter(prefix="/v1", tags=["gate"], responses=error_responses(400, 401, 403, 413, 415, 422))
    Checker = Annotated[Principal, Depends(gate_dependency(tokens, Action.CHECK))]
    Ingester = Annotated[Principal, Depends(gate_dependency(tokens, Action.INGEST))]
    Caller = Annotated[Principal, Depends(principal_dependency(tokens))]
    metrics = gate.metrics

    router.add_api_route(
        "/check",
        post_check,
        methods=["POST"],
        summary="May this request run? (memory only; never waits on the broker)",
        openapi_extra={
            "requestBody": {"required": True, "content": {"application/json": {"schema": CHECK_SCHEMA}}}
        },
    )

    @router.get("/authorize", summary="Like /v1/check for gateways that read status codes: 200 or 429")
    async def get_authorize(
        _: Checker,
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

    @router.post(
        "/events",
        status_code=202,
        summary="Ingest up to 1000 usage events (202 all valid, 207 mixed, 422 none valid)",
        response_model=EventsResult,
        responses={
            207: {"model": EventsResult, "description": "Some events were invalid (see `results`)"},
            **error_responses(503),
        },
    )
    async def post_events(request: Request, _: Ingester) -> JSONResponse:
        raw = await _read_capped(request, EVENTS_BODY_LIMIT)  # the RequestGuard capped it already
        try:
            items = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BadRequest("body: not valid JSON", details={"field": "body"}) from None
        if not isinstance(items, list):
            raise Unprocessable("body: must be a JSON array of usage events", details={"field": "body"})
        if len(items) > MAX_EVENTS:
            raise PayloadTooLarge(
                f"body: at most {MAX_EVENTS} events per request, got {len(items)}", details={"field": "body"}
            )
        if not items:
            raise Unprocessable("body: the array holds no events", details={"field": "body"})
        results: list[dict[str, Any]] = []
        valid: list[tuple[bytes, bytes]] = []
        for index, item in enumerate(items):
            try:
                event = UsageEvent.model_validate(item)
            except ValidationError as exc:
                results.append({"index": index, "status": "rejected", "errors": _errors_of(exc)})
                continue
            valid.append((event.key_id.encode(), orjson.dumps(item)))
            results.append({"index": index, "status": "accepted", "event_id": event.event_id})
        rejected = len(items) - len(valid)
        if rejected:
            metrics.events_rejected.inc(rejected)
        if not valid:
            raise Unprocessable("body: no event is valid (see details.results)", details={"results": results})
        await producer.send_all(valid)
        metrics.events_ingested.inc(len(valid))
        body = {"accepted": len(valid), "rejected": rejected, "results": results}
        return JSONResponse(body, status_code=207 if rejected else 202)

    @router.get("/spend/{scope:path}", summary="Spend, limits and remaining of one scope (viewer+)")
    async def get_spend(request: Request, scope: str, caller: Caller) -> dict[str, Any]:
        try:
            parsed = scope_in_path(request, "/v1/spend/")
        except InvalidInput as exc:
            raise Unprocessable(f"scope: {exc.reason}", details={"field": "scope"}) from None
        text = str(parsed)
        _authorize_read(caller, parsed, gate.state)
        return spend_view(text, gate.state, gate.clock())

    return router


def _authorize_read(caller: Principal, scope: Scope, state: GateState) -> None:
    if caller.role is Role.GATEWAY:
        decision = authorize(caller, Action.CHECK, GateTarget())
    else:
        team_of_key = None
        if scope.kind in (ScopeKind.KEY, ScopeKind.KEY_MODEL):
            info = state.registry.keys.get(scope.parts[0])
            team_of_key = info.team_id if info else None
        decision = authorize(caller, Action.READ, BudgetTarget(scope), team_of_key=team_of_key)
    require(decision)


def health_router(gate: Gate, metrics: GateMetrics) -> APIRouter:
    """``/healthz``, ``/readyz`` and ``/metrics`` (no authentication)."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz", summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="200 once config, decisions and state are caught up (503 before)")
    async def readyz() -> JSONResponse:
        ready = gate.follower.ready
        body = {"ready": ready, "state_lag_ms": gate.lag_ms()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @router.get("/metrics", summary="Prometheus metrics")
    async def prometheus() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    return router
