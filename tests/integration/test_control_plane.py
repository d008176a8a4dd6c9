"""Control plane over HTTP (router + real Postgres): authority, validation, idempotence, audit."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from psycopg_pool import AsyncConnectionPool
from pydantic import SecretStr

from spendgate.api.auth import TokenCache
from spendgate.api.control import install_control_plane
from spendgate.api.errors import install_error_handlers
from spendgate.control.service import ControlService
from spendgate.store.control import PostgresControlStore
from spendgate.store.pool import open_pool

pytestmark = pytest.mark.broker_agnostic  # see pyproject.toml: make test-kafka skips it

ADMIN_TOKEN = "test-admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def app_for(control: ControlService) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    install_control_plane(app, control, TokenCache(SecretStr(ADMIN_TOKEN)))
    return app


def client_for(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://spendgate")


@pytest.fixture(scope="module")
async def pool(migrated_database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = await open_pool(migrated_database_url)
    await pool.wait()
    yield pool
    await pool.close()


@pytest.fixture(scope="module")
async def client(pool: AsyncConnectionPool) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app_for(ControlService(PostgresControlStore(pool)))) as c:
        yield c


async def mint(client: httpx.AsyncClient, role: str, team_id: str | None = None) -> dict[str, str]:
    body: dict[str, Any] = {"role": role}
    if team_id is not None:
        body["team_id"] = team_id
    resp = await client.post("/v1/tokens", json=body, headers=ADMIN)
    assert resp.status_code == 201, resp.text
    return {"Authorization": f"Bearer {resp.json()['token']}"}


async def make_team(client: httpx.AsyncClient, *, budget_usd: str | None = None) -> str:
    team = uid("team")
    assert (await client.put(f"/v1/teams/{team}", json={}, headers=ADMIN)).status_code == 200
    if budget_usd is not None:
        body = {"limits": [{"window": "1mo", "max_usd": budget_usd}]}
        assert (await client.put(f"/v1/budgets/team:{team}", json=body, headers=ADMIN)).status_code == 200
    return team


async def audit_for(client: httpx.AsyncClient, target: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if after is not None:
            params["after"] = after
        page = (await client.get("/v1/audit", params=params, headers=ADMIN)).json()
        rows += [r for r in page["items"] if r["target"] == target]
        after = page["next"]
        if after is None:
            return rows


async def test_team_admin_sets_key_budget_under_team_ceiling_and_is_refused_above_it(
    client: httpx.AsyncClient,
) -> None:
    team = await make_team(client, budget_usd="1000")
    team_admin = await mint(client, "team_admin", team)
    key = uid("key")
    assert (
        await client.put(f"/v1/keys/{key}", json={"team_id": team}, headers=team_admin)
    ).status_code == 200

    ok = await client.put(
        f"/v1/budgets/key:{key}", json={"limits": [{"window": "1mo", "max_usd": "100"}]}, headers=team_admin
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["limits"] == [{"window": "1mo", "max_usd": "100", "soft_usd": None}]

    refused = await client.put(
        f"/v1/budgets/key:{key}", json={"limits": [{"window": "1mo", "max_usd": 2000}]}, headers=team_admin
    )
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "ceiling_exceeded"
    assert error["message"] == f"limit 2000 for window 1mo exceeds team {team}'s limit 1000"
    stored = await client.get(f"/v1/budgets/key:{key}", headers=team_admin)
    assert stored.json()["limits"][0]["max_usd"] == "100"


async def test_member_without_budget_is_an_ordinary_state(client: httpx.AsyncClient) -> None:
    team = await make_team(client, budget_usd="1000")
    team_admin = await mint(client, "team_admin", team)
    assert (await client.put(f"/v1/teams/{team}/members/alice", headers=team_admin)).status_code == 200
    assert (await client.get(f"/v1/teams/{team}/members/alice", headers=team_admin)).status_code == 200
    missing = await client.get(f"/v1/budgets/member:{team}/alice", headers=team_admin)
    assert missing.status_code == 404

    for body in ({"limits": None}, {"limits": []}, {"limits": [{"window": "1d", "max_usd": "5"}]}, {}):
        resp = await client.put(f"/v1/budgets/member:{team}/alice", json=body, headers=team_admin)
        assert resp.status_code == 200, resp.text
        got = await client.get(f"/v1/budgets/member:{team}/alice", headers=team_admin)
        assert got.status_code == 200
    assert got.json()["limits"] is None

    listed = await client.get("/v1/budgets", params={"team_id": team}, headers=team_admin)
    assert listed.status_code == 200
    assert {b["scope"] for b in listed.json()["items"]} == {f"team:{team}", f"member:{team}/alice"}
    members = await client.get(f"/v1/teams/{team}/members", headers=team_admin)
    assert [m["user_id"] for m in members.json()["items"]] == ["alice"]
    assert (await client.delete(f"/v1/budgets/member:{team}/alice", headers=team_admin)).status_code == 204


async def test_put_twice_is_one_change_with_one_audit_row(client: httpx.AsyncClient) -> None:
    org = uid("org")
    assert (await client.put(f"/v1/orgs/{org}", headers=ADMIN)).status_code == 200
    team = uid("team")
    first = await client.put(f"/v1/teams/{team}", json={"org_id": org}, headers=ADMIN)
    second = await client.put(f"/v1/teams/{team}", json={"org_id": org}, headers=ADMIN)
    assert first.status_code == second.status_code == 200
    assert (
        first.json() == second.json() == {"team_id": team, "org_id": org, "version": first.json()["version"]}
    )
    rows = await audit_for(client, f"team/{team}")
    assert len(rows) == 1
    assert rows[0]["actor"] == "bootstrap-admin" and rows[0]["actor_role"] == "admin"
    assert rows[0]["action"] == "put_team" and rows[0]["before"] is None
    assert rows[0]["after"]["org_id"] == org

    third = await client.put(f"/v1/teams/{team}", json={}, headers=ADMIN)
    assert third.json()["version"] > first.json()["version"]
    rows = await audit_for(client, f"team/{team}")
    assert [r["before"]["org_id"] for r in rows[1:]] == [org]
    assert rows[1]["after"]["org_id"] is None


async def test_deleting_a_team_that_still_has_keys_is_a_conflict_naming_them(
    client: httpx.AsyncClient,
) -> None:
    team = await make_team(client)
    key = uid("key")
    await client.put(f"/v1/keys/{key}", json={"team_id": team}, headers=ADMIN)
    resp = await client.delete(f"/v1/teams/{team}", headers=ADMIN)
    assert resp.status_code == 409
    assert key in resp.json()["error"]["message"]
    assert (await client.delete(f"/v1/keys/{key}", headers=ADMIN)).status_code == 204
    assert (await client.delete(f"/v1/teams/{team}", headers=ADMIN)).status_code == 204
    assert (await client.get(f"/v1/teams/{team}", headers=ADMIN)).status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("put", "/v1/teams/{team}", {"org": "x"}, "org"),
        ("put", "/v1/keys/k-{team}", {"team_id": "{team}", "colour": "red"}, "colour"),
        ("post", "/v1/tokens", {"role": "gateway", "extra": 1}, "extra"),
        ("post", "/v1/tokens", {"role": "root"}, "role"),
        ("put", "/v1/budgets/team:{team}", {"limits": [], "tz": "Mars/Base"}, "tz"),
        ("put", "/v1/budgets/team:{team}", {"limits": [], "owner": "me"}, "body"),
        (
            "put",
            "/v1/budgets/team:{team}",
            {"limits": [{"window": "1h", "max_usd": "-1"}]},
            "limits[0].max_usd",
        ),
        (
            "put",
            "/v1/budgets/team:{team}",
            {"limits": [{"window": "1h", "max_usd": "1"}, {"window": "1h", "max_usd": "2"}]},
            "limits[1].window",
        ),
        (
            "put",
            "/v1/budgets/team:{team}",
            {"limits": [{"window": "1h", "max_usd": "1", "soft_usd": "2"}]},
            "limits[0].soft_usd",
        ),
        ("put", "/v1/budgets/galaxy:{team}", {"limits": []}, "scope"),
        ("put", "/v1/teams/" + "x" * 257, {}, "team_id"),
    ],
)
async def test_invalid_input_is_422_naming_the_field(
    client: httpx.AsyncClient, method: str, path: str, body: dict[str, Any], field: str
) -> None:
    team = await make_team(client)
    import json

    payload = json.loads(json.dumps(body).replace("{team}", team))
    resp = await client.request(method.upper(), path.replace("{team}", team), json=payload, headers=ADMIN)
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid"
    assert field in error["message"]


async def test_authentication_and_roles(client: httpx.AsyncClient) -> None:
    team = await make_team(client)
    missing = await client.get(f"/v1/teams/{team}")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    assert (
        await client.get(f"/v1/teams/{team}", headers={"Authorization": "Bearer nope"})
    ).status_code == 401

    gateway = await mint(client, "gateway")
    assert (await client.get(f"/v1/teams/{team}", headers=gateway)).status_code == 403
    viewer = await mint(client, "viewer")
    assert (await client.get(f"/v1/teams/{team}", headers=viewer)).status_code == 200
    assert (await client.put(f"/v1/teams/{team}", json={}, headers=viewer)).status_code == 403
    assert (await client.get("/v1/audit", headers=viewer)).status_code == 403

    team_admin = await mint(client, "team_admin", team)
    other = await make_team(client)
    assert (await client.get(f"/v1/teams/{other}", headers=team_admin)).status_code == 403
    assert (await client.put(f"/v1/teams/{other}/members/bob", headers=team_admin)).status_code == 403
    assert (await client.post("/v1/tokens", json={"role": "gateway"}, headers=team_admin)).status_code == 403
    assert (
        await client.put(f"/v1/budgets/team:{team}", json={"limits": []}, headers=team_admin)
    ).status_code == 403

    token_id = viewer["Authorization"].split(".")[1]
    assert (await client.delete(f"/v1/tokens/{token_id}", headers=ADMIN)).status_code == 204
    assert (await client.get(f"/v1/teams/{team}", headers=viewer)).status_code == 401


async def test_team_admin_cannot_take_another_teams_key(client: httpx.AsyncClient) -> None:
    mine, theirs = await make_team(client), await make_team(client)
    key = uid("key")
    await client.put(f"/v1/keys/{key}", json={"team_id": theirs}, headers=ADMIN)
    team_admin = await mint(client, "team_admin", mine)
    assert (
        await client.put(f"/v1/keys/{key}", json={"team_id": mine}, headers=team_admin)
    ).status_code == 403
    budget = {"limits": [{"window": "1d", "max_usd": "1"}]}
    assert (await client.put(f"/v1/budgets/key:{key}", json=budget, headers=team_admin)).status_code == 403
    assert (await client.get(f"/v1/keys/{key}", headers=team_admin)).status_code == 403


async def test_list_endpoints_paginate(client: httpx.AsyncClient) -> None:
    team = await make_team(client)
    keys = sorted(uid("k") for _ in range(5))
    for key in keys:
        await client.put(f"/v1/keys/{key}", json={"team_id": team, "user_id": "u"}, headers=ADMIN)
    seen: list[str] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"team_id": team, "limit": 2}
        if after:
            params["after"] = after
        page = (await client.get("/v1/keys", params=params, headers=ADMIN)).json()
        assert len(page["items"]) <= 2
        seen += [k["key_id"] for k in page["items"]]
        after = page["next"]
        if after is None:
            break
    assert seen == keys
    assert (await client.get("/v1/keys", params={"limit": 0}, headers=ADMIN)).status_code == 422


async def test_budget_scope_with_an_encoded_slash_round_trips(client: httpx.AsyncClient) -> None:
    team = await make_team(client, budget_usd="50")
    key = uid("key")
    await client.put(f"/v1/keys/{key}", json={"team_id": team}, headers=ADMIN)
    team_admin = await mint(client, "team_admin", team)
    path = f"/v1/budgets/key_model:{key}/openai%2Fgpt-4o"
    resp = await client.put(path, json={"limits": [{"window": "1mo", "max_usd": "10.5"}]}, headers=team_admin)
    assert resp.status_code == 200, resp.text
    assert resp.json()["scope"] == f"key_model:{key}/openai%2Fgpt-4o"
    assert (await client.get(path, headers=team_admin)).json()["limits"][0]["max_usd"] == "10.5"


async def test_database_down_answers_503() -> None:
    dead = await open_pool("postgresql://postgres@127.0.0.1:1/none?connect_timeout=1", timeout_s=0.5)
    try:
        async with client_for(app_for(ControlService(PostgresControlStore(dead)))) as c:
            resp = await c.put(f"/v1/orgs/{uid('o')}", headers=ADMIN)
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "database_unavailable"
        assert "unavailable" in resp.json()["error"]["message"]
    finally:
        await dead.close()
