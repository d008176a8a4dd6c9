"""The RequestGuard at the ASGI level: what it reads of a body before refusing, and its rules."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from starlette.types import Message, Receive, Scope, Send

from spendgate.api.limits import CONTROL_BODY_LIMIT, EVENTS_BODY_LIMIT, Refused, RequestGuard, check_json

TOKEN = "good-token"
CHUNK = b"x" * 65536


class Reached:
    """The app behind the guard: records the body it received."""

    def __init__(self) -> None:
        self.body: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.body = body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def http_scope(method: str, path: str, headers: dict[str, str], query: bytes = b"") -> Scope:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }


async def call(
    scope: Scope, chunks: list[bytes], *, endless: bool = False
) -> tuple[int, dict[str, Any], int, Reached]:
    """(status, body, chunks the guard pulled, the app). ``endless``: the client never stops."""
    app = Reached()
    pulled = 0
    sent: list[Message] = []

    async def receive() -> Message:
        nonlocal pulled
        pulled += 1
        if endless:
            return {"type": "http.request", "body": CHUNK, "more_body": True}
        index = pulled - 1
        if index == 0 and not chunks:
            return {"type": "http.request", "body": b"", "more_body": False}  # a bodiless request
        if index < len(chunks):
            return {"type": "http.request", "body": chunks[index], "more_body": index < len(chunks) - 1}
        await asyncio.sleep(3600)  # a real server: nothing more until the client disconnects
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    guard = RequestGuard(app, lambda bearer: "principal" if bearer == TOKEN else None)
    await asyncio.wait_for(guard(scope, receive, send), 5)
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, orjson.loads(body), pulled, app


AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


async def test_unauthenticated_50_mb_body_is_401_before_a_byte_of_it_is_read() -> None:
    headers = {"Content-Type": "application/json", "Content-Length": str(50 * 1024 * 1024)}
    status, body, pulled, app = await call(http_scope("PUT", "/v1/budgets/team:T", headers), [], endless=True)
    assert (status, body["error"]["code"], pulled, app.body) == (401, "unauthorized", 0, None)


@pytest.mark.parametrize("path", ["/v1/budgets/team:T", "/v1/check", "/v1/teams/t"])
async def test_a_body_over_the_cap_is_413_while_streaming_even_when_content_length_lies(path: str) -> None:
    for declared in ({"Content-Length": "10"}, {"Transfer-Encoding": "chunked"}):
        scope = http_scope("PUT", path, {**AUTH, **declared})
        status, body, pulled, app = await call(scope, [], endless=True)
        assert (status, body["error"]["code"], app.body) == (413, "payload_too_large", None)
        assert pulled <= CONTROL_BODY_LIMIT // len(CHUNK) + 2  # stopped at the cap, not at 50 MB
        assert body["error"]["message"].startswith("body: ")


async def test_declared_length_over_the_cap_is_413_without_reading() -> None:
    scope = http_scope("POST", "/v1/events", {**AUTH, "Content-Length": str(EVENTS_BODY_LIMIT + 1)})
    status, _, pulled, _ = await call(scope, [], endless=True)
    assert (status, pulled) == (413, 0)


async def test_events_take_up_to_their_larger_cap_and_the_app_gets_the_body_unchanged() -> None:
    events = orjson.dumps([{"pad": "y" * 1000}] * 1000)  # ~1 MB: over the control cap, under the events cap
    pieces = [events[i : i + 65536] for i in range(0, len(events), 65536)]
    scope = http_scope("POST", "/v1/events", {**AUTH, "Content-Length": str(len(events))})
    status, _, _, app = await call(scope, pieces)
    assert status == 200 and app.body == events


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x"]
)
async def test_a_json_route_called_with_another_content_type_is_415_naming_the_header(
    content_type: str,
) -> None:
    scope = http_scope(
        "PUT", "/v1/budgets/team:T", {**AUTH, "Content-Type": content_type, "Content-Length": "2"}
    )
    status, body, pulled, _ = await call(scope, [b"{}"])
    assert (status, body["error"]["code"], pulled) == (415, "unsupported_media_type", 0)
    assert "Content-Type: application/json" in body["error"]["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/x-www-form-urlencoded", "Content-Length": "0"},  # curl -XPUT -d ''
        {},  # curl -XPUT without -d
        {"Content-Type": "application/json; charset=utf-8", "Content-Length": "2"},
        {"Content-Type": "application/merge-patch+json", "Content-Length": "2"},
        {"Content-Length": "2"},  # no Content-Type: read as JSON, as FastAPI does
    ],
)
async def test_bodiless_puts_and_json_media_types_pass(headers: dict[str, str]) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}", **headers}
    body = [b"{}"] if headers.get("Content-Length", "0") != "0" else []
    status, _, _, app = await call(http_scope("PUT", "/v1/orgs/o1", auth), body)
    assert status == 200 and app.body == (b"{}" if body else b"")


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [
        ("/v1/teams/%ff", b"", "team_id"),
        ("/v1/teams/%c3%28", b"", "team_id"),
        ("/v1/orgs/%ff", b"", "org_id"),
        ("/v1/teams/t/members/%ff", b"", "user_id"),
        ("/v1/keys/a%0Ab", b"", "key_id"),
        ("/v1/teams/a%0Ab", b"", "team_id"),
        ("/v1/tokens/%00", b"", "token_id"),
        ("/v1/spend/key:a%0Ab", b"", "scope"),
        ("/v1/keys", b"team_id=%ff", "team_id"),
        ("/v1/authorize", b"key_id=a%0Ab", "key_id"),
    ],
)
async def test_ids_that_are_not_clean_utf8_text_are_422_naming_the_id(
    path: str, query: bytes, field: str
) -> None:
    status, body, _, app = await call(http_scope("GET", path, AUTH, query), [])
    assert (status, body["error"]["code"], app.body) == (422, "invalid", None)
    assert body["error"]["message"].startswith(f"{field}: ") and body["error"]["details"] == {"field": field}


def test_a_number_that_parsing_would_turn_into_zero_is_refused() -> None:
    for raw in (b'{"cost_usd": 1.0e-400}', b'[{"a": [1, 2.5E-999]}]'):
        with pytest.raises(Refused) as refused:
            check_json(raw)
        assert refused.value.status == 422 and "too small" in refused.value.message
    for fine in (b'{"cost_usd": 0.0}', b'{"cost_usd": 0e-5}', b'{"id": "1.0e-400"}', b'{"x": 2.5e-3}'):
        check_json(fine)


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"tz=UTC", b'{"a": 1'])
def test_a_body_that_is_not_json_is_400_in_one_wording(raw: bytes) -> None:
    with pytest.raises(Refused) as refused:
        check_json(raw)
    assert refused.value.status == 400 and refused.value.message.startswith("body: not valid JSON")
