"""The request guard: what every ``/v1`` request must pass before a route sees a byte of its body.

Why an ASGI middleware and not route code: FastAPI reads a route's body *before* it resolves the
route's dependencies, so an unauthenticated 50 MB ``PUT`` used to be read whole (and parsed)
before its 401. Here, in this order, without reading the body first:

1. ``/v1/*`` needs a known bearer token (401); the principal is handed to the routes, which
   still decide what its role may do (403);
2. the path and query are percent-encoded UTF-8 without control characters (422 naming the id;
   one rule for every id — never a U+FFFD substitute, never a 404 from the router);
3. a body is JSON: another ``Content-Type`` is 415 naming the header to send (a body without
   any ``Content-Type`` is read as JSON, as FastAPI does);
4. the body is at most ``body_limit(path)`` bytes (413), counted while it streams in, whatever
   ``Content-Length`` claims;
5. the body parses as JSON (400, one wording for every route), and no JSON number in it was
   rewritten by parsing: ``1.0e-400`` would become ``0.0`` (422, like ``1e-10``).

The checked body is replayed to the app unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import unquote_to_bytes

import orjson
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from spendgate.api.errors import ApiError, error_body

CONTROL_BODY_LIMIT = 64 * 1024
"""Control plane and ``/v1/check``: the largest valid body (64 tags of 256 characters) is ~17 KB."""
EVENTS_BODY_LIMIT = 5 * 1024 * 1024
"""``/v1/events``: 1000 events of ~5 KB each."""

_FIELD_OF = {
    "orgs": "org_id",
    "teams": "team_id",
    "members": "user_id",
    "keys": "key_id",
    "tokens": "token_id",
    "budgets": "scope",
    "spend": "scope",
}
# A number written with a negative exponent next to a digit: the only way to write a non-zero
# JSON number that parses to 0.0 (underflow). Cheap to search for; confirmed by a real parse.
_TINY_NUMBER = re.compile(rb"[0-9.][eE]-[0-9]")


def body_limit(path: str) -> int:
    return EVENTS_BODY_LIMIT if path == "/v1/events" else CONTROL_BODY_LIMIT


GUARDED_BODY = "guarded_body"
"""The request state entry holding the body the guard read and checked (see ``guarded_body``)."""


def guarded_body(scope: Scope) -> bytes | None:
    """The body this guard already read, so a hot route need not stream it again."""
    body: bytes | None = scope.get("state", {}).get(GUARDED_BODY)
    return body


class Refused(Exception):
    """A request refused by the guard: status, code, message and details of the envelope."""

    def __init__(
        self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details
        self.headers = headers or {}


def body_refused(status: int, code: str, reason: str) -> Refused:
    """Every body-level refusal has the same shape: ``body: <reason>``, ``details.field = body``."""
    return Refused(status, code, f"body: {reason}", {"field": "body"})


def _decode(raw: bytes, field: str) -> str:
    try:
        text = unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise Refused(422, "invalid", f"{field}: not valid percent-encoded UTF-8", {"field": field}) from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise Refused(422, "invalid", f"{field}: must not contain control characters", {"field": field})
    return text


_NEEDS_DECODING = re.compile(rb"[^\x21-\x24\x26-\x7e]")
"""Anything but printable ASCII other than ``%``: only then can a path or query be unclean."""


def check_path(raw_path: bytes, query: bytes) -> None:
    """Raise ``Refused`` (422) unless every path segment and query value is clean UTF-8 text."""
    if not _NEEDS_DECODING.search(raw_path) and not _NEEDS_DECODING.search(query):
        return  # the common case (every /v1/check): nothing to decode
    field = "path"
    for segment in raw_path.split(b"/"):
        _decode(segment, field)
        field = _FIELD_OF.get(segment.decode("latin-1"), field)
    for pair in query.split(b"&") if query else ():
        name_raw, _, value = pair.partition(b"=")
        name = _decode(name_raw.replace(b"+", b" "), "query")
        _decode(value.replace(b"+", b" "), name or "query")


def check_content_type(header: str | None) -> None:
    if header is None:
        return
    media = header.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    raise Refused(
        415,
        "unsupported_media_type",
        f"body: send JSON with the header `Content-Type: application/json` (got {header[:80]!r});"
        " with curl, use --json or -H 'Content-Type: application/json'",
        {"field": "body", "header": "Content-Type: application/json"},
    )


class _Underflow(ValueError):
    pass


def _exact_float(text: str) -> float:
    value = float(text)
    if value == 0.0:
        try:
            exact = Decimal(text)
        except InvalidOperation:  # pragma: no cover - json only hands us valid number text
            exact = Decimal(0)
        if exact != 0:
            raise _Underflow(text)
    return value


def check_json(raw: bytes) -> None:
    """Raise ``Refused`` unless ``raw`` is JSON whose numbers survive parsing (see module doc)."""
    try:
        orjson.loads(raw)
        parsed_by_orjson = True
    except orjson.JSONDecodeError:
        parsed_by_orjson = False  # stdlib json also takes 1e400 (inf) and NaN; the routes refuse them
    if parsed_by_orjson and not _TINY_NUMBER.search(raw):
        return
    try:
        json.loads(raw, parse_float=_exact_float)
    except _Underflow as exc:
        raise body_refused(
            422,
            "invalid",
            f"the number {str(exc)[:40]} is not zero but too small to represent; amounts take at most"
            " 9 decimal places (send them as decimal strings)",
        ) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise body_refused(400, "bad_request", f"not valid JSON ({str(exc)[:80]})") from None


async def read_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The whole body, or ``Refused`` 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = body_refused(413, "payload_too_large", f"larger than {limit} bytes")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise too_large
    chunks = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refused(400, "bad_request", "body: the client disconnected", {"field": "body"})
        chunks += message.get("body", b"")
        if len(chunks) > limit:
            raise too_large
        if not message.get("more_body", False):
            return bytes(chunks)


class RequestGuard:
    """ASGI middleware applying the module's rules; ``authenticate(bearer)`` returns a principal."""

    def __init__(self, app: ASGIApp, authenticate: Callable[[str], Any]) -> None:
        self.app = app
        self.authenticate = authenticate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            receive = await self._admit(scope, receive)
        except Refused as refused:
            await _answer(refused, scope, send)
            return
        await self.app(scope, receive, send)

    async def _admit(self, scope: Scope, receive: Receive) -> Receive:
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        api = path.startswith("/v1/")
        if api:
            principal = self.authenticate(_bearer(headers.get("authorization", "")))
            if principal is None:
                raise Refused(
                    401,
                    "unauthorized",
                    "missing or invalid bearer token",
                    None,
                    {"WWW-Authenticate": "Bearer"},
                )
            scope.setdefault("state", {})["principal"] = principal
            check_path(scope.get("raw_path") or path.encode(), scope.get("query_string", b""))
        declared = headers.get("content-length")
        has_body = "transfer-encoding" in headers or (
            declared is not None and declared.strip() not in ("", "0")
        )
        if not has_body:
            return receive
        if api:
            check_content_type(headers.get("content-type"))
        body = await read_body(receive, declared, body_limit(path))
        if body and api:
            check_json(body)
        scope.setdefault("state", {})[GUARDED_BODY] = body
        return _replay(body, receive)


def _bearer(header: str) -> str:
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, like the server does

    return replay


async def _answer(refused: Refused, scope: Scope, send: Send) -> None:
    body = orjson.dumps(error_body(refused.code, refused.message, refused.details))
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in refused.headers.items()]
    if refused.status == 413:
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


async def read_capped(request: Request, limit: int) -> bytes:
    """The body of a request no ``RequestGuard`` read, or ``PayloadTooLarge`` past ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body: larger than {limit} bytes", details={"field": "body"})
    chunks = bytearray()
    async for chunk in request.stream():
        chunks.extend(chunk)
        if len(chunks) > limit:
            raise PayloadTooLarge(f"body: larger than {limit} bytes", details={"field": "body"})
    return bytes(chunks)
