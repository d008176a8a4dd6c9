"""Fuzz every operation of ``/openapi.json`` with schemathesis against the real app, then pin each bug.

The app is the one ``spendgate api`` serves: ``create_app(settings)`` with this module's own
migrated Postgres database, the session's broker, an admin token, and its lifespan started
(follower, pool, outbox relay). It runs on an event loop of its own thread (``ServedApp``) behind
``httpx.ASGITransport``, so the synchronous tests schemathesis generates can send it requests.

``test_schemathesis_finds_no_server_error`` is one pytest test per operation, with schemathesis'
three phases: the schema's examples, its deterministic coverage cases (boundary values, wrong
types, missing fields, unexpected content types, bodies that are not objects) and
``MAX_EXAMPLES`` derandomized Hypothesis cases of positive and negative data, all as the bootstrap
admin, checking:

* ``not_a_server_error``: no 5xx at all (the only documented 503s, database or broker down,
  cannot happen with both up);
* ``response_schema_conformance`` for the documented status codes;
* every 4xx carries the ``{"error": {"code", "message", "details"}}`` envelope (CONTRACT §4).

The tests after it are plain requests: one per bug fuzzing (and probing by hand) found, then the
contract's error cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hsettings
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance
from tests.kafka_helpers import eventually

from spendgate.adapters.kafka import ensure_topics
from spendgate.api.app import create_app
from spendgate.api.errors import Unprocessable
from spendgate.control.service import ControlService
from spendgate.domain.authority import Principal, Role
from spendgate.settings import Settings
from spendgate.store.control import PostgresControlStore
from spendgate.store.pool import open_pool

# schemathesis' own strategies use `random` (its warning, not ours)
pytestmark = [
    pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning"),
    pytest.mark.broker_agnostic,  # see pyproject.toml: make test-kafka skips it
]

ADMIN_TOKEN = "fuzz-admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
BASE_URL = "http://spendgate"
MAX_EXAMPLES = 15  # Hypothesis cases per operation, on top of the coverage cases
REQUEST_TIMEOUT_S = 30.0
T = TypeVar("T")


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class ServedApp:
    """``create_app(settings)`` with its lifespan running on an event loop in a thread of its own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="served-app", daemon=True)
        self._stack = contextlib.AsyncExitStack()
        self._client: httpx.AsyncClient | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = REQUEST_TIMEOUT_S) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> None:
        self._thread.start()
        self.run(self._start(), timeout=90)

    async def _start(self) -> None:
        await ensure_topics(self.settings)
        app = create_app(self.settings)
        await self._stack.enter_async_context(app.router.lifespan_context(app))
        # raise_app_exceptions=False: an unhandled error is answered 500, as a server would
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        self._client = await self._stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url=BASE_URL, timeout=REQUEST_TIMEOUT_S)
        )

        client = self._client

        async def ready() -> None:
            assert (await client.get("/readyz")).status_code == 200
            assert (await client.get("/v1/orgs", headers=ADMIN)).status_code == 200  # Postgres answers

        await eventually(ready, timeout=60, interval=0.05)

    def stop(self) -> None:
        try:
            self.run(self._stack.aclose(), timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        assert self._client is not None
        return self.run(self._client.request(method, url, **kwargs))

    def send_case(self, case: Any) -> httpx.Response:
        """Send a schemathesis case: requests serializes it as schemathesis' own transport would
        (query, body, form, multipart, cookies), httpx sends exactly those bytes to the app."""
        assert self._client is not None
        kwargs = case.as_transport_kwargs(base_url=BASE_URL, headers=dict(ADMIN))
        prepared = requests.Session().prepare_request(requests.Request(**kwargs))
        body = prepared.body.encode() if isinstance(prepared.body, str) else prepared.body
        assert body is None or isinstance(body, bytes), type(body)
        headers = [(k, v if isinstance(v, str) else v.decode("latin-1")) for k, v in prepared.headers.items()]
        request = self._client.build_request(
            prepared.method or "GET", prepared.url or "/", headers=headers, content=body
        )
        return self.run(self._client.send(request))


@pytest.fixture(scope="module")
def served(
    kafka_bootstrap: str, migrated_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServedApp]:
    """The whole API on this module's database (dropped afterwards) and topics of its own."""
    settings = Settings(  # as `settings_factory` builds them
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
        partitions=4,
        data_dir=tmp_path_factory.mktemp("fuzz") / "data",
        api_port=0,
        worker_web_port=0,
        database_url=migrated_database_url,
        admin_token=SecretStr(ADMIN_TOKEN),
    )
    app = ServedApp(settings)
    app.start()
    try:
        yield app
    finally:
        app.stop()


def assert_error(
    resp: httpx.Response, status: int, code: str | None = None, field: str | None = None
) -> None:
    """``resp`` is the contract's error envelope with ``status`` (and ``code``, naming ``field``)."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    if field is not None:
        assert field in body["error"]["message"], body


# --- the fuzz test ----------------------------------------------------------------------------


def envelope_on_client_errors(ctx: Any, response: Any, case: Any) -> bool | None:
    """A schemathesis check: every 4xx is the error envelope with a string code and message."""
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        error = body["error"]
        assert set(error) == {"code", "message", "details"}, error
        assert isinstance(error["code"], str) and error["code"], error
        assert isinstance(error["message"], str) and error["message"], error
    return None


CHECKS: list[Callable[..., Any]] = [
    not_a_server_error,
    response_schema_conformance,
    envelope_on_client_errors,
]


def with_small_event_batches(spec: dict[str, Any]) -> dict[str, Any]:
    """The served spec allows 1000 events per ``POST /v1/events``; 20 keep the fuzzing fast."""
    spec = copy.deepcopy(spec)
    body = spec["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]
    body["schema"]["maxItems"] = 20
    return spec


# Values random generation rarely draws but that reach Postgres, the file system (tz names) or
# the percent-decoder: schemathesis sends each as an explicit example (its "examples" phase).
HOSTILE_STRINGS = ["a\x00b", "\x7f", "%ff", "a/b", "a%2Fb", "x" * 300, "Europe", ".."]
HOSTILE_BODIES: dict[str, list[Any]] = {
    "PUT /v1/budgets/{scope}": [
        {"limits": [], "tz": "Europe"},
        {"limits": [], "tz": "x" * 300},
        {"limits": [{"window": "1d", "max_usd": "1e999999999"}]},
        {"limits": [{"window": "99999999999999999999d", "max_usd": "1"}]},
        {"limits": [{"window": "1d", "max_usd": "1"}, {"window": "1d", "max_usd": "2"}]},
    ],
    "PUT /v1/teams/{team_id}": [{"org_id": "a\x00b"}, {"org_id": "\ud800"}],
    "PUT /v1/keys/{key_id}": [{"team_id": "\udfff"}, {"user_id": "u\ud83d"}],
    "POST /v1/tokens": [{"role": "team_admin", "team_id": "\ud800"}],
    "POST /v1/check": [{"key_id": "\ud800"}, {"key_id": "k", "estimated_cost_usd": "1e999999999"}],
}


def with_hostile_examples(spec: dict[str, Any]) -> dict[str, Any]:
    spec = copy.deepcopy(spec)
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for parameter in operation.get("parameters", []):
                types = {parameter["schema"].get("type")} | {
                    alt.get("type") for alt in parameter["schema"].get("anyOf", [])
                }
                if "string" in types:
                    # a valid scope first, so that the hostile budget bodies get past the path
                    values = (["team:fuzz"] if parameter["name"] == "scope" else []) + HOSTILE_STRINGS
                    parameter["examples"] = {f"e{i}": {"value": v} for i, v in enumerate(values)}
            bodies = HOSTILE_BODIES.get(f"{method.upper()} {path}")
            if bodies:
                media = operation["requestBody"]["content"]["application/json"]
                media["examples"] = {f"hostile{i}": {"value": v} for i, v in enumerate(bodies)}
                if "examples" in media["schema"]:  # schemathesis prefers the schema's own examples
                    media["schema"]["examples"] += bodies
    return spec


def openapi_of_the_app() -> dict[str, Any]:
    """``/openapi.json`` of ``create_app`` with a database configured (so with the control plane),
    built without serving: schemathesis parametrizes tests at collection time, and its fixture
    loader (``schemathesis.pytest.from_fixture``) does not work with pytest 9.
    ``test_the_fuzzed_schema_is_the_served_one`` checks it is the one the app serves."""
    offline = Settings(kafka_bootstrap="localhost:9", database_url="postgresql://localhost:9/none")
    return create_app(offline).openapi()


SPEC = openapi_of_the_app()
schema = schemathesis.openapi.from_dict(with_hostile_examples(with_small_event_batches(SPEC)))


def test_the_fuzzed_schema_is_the_served_one(served: ServedApp) -> None:
    assert served.request("GET", "/openapi.json").json() == SPEC
    events = SPEC["paths"]["/v1/events"]["post"]
    body = events["requestBody"]["content"]["application/json"]["schema"]
    assert body["maxItems"] == 1000 and body["items"] == {"$ref": "#/components/schemas/UsageEvent"}
    assert "UsageEvent" in SPEC["components"]["schemas"]
    assert events["responses"]["413"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorEnvelope"
    }
    operations = {f"{method.upper()} {path}" for path, item in SPEC["paths"].items() for method in item}
    assert len(operations) >= 31
    assert {"POST /v1/check", "POST /v1/events", "PUT /v1/budgets/{scope}", "GET /v1/audit"} <= operations


@schema.parametrize()
@hsettings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_schemathesis_finds_no_server_error(case: Any, served: ServedApp) -> None:
    case.validate_response(served.send_case(case), checks=CHECKS)


# --- regressions: each was a 500 -------------------------------------------------------------


@pytest.mark.parametrize("raw", ["%ff", "%C3%28", "ok%ff"])
def test_key_id_that_is_not_percent_encoded_utf8_is_422(served: ServedApp, raw: str) -> None:
    for method in ("PUT", "GET", "DELETE"):
        resp = served.request(method, f"/v1/keys/{raw}", json={} if method == "PUT" else None, headers=ADMIN)
        assert_error(resp, 422, "invalid", "key_id")


@pytest.mark.parametrize(
    ("method", "path", "field", "body"),
    [
        ("PUT", "/v1/teams/{team}", "org_id", b'{"org_id": "a\\ud800"}'),
        ("PUT", "/v1/keys/{key}", "team_id", b'{"team_id": "\\udfff"}'),
        ("PUT", "/v1/keys/{key}", "user_id", b'{"user_id": "u\\ud83d"}'),
        ("POST", "/v1/tokens", "team_id", b'{"role": "team_admin", "team_id": "\\ud800"}'),
    ],
)
def test_id_with_a_lone_surrogate_in_a_body_is_422_and_nothing_is_stored(
    served: ServedApp, method: str, path: str, field: str, body: bytes
) -> None:
    url = path.format(team=uid("team"), key=uid("key"))
    headers = {**ADMIN, "content-type": "application/json"}
    assert_error(served.request(method, url, content=body, headers=headers), 422, "invalid", field)
    if method == "PUT":
        assert_error(served.request("GET", url, headers=ADMIN), 404, "not_found")


@pytest.mark.parametrize(
    "url",
    [
        "/v1/orgs?after=%00",
        "/v1/teams?after=a%00b",
        "/v1/tokens?after=%00",
        "/v1/keys?after=%00",
        "/v1/budgets?after=team:%00",
        "/v1/teams/t1/members?after=%00",
        "/v1/keys?team_id=%00",
        "/v1/budgets?team_id=t%00",
    ],
)
def test_list_cursor_or_team_filter_with_a_nul_character_is_422(served: ServedApp, url: str) -> None:
    field = "team_id" if "team_id=" in url else "after"
    assert_error(served.request("GET", url, headers=ADMIN), 422, "invalid", field)


@pytest.mark.parametrize("tz", ["Europe", "America", "a" * 300, "x/" * 200])
def test_time_zone_that_is_a_tzdata_directory_or_too_long_is_422(served: ServedApp, tz: str) -> None:
    body = {"limits": [{"window": "1d", "max_usd": "10"}], "tz": tz}
    assert_error(
        served.request("PUT", f"/v1/budgets/team:{uid('t')}", json=body, headers=ADMIN), 422, "invalid", "tz"
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/budgets/team:{team}"),
        ("PUT", "/v1/teams/{team}"),
        ("POST", "/v1/tokens"),
        ("POST", "/v1/check"),
    ],
)
@pytest.mark.parametrize("body", [b"{not json", b'{"limits": [', b"\xff\xfe", b"tz=UTC"])
def test_body_that_is_not_json_is_400(served: ServedApp, method: str, path: str, body: bytes) -> None:
    headers = {**ADMIN, "content-type": "application/json"}
    resp = served.request(method, path.format(team=uid("team")), content=body, headers=headers)
    assert_error(resp, 400, "bad_request", "JSON")


async def test_a_value_postgres_refuses_is_422_from_the_repository(migrated_database_url: str) -> None:
    """Behind the routes' validation, the repository turns Postgres' DataError into a 422 too."""
    pool = await open_pool(migrated_database_url)
    try:
        await pool.wait()
        admin = Principal(Role.ADMIN, None, "bootstrap-admin")
        with pytest.raises(Unprocessable):
            await ControlService(PostgresControlStore(pool)).list_orgs(admin, after="a\x00")
        with pytest.raises(Unprocessable):
            await ControlService(PostgresControlStore(pool)).get_org(admin, "\ud800")
    finally:
        await pool.close()


# --- the contract's error cases, over the whole app -----------------------------------------------


def test_budget_body_errors_are_422_naming_the_field(served: ServedApp) -> None:
    url = f"/v1/budgets/team:{uid('team')}"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"limits": [], "tz": "UTC", "colour": "red"}, "colour"),
        ({"limits": [{"window": "1d", "max_usd": "1", "hard": "2"}]}, "hard"),
        (
            {"limits": [{"window": "1d", "max_usd": "1"}, {"window": "1d", "max_usd": "2"}]},
            "limits[1].window",
        ),
        ({"limits": [{"window": "1h", "max_usd": "1", "soft_usd": "2"}]}, "limits[0].soft_usd"),
        ({"limits": [{"window": "1h", "max_usd": "1"}], "tz": "Mars/Olympus_Mons"}, "tz"),
        ({"limits": [{"window": "1h", "max_usd": "1e999999999"}]}, "limits[0].max_usd"),
        ({"limits": [{"window": "1h", "max_usd": 1e308}]}, "limits[0].max_usd"),
        ({"limits": [{"window": "99999999999999999999h", "max_usd": "1"}]}, "limits[0].window"),
        ({"limits": {"window": "1h"}}, "limits"),
    ]
    for body, field in cases:
        assert_error(served.request("PUT", url, json=body, headers=ADMIN), 422, "invalid", field)
    not_objects: list[Any] = [[], "budget", 5]
    for body_that_is_not_an_object in not_objects:
        resp = served.request("PUT", url, json=body_that_is_not_an_object, headers=ADMIN)
        assert_error(resp, 422, "invalid", "body")
    assert_error(served.request("GET", url, headers=ADMIN), 404, "not_found")  # nothing was stored


def test_missing_or_invalid_bearer_is_401_and_viewer_writes_are_403(served: ServedApp) -> None:
    team = uid("team")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic " + ADMIN_TOKEN}):
        for method, url in (("PUT", f"/v1/teams/{team}"), ("POST", "/v1/check"), ("GET", "/v1/spend/key:k")):
            resp = served.request(
                method, url, json={"key_id": "k"} if method == "POST" else {}, headers=headers
            )
            assert_error(resp, 401, "unauthorized")
            assert resp.headers["www-authenticate"] == "Bearer"

    minted = served.request("POST", "/v1/tokens", json={"role": "viewer"}, headers=ADMIN)
    assert minted.status_code == 201, minted.text
    viewer = {"Authorization": f"Bearer {minted.json()['token']}"}
    budget = {"limits": [{"window": "1d", "max_usd": "1"}]}
    assert_error(served.request("PUT", f"/v1/teams/{team}", json={}, headers=viewer), 403, None)
    assert_error(served.request("PUT", f"/v1/budgets/team:{team}", json=budget, headers=viewer), 403, None)
    assert_error(served.request("PUT", f"/v1/keys/{uid('key')}", json={}, headers=viewer), 403, None)
    assert_error(
        served.request("GET", f"/v1/teams/{team}", headers=viewer), 404, "not_found"
    )  # reads are allowed
