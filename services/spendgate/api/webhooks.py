"""Control-plane routes of alert webhooks (CONTRACT §4): subscribe, read, list, delete, and see
the recent deliveries. Parse + ``WebhookService`` + render, like ``api.control``.

A webhook's URL is checked twice: here (http/https, and a host that resolves to a link-local or
cloud-metadata address is refused unless ``SPENDGATE_WEBHOOK_ALLOW_HOSTS`` lists it) and by the
notifier before every attempt (DNS may change in between).
"""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from spendgate.adapters.dns import resolve
from spendgate.api.deps import Caller
from spendgate.api.errors import Unprocessable, error_responses
from spendgate.control.webhooks import WebhookService, require_manager
from spendgate.domain.errors import InvalidInput
from spendgate.domain.scopes import validate_id
from spendgate.domain.webhooks import (
    MAX_SECRET_LENGTH,
    MIN_SECRET_LENGTH,
    parse_kinds,
    parse_patterns,
    refused_target,
    url_host,
    validate_url,
)
from spendgate.store.webhooks import UNSET, WebhookSpec

EXAMPLE: dict[str, Any] = {
    "url": "https://hooks.example.com/spendgate",
    "scopes": ["team:*", "key:k1"],
    "kinds": ["soft_limit", "blocked", "unblocked"],
    "format": "json",
}


def _reason(exc: InvalidInput) -> ValueError:
    return ValueError(exc.reason)


class WebhookBody(BaseModel):
    """A subscription. ``secret`` absent: keep the current one (a new webhook gets a generated
    one, shown once); ``null``: deliveries are not signed; a string (16..256 printable
    characters): use it."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={"examples": [dict(EXAMPLE)]})

    url: str = Field(description="http:// or https:// URL the alerts are POSTed to")
    scopes: list[str] = Field(description="scope patterns; `*` matches any id part: team:*, member:T/*")
    kinds: list[str] | None = Field(default=None, description="alert kinds; default all")
    format: Literal["json", "slack"] = "json"
    secret: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        try:
            return validate_url(v)
        except InvalidInput as exc:
            raise _reason(exc) from None

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        try:
            return [str(p) for p in parse_patterns(v)]
        except InvalidInput as exc:
            raise _reason(exc) from None

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v: list[str] | None) -> list[str] | None:
        try:
            return None if v is None else list(parse_kinds(v))
        except InvalidInput as exc:
            raise _reason(exc) from None

    @field_validator("secret")
    @classmethod
    def _secret(cls, v: str | None) -> str | None:
        if v is not None and not (
            MIN_SECRET_LENGTH <= len(v) <= MAX_SECRET_LENGTH and v.isprintable() and v.isascii()
        ):
            raise ValueError(
                f"must be {MIN_SECRET_LENGTH}..{MAX_SECRET_LENGTH} printable ASCII characters"
                " (or null for unsigned deliveries, or absent to keep/generate one)"
            )
        return v


router = APIRouter(
    prefix="/v1",
    tags=["alert webhooks"],
    responses=error_responses(400, 401, 403, 404, 413, 415, 422, 503),
)


def _service(request: Request) -> WebhookService:
    service: WebhookService = request.app.state.webhooks
    return service


Store = Annotated[WebhookService, Depends(_service)]


def _webhook_id(value: str) -> str:
    return validate_id(value, field="webhook_id")


@router.put(
    "/webhooks/{webhook_id}",
    summary="Subscribe a URL to alerts (idempotent); a generated secret is shown once",
)
async def put_webhook(
    request: Request, webhook_id: str, body: WebhookBody, caller: Caller, store: Store
) -> dict[str, Any]:
    wid = _webhook_id(webhook_id)
    require_manager(caller)  # before any DNS lookup
    host = url_host(body.url)
    addresses = await resolve(host)
    if addresses:  # one that does not resolve yet is checked again before every attempt
        reason = refused_target(host, addresses, request.app.state.webhook_allow_hosts)
        if reason is not None:
            raise Unprocessable(
                f"url: {reason}; not a webhook target (SPENDGATE_WEBHOOK_ALLOW_HOSTS allows it)",
                details={"field": "url"},
            )
    spec = WebhookSpec(
        url=body.url,
        patterns=parse_patterns(body.scopes),
        kinds=parse_kinds(body.kinds),
        format=body.format,
        secret=body.secret if "secret" in body.model_fields_set else UNSET,
    )
    view, secret = await store.put(caller, wid, spec)
    return {**view, **({"secret": secret} if secret is not None else {})}


@router.get("/webhooks/{webhook_id}", summary="A webhook (never its secret)")
async def get_webhook(webhook_id: str, caller: Caller, store: Store) -> dict[str, Any]:
    return await store.get(caller, _webhook_id(webhook_id))


@router.delete("/webhooks/{webhook_id}", status_code=204, summary="Unsubscribe (pending deliveries dropped)")
async def delete_webhook(webhook_id: str, caller: Caller, store: Store) -> Response:
    await store.delete(caller, _webhook_id(webhook_id))
    return Response(status_code=204)


@router.get("/webhooks", summary="List webhooks (a team admin: those inside its team)")
async def list_webhooks(
    caller: Caller,
    store: Store,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query()] = None,
) -> dict[str, Any]:
    return await store.list_webhooks(caller, limit=limit, after=None if after is None else _webhook_id(after))


@router.get("/webhooks/{webhook_id}/deliveries", summary="Recent deliveries, newest first")
async def list_deliveries(
    webhook_id: str, caller: Caller, store: Store, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> dict[str, Any]:
    return await store.deliveries(caller, _webhook_id(webhook_id), limit=limit)
