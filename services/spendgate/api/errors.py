"""The HTTP error envelope ``{"error": {"code", "message", "details"}}`` (CONTRACT §4).

The one place that chooses HTTP statuses. The rules and the store raise ``domain.errors.Failure``
subclasses and ``store.errors``; ``HTTP_STATUS`` maps them. ``ApiError`` is for what only HTTP
has (401, 400, 413, the broker's 503s). The handlers installed by ``install_error_handlers(app)``
turn all of them, ``InvalidInput`` and FastAPI's ``RequestValidationError`` into the envelope.
Unknown exceptions become a 500 envelope with no internals in it (they are logged).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

# The rule and store failures are raised from api code too: one import for a route.
from spendgate.adapters.errors import BrokerUnavailable as BrokerUnavailable
from spendgate.domain.errors import Conflict as Conflict
from spendgate.domain.errors import Failure, InvalidInput
from spendgate.domain.errors import Forbidden as Forbidden
from spendgate.domain.errors import NotFound as NotFound
from spendgate.domain.errors import Unprocessable as Unprocessable
from spendgate.store.errors import DatabaseUnavailable as DatabaseUnavailable
from spendgate.store.errors import StoreError as StoreError

log = logging.getLogger(__name__)


HTTP_STATUS: dict[type[Failure], int] = {
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    Unprocessable: 422,
    DatabaseUnavailable: 503,
    BrokerUnavailable: 503,
    StoreError: 500,
}
RETRY_AFTER: dict[type[Failure], str] = {DatabaseUnavailable: "1", BrokerUnavailable: "1"}


class ApiError(Failure):
    """A failure only HTTP has, with its own status and headers."""

    status: int = 500

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message, code=code, details=details)
        self.headers = dict(headers or {})


def status_of(exc: Failure) -> tuple[int, dict[str, str]]:
    """The HTTP status and headers of a failure."""
    if isinstance(exc, ApiError):
        return exc.status, exc.headers
    for kind in type(exc).__mro__:
        if kind in HTTP_STATUS:
            retry = RETRY_AFTER.get(kind)
            return HTTP_STATUS[kind], {"Retry-After": retry} if retry else {}
    return 500, {}


class NotYetVisible(ApiError):
    """A control-plane change is committed but the broker has not published it in time (503).

    The change is durable and applies when the broker is back; repeating the same request is
    safe (it answers 200 with the same version once the change is visible).
    """

    status, code = 503, "not_yet_visible"

    def __init__(self, version: int) -> None:
        super().__init__(
            f"the change is committed as version {version} but not yet visible: the broker did not"
            " acknowledge it in time; it is durable and will apply when the broker is back"
            " (repeating the same request is safe)",
            details={"version": version},
            headers={"Retry-After": "1", "Spendgate-Version": str(version)},
        )


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    """No or unknown bearer token; the client must authenticate."""

    status, code = 401, "unauthorized"

    def __init__(self, message: str = "missing or invalid bearer token", **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(message, **kw)


class ErrorDetail(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorEnvelope(BaseModel):
    """Every 4xx/5xx body (CONTRACT §4); documented in the OpenAPI spec, built by ``error_body``."""

    error: ErrorDetail


_WHEN = {
    400: "Malformed request (e.g. a body that is not JSON)",
    401: "Missing or unknown bearer token",
    403: "The token's role may not do this; the message says why",
    404: "No such entity",
    409: "Conflicts with the current state (e.g. a team that still has keys)",
    413: "Body too large (64 KiB; 5 MiB for /v1/events)",
    415: "The body is not `Content-Type: application/json`",
    422: "Invalid value; `details` names the field",
    503: "A dependency is unavailable; retry after `Retry-After` seconds",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for ``statuses``, each with the error envelope."""
    return {status: {"model": ErrorEnvelope, "description": _WHEN[status]} for status in statuses}


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def error_response(
    status: int, code: str, message: str, details: Any = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, details), status_code=status, headers=dict(headers or {}))


def invalid_input_response(exc: InvalidInput) -> JSONResponse:
    field = exc.field
    message = f"{field}: {exc.reason}" if field else exc.reason
    return error_response(422, "invalid", message, {"field": field})


async def _failure(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Failure)
    status, headers = status_of(exc)
    return error_response(status, exc.code, exc.message, exc.details, headers)


async def _invalid_input(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidInput)
    return invalid_input_response(exc)


_NOT_AN_OBJECT = {"model_type", "dict_type", "model_attributes_type"}


def describe_errors(errors: Any, *, whole: str = "body") -> list[dict[str, Any]]:
    """Pydantic errors in user terms: ``{"field", "message", "type"}``, the field dotted.

    ``whole`` names the value itself when an error has no location (the body, an event). No
    Python class names ("instance of UsageEvent") and no "Value error, " prefixes reach a client.
    """
    described = []
    for err in errors:
        kind = err.get("type")
        message = str(err.get("msg", "invalid"))
        if kind in _NOT_AN_OBJECT:
            message = "must be a JSON object"
        elif kind == "list_type":
            message = "must be a JSON array"
        elif kind == "extra_forbidden":
            message = "unknown field"
        message = message.removeprefix("Value error, ")
        field = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or whole
        described.append({"field": field, "message": message, "type": kind})
    return described


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    if any(err.get("type") == "json_invalid" for err in exc.errors()):
        # A body that is not JSON at all is a malformed request (400), not an invalid value (422).
        return error_response(400, "bad_request", "body: not valid JSON", {"field": "body"})
    errors = describe_errors(exc.errors())
    first = errors[0] if errors else {"field": "body", "message": "invalid request"}
    return error_response(422, "invalid", f"{first['field']}: {first['message']}", errors)


async def _http(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {
        400: "bad_request",
        401: "unauthorized",
        403: "forbidden",
        404: "not_found",
        405: "method_not_allowed",
        409: "conflict",
        422: "invalid",
        429: "too_many_requests",
    }
    return error_response(
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        str(exc.detail),
        None,
        getattr(exc, "headers", None),
    )


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal", "internal error; see the server log")


async def response_for(request: Request, exc: Exception) -> JSONResponse:
    """The envelope response for ``exc``, as the installed handlers would answer it."""
    for kind, handler in _HANDLERS:
        if isinstance(exc, kind):
            return await handler(request, exc)
    return await _unexpected(request, exc)


_HANDLERS = (
    (Failure, _failure),
    (InvalidInput, _invalid_input),
    (RequestValidationError, _validation),
    (StarletteHTTPException, _http),
)


def install_error_handlers(app: FastAPI) -> None:
    """Register the envelope handlers on ``app`` (call once in the app factory)."""
    app.add_exception_handler(Failure, _failure)
    app.add_exception_handler(InvalidInput, _invalid_input)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
