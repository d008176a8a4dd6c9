"""``POST /v1/events``: usage events from gateways, onto ``spend.usage``.

The one gate route that talks to the broker: it answers 202 only after every valid event was
acknowledged with ``acks=all``; when the broker does not acknowledge them in time it answers 503
and the gateway retries the whole batch (events are deduplicated by ``event_id``).
"""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from spendgate.api.deps import GateDep, Ingester, Producer
from spendgate.api.errors import BadRequest, Unprocessable, describe_errors, error_responses
from spendgate.api.limits import EVENTS_BODY_LIMIT, PayloadTooLarge, read_capped
from spendgate.records import UsageEvent

MAX_EVENTS = 1000

router = APIRouter(prefix="/v1", tags=["gate"], responses=error_responses(400, 401, 403, 413, 415, 422))


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


def _errors_of(exc: ValidationError) -> list[dict[str, str]]:
    return [
        {"field": e["field"], "message": e["message"]} for e in describe_errors(exc.errors(), whole="event")
    ]


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
async def post_events(request: Request, _: Ingester, gate: GateDep, producer: Producer) -> JSONResponse:
    raw = await read_capped(request, EVENTS_BODY_LIMIT)  # the RequestGuard capped it already
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
        gate.metrics.events_rejected.inc(rejected)
    if not valid:
        raise Unprocessable("body: no event is valid (see details.results)", details={"results": results})
    await producer.send_all(valid)
    gate.metrics.events_ingested.inc(len(valid))
    body = {"accepted": len(valid), "rejected": rejected, "results": results}
    return JSONResponse(body, status_code=207 if rejected else 202)
