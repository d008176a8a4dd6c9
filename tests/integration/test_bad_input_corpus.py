"""The bad-input corpus: ids, money, windows, time zones and bodies, each with its exact answer.

One table, run through the whole app (``create_app`` with the session's broker and this
module's Postgres, lifespan running) as the bootstrap admin. Every case names the status and the
error code it must get; a new kind of bad input joins the table. Nothing bad is rewritten into
something valid (U+FFFD ids, a tiny cost counted as 0, an empty time zone taken as UTC).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from tests.integration.test_gate import running, wait_ready

from spendgate.api.app import create_app
from spendgate.settings import Settings

pytestmark = pytest.mark.broker_agnostic  # see pyproject.toml: make test-kafka skips it

ADMIN_TOKEN = "corpus-admin-" + uuid.uuid4().hex
JSON = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}
FORM = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/x-www-form-urlencoded"}
NO_AUTH = {"Content-Type": "application/json"}
NOW = datetime.now(UTC).isoformat().replace("+00:00", "Z")


def event(**fields: Any) -> dict[str, Any]:
    return {"event_id": uuid.uuid4().hex, "occurred_at": NOW, "key_id": "k1", "cost_usd": "0.1", **fields}


def events(**fields: Any) -> bytes:
    return orjson.dumps([event(**fields)])


def budget(window: str = "1d", max_usd: Any = "10", **extra: Any) -> bytes:
    return orjson.dumps({"limits": [{"window": window, "max_usd": max_usd}], **extra})


BIG = b'{"limits": [], "pad": "' + b"x" * (70 * 1024) + b'"}'

# (case id, method, path, headers, body, status, code, text the message must contain)
CORPUS: list[tuple[str, str, str, dict[str, str], bytes | None, int, str, str]] = [
    # --- ids: invalid UTF-8, control characters (one rule, 422, naming the id) ---
    ("team id %ff", "PUT", "/v1/teams/%ff", JSON, None, 422, "invalid", "team_id"),
    ("team id %c3%28", "PUT", "/v1/teams/%c3%28", JSON, None, 422, "invalid", "team_id"),
    ("org id %ff", "PUT", "/v1/orgs/%ff", JSON, None, 422, "invalid", "org_id"),
    ("member id %ff", "PUT", "/v1/teams/t1/members/%ff", JSON, None, 422, "invalid", "user_id"),
    ("key id newline", "PUT", "/v1/keys/a%0Ab", JSON, b"{}", 422, "invalid", "key_id"),
    ("key id newline get", "GET", "/v1/keys/a%0Ab", JSON, None, 422, "invalid", "key_id"),
    ("team id newline", "PUT", "/v1/teams/a%0Ab", JSON, None, 422, "invalid", "team_id"),
    ("spend scope newline", "GET", "/v1/spend/key:a%0Ab", JSON, None, 422, "invalid", "scope"),
    ("budget scope %ff", "PUT", "/v1/budgets/team:%ff", JSON, budget(), 422, "invalid", "scope"),
    ("token id NUL", "DELETE", "/v1/tokens/%00", JSON, None, 422, "invalid", "token_id"),
    ("team filter %ff", "GET", "/v1/keys?team_id=%ff", JSON, None, 422, "invalid", "team_id"),
    ("authorize key newline", "GET", "/v1/authorize?key_id=a%0Ab", JSON, None, 422, "invalid", "key_id"),
    ("check key newline", "POST", "/v1/check", JSON, b'{"key_id": "a\\nb"}', 422, "invalid", "key_id"),
    ("team org newline", "PUT", "/v1/teams/t1", JSON, b'{"org_id": "o\\n1"}', 422, "invalid", "org_id"),
    ("event key newline", "POST", "/v1/events", JSON, events(key_id="a\nb"), 422, "invalid", "no event"),
    ("event tag DEL", "POST", "/v1/events", JSON, events(tags=["a\x7f"]), 422, "invalid", "no event"),
    # --- money ---
    (
        "cost 1.0e-400 number",
        "POST",
        "/v1/events",
        JSON,
        b'[{"event_id": "e1", "occurred_at": "' + NOW.encode() + b'", "key_id": "k1", "cost_usd": 1.0e-400}]',
        422,
        "invalid",
        "too small",
    ),
    ("cost 1e-10 number", "POST", "/v1/events", JSON, events(cost_usd=1e-10), 422, "invalid", "no event"),
    (
        "cost 10 decimals",
        "POST",
        "/v1/events",
        JSON,
        events(cost_usd="0.0000000001"),
        422,
        "invalid",
        "no event",
    ),
    ("cost negative", "POST", "/v1/events", JSON, events(cost_usd="-1"), 422, "invalid", "no event"),
    ("cost exponent string", "POST", "/v1/events", JSON, events(cost_usd="1e3"), 422, "invalid", "no event"),
    ("cost NaN string", "POST", "/v1/events", JSON, events(cost_usd="NaN"), 422, "invalid", "no event"),
    ("cost too large", "POST", "/v1/events", JSON, events(cost_usd="1000001"), 422, "invalid", "no event"),
    (
        "limit 1.0e-400",
        "PUT",
        "/v1/budgets/team:t1",
        JSON,
        b'{"limits": [{"window": "1d", "max_usd": 1.0e-400}]}',
        422,
        "invalid",
        "too small",
    ),
    (
        "estimate 1.0e-400",
        "POST",
        "/v1/check",
        JSON,
        b'{"key_id": "k", "estimated_cost_usd": 1.0e-400}',
        422,
        "invalid",
        "too small",
    ),
    (
        "estimate query exp",
        "GET",
        "/v1/authorize?key_id=k&estimated_cost_usd=1e-3",
        JSON,
        None,
        422,
        "invalid",
        "estimated_cost_usd",
    ),
    (
        "limit infinite",
        "PUT",
        "/v1/budgets/team:t1",
        JSON,
        b'{"limits": [{"window": "1d", "max_usd": 1e400}]}',
        422,
        "invalid",
        "limits[0].max_usd",
    ),
    # --- windows ---
    ("window 0d", "PUT", "/v1/budgets/team:t1", JSON, budget("0d"), 422, "invalid", "limits[0].window"),
    ("window 1x", "PUT", "/v1/budgets/team:t1", JSON, budget("1x"), 422, "invalid", "limits[0].window"),
    (
        "window huge",
        "PUT",
        "/v1/budgets/team:t1",
        JSON,
        budget("99999999999999999999h"),
        422,
        "invalid",
        "limits[0].window",
    ),
    (
        "window twice",
        "PUT",
        "/v1/budgets/team:t1",
        JSON,
        b'{"limits": [{"window": "1d", "max_usd": "1"}, {"window": "1d", "max_usd": "2"}]}',
        422,
        "invalid",
        "limits[1].window",
    ),
    # --- time zones ---
    ("tz empty", "PUT", "/v1/budgets/team:t1", JSON, budget(tz=""), 422, "invalid", "tz"),
    ("tz unknown", "PUT", "/v1/budgets/team:t1", JSON, budget(tz="Mars/Olympus"), 422, "invalid", "tz"),
    ("tz number", "PUT", "/v1/budgets/team:t1", JSON, budget(tz=5), 422, "invalid", "tz"),
    ("tz false", "PUT", "/v1/budgets/team:t1", JSON, budget(tz=False), 422, "invalid", "tz"),
    ("tz directory", "PUT", "/v1/budgets/team:t1", JSON, budget(tz="Europe"), 422, "invalid", "tz"),
    # --- bodies ---
    (
        "curl -d budget",
        "PUT",
        "/v1/budgets/team:t1",
        FORM,
        budget(),
        415,
        "unsupported_media_type",
        "Content-Type: application/json",
    ),
    (
        "curl -d check",
        "POST",
        "/v1/check",
        FORM,
        b'{"key_id": "k"}',
        415,
        "unsupported_media_type",
        "Content-Type: application/json",
    ),
    (
        "curl -d events",
        "POST",
        "/v1/events",
        FORM,
        events(),
        415,
        "unsupported_media_type",
        "Content-Type: application/json",
    ),
    (
        "text body token",
        "POST",
        "/v1/tokens",
        {**JSON, "Content-Type": "text/plain"},
        b'{"role": "viewer"}',
        415,
        "unsupported_media_type",
        "Content-Type: application/json",
    ),
    (
        "not json budget",
        "PUT",
        "/v1/budgets/team:t1",
        JSON,
        b"{not json",
        400,
        "bad_request",
        "body: not valid JSON",
    ),
    ("not json check", "POST", "/v1/check", JSON, b"{not json", 400, "bad_request", "body: not valid JSON"),
    ("not json events", "POST", "/v1/events", JSON, b"[{", 400, "bad_request", "body: not valid JSON"),
    ("not json team", "PUT", "/v1/teams/t1", JSON, b"org_id=o1", 400, "bad_request", "body: not valid JSON"),
    ("array as budget", "PUT", "/v1/budgets/team:t1", JSON, b"[]", 422, "invalid", "body: "),
    ("array as check", "POST", "/v1/check", JSON, b"[]", 422, "invalid", "body: must be a JSON object"),
    ("array as team", "PUT", "/v1/teams/t1", JSON, b"[]", 422, "invalid", "body: must be a JSON object"),
    ("object as events", "POST", "/v1/events", JSON, b"{}", 422, "invalid", "body: must be a JSON array"),
    ("empty events", "POST", "/v1/events", JSON, b"[]", 422, "invalid", "body: "),
    (
        "1001 events",
        "POST",
        "/v1/events",
        JSON,
        orjson.dumps([event() for _ in range(1001)]),
        413,
        "payload_too_large",
        "body: at most 1000 events",
    ),
    (
        "events over 5 MiB",
        "POST",
        "/v1/events",
        JSON,
        b"[" + b" " * (5 * 1024 * 1024) + b"]",
        413,
        "payload_too_large",
        "body: ",
    ),
    ("budget over 64 KiB", "PUT", "/v1/budgets/team:t1", JSON, BIG, 413, "payload_too_large", "body: "),
    ("check over 64 KiB", "POST", "/v1/check", JSON, BIG, 413, "payload_too_large", "body: "),
    ("unauthenticated big", "PUT", "/v1/budgets/team:t1", NO_AUTH, BIG, 401, "unauthorized", "bearer"),
    ("unknown field team", "PUT", "/v1/teams/t1", JSON, b'{"colour": "red"}', 422, "invalid", "colour"),
    # --- holds ---
    (
        "reserve without request_id",
        "POST",
        "/v1/check",
        JSON,
        b'{"key_id": "k1", "reserve": true, "estimated_cost_usd": "0.01"}',
        422,
        "invalid",
        "reserve needs request_id and estimated_cost_usd",
    ),
    (
        "reserve without estimate",
        "POST",
        "/v1/check",
        JSON,
        b'{"key_id": "k1", "reserve": true, "request_id": "r1"}',
        422,
        "invalid",
        "reserve needs request_id and estimated_cost_usd",
    ),
    (
        "hold ttl over an hour",
        "POST",
        "/v1/check",
        JSON,
        b'{"key_id": "k1", "reserve": true, "request_id": "r1", "estimated_cost_usd": "1", '
        b'"hold_ttl_s": 3601}',
        422,
        "invalid",
        "hold_ttl_s",
    ),
    ("reserve 2", "POST", "/v1/check", JSON, b'{"key_id": "k", "reserve": 2}', 422, "invalid", "reserve"),
    (
        "hold event without request_id",
        "POST",
        "/v1/events",
        JSON,
        events(kind="hold", cost_usd=None, estimated_cost_usd="1"),
        422,
        "invalid",
        "no event",
    ),
    ("release a hold without key_id", "DELETE", "/v1/holds/r1", JSON, None, 422, "invalid", "key_id"),
    ("release key newline", "DELETE", "/v1/holds/r?key_id=a%0Ab", JSON, None, 422, "invalid", "key_id"),
]


@pytest.fixture(scope="module")
async def client(migrated_database_url: str, kafka_bootstrap: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        database_url=migrated_database_url,
        topic_prefix=f"c{uuid.uuid4().hex[:8]}.",
        partitions=2,
        admin_token=ADMIN_TOKEN,
    )
    async with running(create_app(settings)) as c:
        await wait_ready(c)
        yield c


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code", "says"),
    [pytest.param(*case[1:], id=case[0]) for case in CORPUS],
)
async def test_bad_input_gets_its_exact_status_and_code(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None,
    status: int,
    code: str,
    says: str,
) -> None:
    resp = await client.request(method, path, content=body, headers=headers)
    assert resp.status_code == status, (resp.status_code, resp.text)
    error = resp.json()["error"]
    assert error["code"] == code and says in error["message"], error
    assert "UsageEvent" not in resp.text and "instance of" not in resp.text and "\ufffd" not in resp.text


async def test_rejected_events_say_what_is_wrong_in_user_terms(client: httpx.AsyncClient) -> None:
    resp = await client.post("/v1/events", content=b'[5, {"event_id": "e"}]', headers=JSON)
    assert resp.status_code == 422, resp.text
    results = resp.json()["error"]["details"]["results"]
    assert results[0]["errors"] == [{"field": "event", "message": "must be a JSON object"}]
    assert {e["field"] for e in results[1]["errors"]} >= {"occurred_at", "key_id"}
    assert "UsageEvent" not in resp.text and "Value error" not in resp.text


async def test_bodiless_puts_still_work(client: httpx.AsyncClient) -> None:
    org = f"o-{uuid.uuid4().hex[:8]}"
    as_curl_without_data = {"Authorization": JSON["Authorization"]}
    resp = await client.put(f"/v1/orgs/{org}", headers=as_curl_without_data)
    assert resp.status_code == 200 and resp.json()["org_id"] == org, resp.text
    empty_form = {**FORM, "Content-Length": "0"}
    assert (await client.put(f"/v1/orgs/{org}", headers=empty_form)).status_code == 200
