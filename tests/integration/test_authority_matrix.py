"""The standing authority matrix (CONTRACT §4): every role x every route x every scope kind.

One whole app (``create_app``: gate + control plane, real broker and Postgres) serves the module.
Each ``Row`` is one request; it is sent once per role and must answer exactly the status of
its column. A row's ``setup`` runs (as admin) and makes fresh objects named ``{new}`` for each
role that should succeed (and one set for the refused ones), so what one role did never changes
what the next one finds; ``T``, ``U``, ``O`` are the module's teams and org (keys ``kT``/``kU``,
members ``alice``/``bob``).

Adding a route: add a row (``test_every_route_is_in_the_matrix`` walks ``app.routes`` and fails
until one exists). The issue-11 escalations are rows here too, and tested in depth at the end.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from pydantic import SecretStr
from tests.kafka_helpers import eventually, produce, read_all

from spendgate.adapters.kafka import ensure_topics
from spendgate.api.app import create_app
from spendgate.settings import Settings

pytestmark = pytest.mark.broker_agnostic  # see pyproject.toml: make test-kafka skips it

ADMIN_TOKEN = "authz-admin-" + uuid.uuid4().hex
ROLES = ("admin", "ta_T", "ta_U", "viewer", "gateway", "none", "revoked")
T, U, O, OU = "team-t", "team-u", "org-o", "org-ou"  # noqa: E741 (O: the org, like T and U)
DAY = {"limits": [{"window": "1d", "max_usd": "100"}]}  # the teams' budgets (ceilings)
SMALL = {"limits": [{"window": "1d", "max_usd": "5"}]}


def iso(instant: datetime) -> str:
    return instant.isoformat().replace("+00:00", "Z")


def today() -> tuple[datetime, datetime]:
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


def state_record(scope: str, spend_usd: str) -> dict[str, Any]:
    start, end = today()
    return {
        "v": 1,
        "scope": scope,
        "as_of": iso(datetime.now(UTC)),
        "source": {"partition": 0, "offset": 1},
        "windows": [
            {"window": "1d", "start": iso(start), "resets_at": iso(end), "spend_usd": spend_usd},
            {"window": "total", "start": None, "resets_at": None, "spend_usd": spend_usd},
        ],
    }


def blocked_record(scope: str, spend_usd: str = "2", limit_usd: str = "1") -> dict[str, Any]:
    _, end = today()
    return {
        "v": 1,
        "scope": scope,
        "blocked": True,
        "seq": time.time_ns() // 1000,
        "as_of": iso(datetime.now(UTC)),
        "windows": [{"window": "1d", "spend_usd": spend_usd, "limit_usd": limit_usd, "resets_at": iso(end)}],
    }


@dataclass
class World:
    app: FastAPI
    client: httpx.AsyncClient
    settings: Settings
    headers: dict[str, dict[str, str]]  # role -> Authorization header

    async def admin(
        self, method: str, path: str, body: Any = None, expect: int | None = None
    ) -> httpx.Response:
        resp = await self.client.request(method, path, json=body, headers=self.headers["admin"])
        assert resp.status_code < 300 if expect is None else resp.status_code == expect, (path, resp.text)
        return resp

    async def mint(self, role: str, team_id: str | None = None) -> tuple[str, dict[str, str]]:
        body = {"role": role, **({"team_id": team_id} if team_id else {})}
        token = (await self.admin("POST", "/v1/tokens", body)).json()
        return token["token_id"], {"Authorization": f"Bearer {token['token']}"}


@pytest.fixture(scope="module")
async def world(
    kafka_bootstrap: str, migrated_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
        partitions=2,
        data_dir=Path(tmp_path_factory.mktemp("authz")),
        api_port=0,
        worker_web_port=0,
        database_url=migrated_database_url,
        admin_token=SecretStr(ADMIN_TOKEN),
    )
    await ensure_topics(settings)
    app = create_app(settings)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://authz", timeout=30)
        )

        async def ready() -> None:
            assert (await client.get("/readyz")).status_code == 200

        await eventually(ready, timeout=60, interval=0.05)
        w = World(app, client, settings, {"admin": {"Authorization": f"Bearer {ADMIN_TOKEN}"}, "none": {}})
        for org in (O, OU):
            await w.admin("PUT", f"/v1/orgs/{org}")
        await w.admin("PUT", f"/v1/teams/{T}", {"org_id": O})
        await w.admin("PUT", f"/v1/teams/{U}", {"org_id": OU})
        await w.admin("PUT", f"/v1/teams/{T}/members/alice")
        await w.admin("PUT", f"/v1/teams/{U}/members/bob")
        await w.admin("PUT", "/v1/keys/kT", {"team_id": T, "user_id": "alice"})
        await w.admin("PUT", "/v1/keys/kU", {"team_id": U, "user_id": "bob"})
        for scope in (f"team:{T}", f"team:{U}"):
            await w.admin("PUT", f"/v1/budgets/{scope}", DAY)
        for scope in WORLD_BUDGETS:
            await w.admin("PUT", f"/v1/budgets/{scope}", SMALL)
        _, w.headers["ta_T"] = await w.mint("team_admin", T)
        _, w.headers["ta_U"] = await w.mint("team_admin", U)
        _, w.headers["viewer"] = await w.mint("viewer")
        _, w.headers["gateway"] = await w.mint("gateway")
        revoked_id, w.headers["revoked"] = await w.mint("team_admin", T)
        await w.admin("DELETE", f"/v1/tokens/{revoked_id}", expect=204)
        yield w


WORLD_BUDGETS = (
    f"member:{T}/alice",
    "key:kT",
    "key_model:kT/m1",
    "user:alice",
    f"org:{O}",
    "end_user:e1",
    "model:m1",
    "tag:prod",
)

# --- setups: what a row acts on, made fresh (as admin) before each cell ----------------------------

Setup = Callable[[World, str], Awaitable[dict[str, str] | None]]


def key_in(team: str | None, user: str | None = None, *, budget: bool = False) -> Setup:
    async def setup(w: World, new: str) -> None:
        await w.admin("PUT", f"/v1/keys/{new}", {"team_id": team, "user_id": user})
        if budget:
            await w.admin("PUT", f"/v1/budgets/key:{new}", SMALL)

    return setup


def moved_out_of_t(*, budget: bool = False) -> Setup:
    """A key that was in T a moment ago: an admin moved it to U."""

    async def setup(w: World, new: str) -> None:
        await key_in(T, budget=budget)(w, new)
        await w.admin("PUT", f"/v1/keys/{new}", {"team_id": U})

    return setup


async def revoked_in_t(w: World, new: str) -> None:
    await key_in(T, "alice")(w, new)
    await w.admin("DELETE", f"/v1/keys/{new}", expect=204)


async def spent_unregistered(w: World, new: str) -> None:
    """A key never registered, but used: the gate holds spend for it."""
    await produce(w.settings, "state", [(f"key:{new}", state_record(f"key:{new}", "3"))])

    async def seen() -> None:
        spend = (await w.admin("GET", f"/v1/spend/key:{new}")).json()
        assert spend["windows"][-1]["spend_usd"] == "3"

    await eventually(seen, timeout=10, interval=0.02)


async def budgeted_unregistered(w: World, new: str) -> None:
    await w.admin("PUT", f"/v1/budgets/key:{new}", SMALL)


async def member_of_t(w: World, new: str) -> None:
    await w.admin("PUT", f"/v1/teams/{T}/members/{new}")


async def fresh_org(w: World, new: str) -> None:
    await w.admin("PUT", f"/v1/orgs/{new}")


async def fresh_team(w: World, new: str) -> None:
    await w.admin("PUT", f"/v1/teams/{new}")


async def fresh_token(w: World, new: str) -> dict[str, str]:
    token_id, _ = await w.mint("gateway")
    return {"token": token_id}


async def t_in_its_org(w: World, new: str) -> None:
    await w.admin("PUT", f"/v1/teams/{T}", {"org_id": O})  # (re)set: an admin cell moves it


async def t_budget(w: World, new: str) -> None:
    await w.admin("PUT", f"/v1/budgets/team:{T}", DAY)  # (re)set: an admin cell removes it


def budget_on(scope: str, *, key_in_t: bool = False, moved: bool = False) -> Setup:
    async def setup(w: World, new: str) -> None:
        if key_in_t:
            await key_in(T)(w, new)
        if moved:
            await moved_out_of_t()(w, new)
        await w.admin("PUT", f"/v1/budgets/{scope.format(T=T, U=U, new=new)}", SMALL)

    return setup


def webhook_on(*scopes: str) -> Setup:
    """A webhook ``{new}`` (made by an admin) watching ``scopes``."""

    async def setup(w: World, new: str) -> None:
        body = {"url": "http://127.0.0.1:9/hook", "scopes": [s.format(T=T, U=U) for s in scopes]}
        await w.admin("PUT", f"/v1/webhooks/{new}", body)

    return setup


def hook(*scopes: str) -> dict[str, Any]:
    return {"url": "http://127.0.0.1:9/hook", "scopes": list(scopes), "kinds": ["blocked"]}


# --- the matrix ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    method: str
    path: str
    expect: tuple[int, int, int, int, int]  # admin, team_admin of T, team_admin of U, viewer, gateway
    body: Any = None
    setup: Setup | None = None
    public: bool = False  # no token needed: "none" and "revoked" get the admin's status too
    serial: bool = False  # the cells act on one shared object: one after the other, setup first

    def status(self, role: str) -> int:
        if role in ("none", "revoked"):
            return self.expect[0] if self.public else 401
        return self.expect[ROLES.index(role)]


def row(
    name: str,
    method: str,
    path: str,
    *expect: int,
    body: Any = None,
    setup: Setup | None = None,
    serial: bool = False,
) -> Row:
    """One request; ``expect``: the status for admin, team_admin of T, of U, viewer, gateway."""
    admin, ta_t, ta_u, viewer, gateway = expect
    return Row(name, method, path, (admin, ta_t, ta_u, viewer, gateway), body, setup, serial=serial)


def public(path: str) -> Row:
    return Row(f"public {path}", "GET", path, (200, 200, 200, 200, 200), public=True)


EVENT = {"event_id": "{new}", "occurred_at": iso(datetime.now(UTC)), "key_id": "k-events", "cost_usd": "0.01"}
LIM = SMALL
OVER_CEILING = {"limits": [{"window": "1d", "max_usd": "1000"}]}

# fmt: off
MATRIX: list[Row] = [
    # name                                       method  path                       admin taT  taU  view  gw
    # --- tokens
    row("mint a gateway token", "POST", "/v1/tokens", 201, 403, 403, 403, 403, body={"role": "gateway"}),
    row("mint a team_admin token for T", "POST", "/v1/tokens", 201, 403, 403, 403, 403,
        body={"role": "team_admin", "team_id": T}),
    row("list tokens", "GET", "/v1/tokens", 200, 403, 403, 403, 403),
    row("revoke a token", "DELETE", "/v1/tokens/{token}", 204, 403, 403, 403, 403, setup=fresh_token),
    # --- orgs
    row("create an org", "PUT", "/v1/orgs/{new}", 200, 403, 403, 403, 403),
    row("read T's org", "GET", f"/v1/orgs/{O}", 200, 403, 403, 200, 403),
    row("delete an org", "DELETE", "/v1/orgs/{new}", 204, 403, 403, 403, 403, setup=fresh_org),
    row("list orgs", "GET", "/v1/orgs", 200, 403, 403, 200, 403),
    # --- teams
    row("create a team", "PUT", "/v1/teams/{new}", 200, 403, 403, 403, 403),
    row("change team T (same body)", "PUT", f"/v1/teams/{T}", 200, 403, 403, 403, 403, body={"org_id": O}),
    row("move team T to U's org", "PUT", f"/v1/teams/{T}", 200, 403, 403, 403, 403, body={"org_id": OU},
        setup=t_in_its_org, serial=True),
    row("read team T", "GET", f"/v1/teams/{T}", 200, 200, 403, 200, 403),
    row("delete a team", "DELETE", "/v1/teams/{new}", 204, 403, 403, 403, 403, setup=fresh_team),
    row("list teams", "GET", "/v1/teams", 200, 403, 403, 200, 403),
    # --- members
    row("add a member to T", "PUT", f"/v1/teams/{T}/members/{{new}}", 200, 200, 403, 403, 403),
    row("add a member to U", "PUT", f"/v1/teams/{U}/members/{{new}}", 200, 403, 200, 403, 403),
    row("read a member of T", "GET", f"/v1/teams/{T}/members/alice", 200, 200, 403, 200, 403),
    row("remove a member of T", "DELETE", f"/v1/teams/{T}/members/{{new}}", 204, 204, 403, 403, 403,
        setup=member_of_t),
    row("list T's members", "GET", f"/v1/teams/{T}/members", 200, 200, 403, 200, 403),
    # --- keys: registering (issue 11: claiming keys, escaping a user budget)
    row("register a new key into T", "PUT", "/v1/keys/{new}", 200, 200, 403, 403, 403, body={"team_id": T}),
    row("register a new key into T for member alice", "PUT", "/v1/keys/{new}", 200, 200, 403, 403, 403,
        body={"team_id": T, "user_id": "alice"}),
    row("register a new key into T for a non-member", "PUT", "/v1/keys/{new}", 200, 403, 403, 403, 403,
        body={"team_id": T, "user_id": "mallory"}),
    row("register a new key into no team", "PUT", "/v1/keys/{new}", 200, 403, 403, 403, 403, body={}),
    row("re-register a key of T unchanged", "PUT", "/v1/keys/{new}", 200, 200, 403, 403, 403,
        body={"team_id": T, "user_id": "alice"}, setup=key_in(T, "alice")),
    row("change the user of a key of T", "PUT", "/v1/keys/{new}", 200, 403, 403, 403, 403,
        body={"team_id": T, "user_id": "nobody"}, setup=key_in(T, "alice")),
    row("move a key of T to U", "PUT", "/v1/keys/{new}", 200, 403, 403, 403, 403,
        body={"team_id": U}, setup=key_in(T)),
    row("claim a key of U into T", "PUT", "/v1/keys/{new}", 200, 403, 403, 403, 403,
        body={"team_id": T}, setup=key_in(U)),
    row("claim a teamless key into T", "PUT", "/v1/keys/{new}", 200, 403, 403, 403, 403,
        body={"team_id": T}, setup=key_in(None)),
    row("claim an unregistered key with spend", "PUT", "/v1/keys/{new}", 200, 403, 403, 403, 403,
        body={"team_id": T}, setup=spent_unregistered),
    row("claim an unregistered key with a budget", "PUT", "/v1/keys/{new}", 200, 403, 403, 403, 403,
        body={"team_id": T}, setup=budgeted_unregistered),
    row("re-register a revoked key of T", "PUT", "/v1/keys/{new}", 200, 403, 403, 403, 403,
        body={"team_id": T, "user_id": "alice"}, setup=revoked_in_t),
    row("take back a key moved out of T", "PUT", "/v1/keys/{new}", 200, 403, 403, 403, 403,
        body={"team_id": T}, setup=moved_out_of_t()),
    # --- keys: reading, revoking, listing
    row("read a key of T", "GET", "/v1/keys/kT", 200, 200, 403, 200, 403),
    row("read a key moved out of T", "GET", "/v1/keys/{new}", 200, 403, 200, 200, 403,
        setup=moved_out_of_t()),
    row("read a revoked key of T", "GET", "/v1/keys/{new}", 200, 200, 403, 200, 403, setup=revoked_in_t),
    row("revoke a key of T", "DELETE", "/v1/keys/{new}", 204, 204, 403, 403, 403, setup=key_in(T)),
    row("revoke a key moved out of T", "DELETE", "/v1/keys/{new}", 204, 403, 204, 403, 403,
        setup=moved_out_of_t()),
    row("revoke a revoked key of T again", "DELETE", "/v1/keys/{new}", 204, 204, 403, 403, 403,
        setup=revoked_in_t),
    row("list all keys", "GET", "/v1/keys", 200, 403, 403, 200, 403),
    row("list T's keys", "GET", f"/v1/keys?team_id={T}", 200, 200, 403, 200, 403),
    # --- budgets: set, on every scope kind
    row("set team T's budget (same)", "PUT", f"/v1/budgets/team:{T}", 200, 403, 403, 403, 403, body=DAY),
    row("set a member budget in T", "PUT", f"/v1/budgets/member:{T}/{{new}}", 200, 200, 403, 403, 403,
        body=LIM),
    row("set a member budget in U", "PUT", f"/v1/budgets/member:{U}/{{new}}", 200, 403, 200, 403, 403,
        body=LIM),
    row("set a key budget in T", "PUT", "/v1/budgets/key:{new}", 200, 200, 403, 403, 403,
        body=LIM, setup=key_in(T)),
    row("set a key budget above T's ceiling", "PUT", "/v1/budgets/key:{new}", 200, 403, 403, 403, 403,
        body=OVER_CEILING, setup=key_in(T)),
    row("set a key budget moved out of T", "PUT", "/v1/budgets/key:{new}", 200, 403, 200, 403, 403,
        body=LIM, setup=moved_out_of_t()),
    row("set an unregistered key's budget", "PUT", "/v1/budgets/key:{new}", 200, 403, 403, 403, 403,
        body=LIM),
    row("set a key_model budget in T", "PUT", "/v1/budgets/key_model:{new}/m1", 200, 200, 403, 403, 403,
        body=LIM, setup=key_in(T)),
    row("set a user budget", "PUT", "/v1/budgets/user:{new}", 200, 403, 403, 403, 403, body=LIM),
    row("set an org budget", "PUT", "/v1/budgets/org:{new}", 200, 403, 403, 403, 403, body=LIM),
    row("set an end_user budget", "PUT", "/v1/budgets/end_user:{new}", 200, 403, 403, 403, 403, body=LIM),
    row("set a model budget", "PUT", "/v1/budgets/model:{new}", 200, 403, 403, 403, 403, body=LIM),
    row("set a tag budget", "PUT", "/v1/budgets/tag:{new}", 200, 403, 403, 403, 403, body=LIM),
    # --- budgets: read
    row("read team T's budget", "GET", f"/v1/budgets/team:{T}", 200, 200, 403, 200, 403),
    row("read a member budget in T", "GET", f"/v1/budgets/member:{T}/alice", 200, 200, 403, 200, 403),
    row("read a key budget in T", "GET", "/v1/budgets/key:kT", 200, 200, 403, 200, 403),
    row("read a key_model budget in T", "GET", "/v1/budgets/key_model:kT/m1", 200, 200, 403, 200, 403),
    row("read a user budget", "GET", "/v1/budgets/user:alice", 200, 403, 403, 200, 403),
    row("read an org budget", "GET", f"/v1/budgets/org:{O}", 200, 403, 403, 200, 403),
    row("read an end_user budget", "GET", "/v1/budgets/end_user:e1", 200, 403, 403, 200, 403),
    row("read a model budget", "GET", "/v1/budgets/model:m1", 200, 403, 403, 200, 403),
    row("read a tag budget", "GET", "/v1/budgets/tag:prod", 200, 403, 403, 200, 403),
    row("list all budgets", "GET", "/v1/budgets", 200, 403, 403, 200, 403),
    row("list T's budgets", "GET", f"/v1/budgets?team_id={T}", 200, 200, 403, 200, 403),
    # --- budgets: remove
    row("remove team T's budget", "DELETE", f"/v1/budgets/team:{T}", 204, 403, 403, 403, 403,
        setup=t_budget, serial=True),
    row("remove a member budget in T", "DELETE", f"/v1/budgets/member:{T}/{{new}}", 204, 204, 403, 403, 403,
        setup=budget_on("member:{T}/{new}")),
    row("remove a key budget in T", "DELETE", "/v1/budgets/key:{new}", 204, 204, 403, 403, 403,
        setup=budget_on("key:{new}", key_in_t=True)),
    row("remove a key budget moved out of T", "DELETE", "/v1/budgets/key:{new}", 204, 403, 204, 403, 403,
        setup=budget_on("key:{new}", moved=True)),
    row("remove a key_model budget in T", "DELETE", "/v1/budgets/key_model:{new}/m1", 204, 204, 403, 403, 403,
        setup=budget_on("key_model:{new}/m1", key_in_t=True)),
    row("remove a user budget", "DELETE", "/v1/budgets/user:{new}", 204, 403, 403, 403, 403,
        setup=budget_on("user:{new}")),
    row("remove an org budget", "DELETE", "/v1/budgets/org:{new}", 204, 403, 403, 403, 403,
        setup=budget_on("org:{new}")),
    row("remove an end_user budget", "DELETE", "/v1/budgets/end_user:{new}", 204, 403, 403, 403, 403,
        setup=budget_on("end_user:{new}")),
    row("remove a model budget", "DELETE", "/v1/budgets/model:{new}", 204, 403, 403, 403, 403,
        setup=budget_on("model:{new}")),
    row("remove a tag budget", "DELETE", "/v1/budgets/tag:{new}", 204, 403, 403, 403, 403,
        setup=budget_on("tag:{new}")),
    # --- alert webhooks (issue 18): a team admin only inside its team; viewers and gateways never
    row("subscribe to T's alerts", "PUT", "/v1/webhooks/{new}", 200, 200, 403, 403, 403,
        body=hook(f"team:{T}", f"member:{T}/*", "key:kT", "key_model:kT/*")),
    row("subscribe to U's alerts", "PUT", "/v1/webhooks/{new}", 200, 403, 200, 403, 403,
        body=hook(f"team:{U}")),
    row("subscribe to every team's alerts", "PUT", "/v1/webhooks/{new}", 200, 403, 403, 403, 403,
        body=hook("team:*")),
    row("subscribe to T's and U's alerts", "PUT", "/v1/webhooks/{new}", 200, 403, 403, 403, 403,
        body=hook(f"team:{T}", "key:kU")),
    row("subscribe to a user's alerts", "PUT", "/v1/webhooks/{new}", 200, 403, 403, 403, 403,
        body=hook("user:alice")),
    row("take over a webhook of U into T", "PUT", "/v1/webhooks/{new}", 200, 403, 403, 403, 403,
        body=hook(f"team:{T}"), setup=webhook_on("team:{U}")),
    row("read a webhook of T", "GET", "/v1/webhooks/{new}", 200, 200, 403, 403, 403,
        setup=webhook_on("team:{T}", "key:kT")),
    row("read a webhook of every team", "GET", "/v1/webhooks/{new}", 200, 403, 403, 403, 403,
        setup=webhook_on("team:*")),
    row("delete a webhook of T", "DELETE", "/v1/webhooks/{new}", 204, 204, 403, 403, 403,
        setup=webhook_on("member:{T}/*")),
    row("delete a webhook of U", "DELETE", "/v1/webhooks/{new}", 204, 403, 204, 403, 403,
        setup=webhook_on("team:{U}")),
    row("list webhooks", "GET", "/v1/webhooks", 200, 200, 200, 403, 403),
    row("deliveries of a webhook of T", "GET", "/v1/webhooks/{new}/deliveries", 200, 200, 403, 403, 403,
        setup=webhook_on("team:{T}")),
    # --- audit
    row("read the audit log", "GET", "/v1/audit", 200, 403, 403, 403, 403),
    # --- gate: check and ingest
    row("check", "POST", "/v1/check", 200, 403, 403, 403, 200, body={"key_id": "kT"}),
    row("authorize", "GET", "/v1/authorize?key_id=kT", 200, 403, 403, 403, 200),
    row("ingest events", "POST", "/v1/events", 202, 403, 403, 403, 202, body=[EVENT]),
    row("reserving check", "POST", "/v1/check", 200, 403, 403, 403, 200,
        body={"key_id": "kT", "reserve": True, "request_id": "{new}", "estimated_cost_usd": "0.01"}),
    row("release a hold", "DELETE", "/v1/holds/{new}?key_id=kT", 204, 403, 403, 403, 204),
    # --- gate: spend of every scope kind
    row("spend of team T", "GET", f"/v1/spend/team:{T}", 200, 200, 403, 200, 200),
    row("spend of a member of T", "GET", f"/v1/spend/member:{T}/alice", 200, 200, 403, 200, 200),
    row("spend of a key of T", "GET", "/v1/spend/key:kT", 200, 200, 403, 200, 200),
    row("spend of a key moved out of T", "GET", "/v1/spend/key:{new}", 200, 403, 200, 200, 200,
        setup=moved_out_of_t()),
    row("spend of a key_model of T", "GET", "/v1/spend/key_model:kT/m1", 200, 200, 403, 200, 200),
    row("spend of a user", "GET", "/v1/spend/user:alice", 200, 403, 403, 200, 200),
    row("spend of T's org", "GET", f"/v1/spend/org:{O}", 200, 403, 403, 200, 200),
    row("spend of an end user", "GET", "/v1/spend/end_user:e1", 200, 403, 403, 200, 200),
    row("spend of a model", "GET", "/v1/spend/model:m1", 200, 403, 403, 200, 200),
    row("spend of a tag", "GET", "/v1/spend/tag:prod", 200, 403, 403, 200, 200),
    # --- dashboard data (issue 17): like spend, but a gateway browses nothing
    row("overview of budgeted scopes", "GET", "/v1/spend/overview", 200, 200, 200, 200, 403),
    row("top keys", "GET", "/v1/spend/top?kind=key&window=1d", 200, 200, 200, 200, 403),
    row("top users", "GET", "/v1/spend/top?kind=user", 200, 403, 403, 200, 403),
    row("series of team T", "GET", f"/v1/spend/team:{T}/series?bucket=1h", 200, 200, 403, 200, 403),
    row("series of a key of T", "GET", "/v1/spend/key:kT/series?bucket=1d", 200, 200, 403, 200, 403),
    row("series of a member of T", "GET", f"/v1/spend/member:{T}/alice/series", 200, 200, 403, 200, 403),
    row("series of a user", "GET", "/v1/spend/user:alice/series", 200, 403, 403, 200, 403),
    # --- no token needed
    public("/healthz"),
    public("/readyz"),
    public("/metrics"),
    public("/openapi.json"),
    public("/docs"),
    public("/docs/oauth2-redirect"),
    public("/redoc"),
    public("/ui/"),
    public("/ui/app.js"),
    Row("public /ui (redirect to /ui/)", "GET", "/ui", (307, 307, 307, 307, 307), public=True),
]
# fmt: on


def _fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, list):
        return [_fill(v, names) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


async def run_group(w: World, r: Row, roles: list[str]) -> list[str]:
    """Set up fresh objects once, send ``r`` as each of ``roles``; the cells that were wrong."""
    new = f"{r.method.lower()}-{uuid.uuid4().hex[:8]}"
    names = {"new": new}
    if r.setup is not None:
        names.update(await r.setup(w, new) or {})
    path = r.path.format(**names)
    body = _fill(r.body, names)

    async def send(role: str) -> str | None:
        resp = await w.client.request(r.method, path, json=body, headers=w.headers[role])
        if resp.status_code == r.status(role):
            return None
        return f"{role}: {r.method} {path} -> {resp.status_code} (want {r.status(role)}) {resp.text[:200]}"

    return [x for x in await asyncio.gather(*(send(role) for role in roles)) if x is not None]


async def run_row(w: World, r: Row) -> list[str]:
    """Send ``r`` as every role; the cells whose status differs from the matrix (empty = pass).

    Each role expected to succeed acts on objects of its own; the refused ones share one set
    (a refusal changes nothing, and if one wrongly succeeds its cell fails anyway). Groups run
    at once (a write answers when visible, ~0.1 s), or one after the other for a ``serial`` row,
    which acts on a shared object its setup resets.
    """
    allowed = [[role] for role in ROLES if r.status(role) < 300]
    refused = [role for role in ROLES if r.status(role) >= 300]
    groups = allowed + ([refused] if refused else [])
    if r.serial:
        results = [await run_group(w, r, group) for group in groups]
    else:
        results = list(await asyncio.gather(*(run_group(w, r, group) for group in groups)))
    return [wrong for result in results for wrong in result]


@pytest.mark.parametrize("r", MATRIX, ids=lambda r: r.name)
async def test_authority_matrix(world: World, r: Row) -> None:
    wrong = await run_row(world, r)
    assert not wrong, "\n".join(wrong)


def app_routes(routes: Iterable[Any]) -> set[tuple[str, str]]:
    """(method, path template) of every route, included routers walked (HEAD is GET's twin)."""
    out: set[tuple[str, str]] = set()
    for route in routes:
        included = getattr(route, "effective_candidates", None)  # FastAPI >= 0.165 includes lazily
        if included is not None:
            out |= app_routes(included())
            continue
        for method in getattr(route, "methods", None) or ():
            if method != "HEAD":
                out.add((method, route.path))
    return out


def _template(path: str) -> re.Pattern[str]:
    pattern = re.sub(r"\\{[^}:]+:path\\}", ".+", re.escape(path))
    return re.compile(re.sub(r"\\{[^}]+\\}", "[^/]+", pattern) + "$")


async def test_every_route_is_in_the_matrix(world: World) -> None:
    routes = app_routes(world.app.routes)
    assert len(routes) > 30 and ("PUT", "/v1/keys/{key_id:path}") in routes  # the walk sees them all
    covered = set()
    for r in MATRIX:
        path = r.path.split("?")[0].format(new="x", token="x")
        hits = sorted(t for m, t in routes if m == r.method and _template(t).match(path))
        assert hits, f"row {r.name!r} matches no route"
        # the most specific template: fewest parameters, then longest (…/{scope:path}/series)
        covered.add((r.method, max(hits, key=lambda t: (-t.count("{"), len(t)))))
    missing = routes - covered
    assert not missing, f"routes without a row in the authority matrix: {sorted(missing)}"


# --- the issue-11 escalations, end to end --------------------------------------------------------


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def audit_of(w: World, target: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    after: int | None = 0
    while after is not None:
        page = (await w.admin("GET", f"/v1/audit?limit=1000&after={after}")).json()
        rows += [r for r in page["items"] if r["target"] == target]
        after = None if page["next"] is None else int(page["next"])
    return rows


async def check(w: World, **body: Any) -> dict[str, Any]:
    resp = await w.client.post("/v1/check", json=body, headers=w.headers["gateway"])
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


async def until_blocked_by(w: World, scope: str, **body: Any) -> dict[str, Any]:
    async def blocked() -> dict[str, Any]:
        answer = await check(w, **body)
        assert not answer["allowed"] and [b["scope"] for b in answer["blocked_by"]] == [scope], answer
        return answer

    return await eventually(blocked, timeout=10, interval=0.02)


async def test_deleting_a_key_revokes_it_until_an_admin_registers_it_again(world: World) -> None:
    w = world
    team, key = uid("blocked"), uid("kT3")
    await w.admin("PUT", f"/v1/teams/{team}")
    await w.admin("PUT", f"/v1/budgets/team:{team}", {"limits": [{"window": "1d", "max_usd": "1"}]})
    await w.admin("PUT", f"/v1/keys/{key}", {"team_id": team, "user_id": "carol"})
    _, team_admin = await w.mint("team_admin", team)
    await produce(w.settings, "decisions", [(f"team:{team}", blocked_record(f"team:{team}"))])
    await until_blocked_by(w, f"team:{team}", key_id=key)

    assert (await w.client.delete(f"/v1/keys/{key}", headers=team_admin)).status_code == 204
    revoked = await until_blocked_by(w, f"key:{key}", key_id=key)
    assert revoked["blocked_by"] == [
        {
            "scope": f"key:{key}",
            "window": "total",
            "spend_usd": "0",
            "limit_usd": "0",
            "resets_at": None,
            "code": "key_revoked",
        }
    ]
    assert revoked["retry_after_s"] is None and revoked["degraded"] is False
    authorize = await w.client.get("/v1/authorize", params={"key_id": key}, headers=w.headers["gateway"])
    assert authorize.status_code == 429 and "retry-after" not in authorize.headers
    spend = (await w.admin("GET", f"/v1/spend/key:{key}")).json()
    assert spend["blocked"] is True

    # spend.config says revoked (no tombstone) and keeps the team and user; Postgres keeps the row
    records = [v for k, v in await read_all(w.settings, "config") if k == f"key/{key}"]
    assert None not in records
    assert {k: records[-1][k] for k in ("revoked", "team_id", "user_id")} == {
        "revoked": True,
        "team_id": team,
        "user_id": "carol",
    }
    got = await w.client.get(f"/v1/keys/{key}", headers=team_admin)
    assert got.status_code == 200 and got.json()["revoked"] is True and got.json()["team_id"] == team
    audit = await audit_of(w, f"key/{key}")
    assert [r["action"] for r in audit] == ["put_key", "revoke_key"]
    assert audit[-1]["after"]["revoked"] is True

    # deleting it again changes nothing; the team admin may not un-revoke it
    assert (await w.client.delete(f"/v1/keys/{key}", headers=team_admin)).status_code == 204
    again = await w.client.put(
        f"/v1/keys/{key}", json={"team_id": team, "user_id": "carol"}, headers=team_admin
    )
    assert again.status_code == 403
    assert again.json()["error"]["message"] == f"key {key} is revoked; only an admin may re-register it"
    assert (await check(w, key_id=key))["blocked_by"][0].get("code") == "key_revoked"

    # an admin may: the key is back under its team's budget (still blocked, by the team now)
    back = await w.admin("PUT", f"/v1/keys/{key}", {"team_id": team, "user_id": "carol"})
    assert back.json()["revoked"] is False
    answer = await until_blocked_by(w, f"team:{team}", key_id=key)
    assert "code" not in answer["blocked_by"][0]


async def test_a_team_admin_cannot_claim_a_key_in_use_by_another_team(world: World) -> None:
    w = world
    over, key = uid("over"), uid("kx")
    await w.admin("PUT", f"/v1/teams/{over}")
    await produce(w.settings, "state", [(f"key:{key}", state_record(f"key:{key}", "3"))])
    await produce(w.settings, "decisions", [(f"team:{over}", blocked_record(f"team:{over}"))])
    await until_blocked_by(w, f"team:{over}", key_id=key, team_id=over)

    async def gate_saw_the_spend() -> None:
        assert (await w.admin("GET", f"/v1/spend/key:{key}")).json()["windows"][-1]["spend_usd"] == "3"

    await eventually(gate_saw_the_spend, timeout=10, interval=0.02)
    claim = await w.client.put(f"/v1/keys/{key}", json={"team_id": T}, headers=w.headers["ta_T"])
    assert claim.status_code == 403
    assert claim.json()["error"]["message"] == (
        f"key {key} is not new to spendgate (it has recorded spend or a budget); "
        "claiming a key in use takes an admin"
    )
    await until_blocked_by(w, f"team:{over}", key_id=key, team_id=over)
    assert (await w.client.get(f"/v1/keys/{key}", headers=w.headers["admin"])).status_code == 404
    assert (await w.admin("PUT", f"/v1/keys/{key}", {"team_id": T})).json()["team_id"] == T  # an admin may


async def test_a_team_admin_cannot_move_a_key_out_of_an_admins_user_budget(world: World) -> None:
    w = world
    dave, key = uid("dave"), uid("kT3")
    await w.admin("PUT", f"/v1/budgets/user:{dave}", {"limits": [{"window": "1d", "max_usd": "1"}]})
    await w.admin("PUT", f"/v1/keys/{key}", {"team_id": T, "user_id": dave})
    await produce(w.settings, "decisions", [(f"user:{dave}", blocked_record(f"user:{dave}"))])
    await until_blocked_by(w, f"user:{dave}", key_id=key)

    escape = await w.client.put(
        f"/v1/keys/{key}", json={"team_id": T, "user_id": "nobody"}, headers=w.headers["ta_T"]
    )
    assert escape.status_code == 403
    assert escape.json()["error"]["message"] == (
        f"a team_admin may not change the user of key {key} (registered user: {dave}); ask an admin"
    )
    await until_blocked_by(w, f"user:{dave}", key_id=key)

    stranger = await w.client.put(
        f"/v1/keys/{uid('k')}", json={"team_id": T, "user_id": dave}, headers=w.headers["ta_T"]
    )
    assert stranger.status_code == 403
    assert stranger.json()["error"]["message"] == (
        f"user {dave} is not a member of team {T}; "
        f"a team_admin may set a new key's user only to a member of team {T}"
    )
    member = await w.client.put(
        f"/v1/keys/{uid('k')}", json={"team_id": T, "user_id": "alice"}, headers=w.headers["ta_T"]
    )
    assert member.status_code == 200


async def test_deleting_a_team_revokes_its_team_admin_tokens_for_good(world: World) -> None:
    w = world
    team, key = uid("gone"), uid("k")
    await w.admin("PUT", f"/v1/teams/{team}")
    token_id, team_admin = await w.mint("team_admin", team)
    assert (await w.client.get(f"/v1/teams/{team}", headers=team_admin)).status_code == 200
    await w.admin("PUT", f"/v1/keys/{key}", {"team_id": team})
    await w.admin("DELETE", f"/v1/keys/{key}", expect=204)  # a revoked key does not hold the team

    await w.admin("DELETE", f"/v1/teams/{team}", expect=204)
    assert (await w.client.get(f"/v1/teams/{team}", headers=team_admin)).status_code == 401
    await w.admin("PUT", f"/v1/teams/{team}")
    assert (await w.client.get(f"/v1/teams/{team}", headers=team_admin)).status_code == 401
    revocations = await audit_of(w, f"token/{token_id}")
    assert [r["action"] for r in revocations] == ["mint_token", "revoke_token"]
    assert revocations[-1]["after"]["revoked"] is True
    kept = (await w.admin("GET", f"/v1/keys/{key}")).json()
    assert (kept["team_id"], kept["revoked"]) == (team, True)  # still charged to (re-created) team


async def test_a_token_of_a_team_deleted_before_tokens_were_revoked_stays_dead(world: World) -> None:
    """Teams deleted by an older spendgate left their tokens live: creating the team again revokes them."""
    w = world
    team = uid("legacy")
    await w.admin("PUT", f"/v1/teams/{team}")
    token_id, team_admin = await w.mint("team_admin", team)
    async with await psycopg.AsyncConnection.connect(w.settings.database_url, autocommit=True) as conn:
        await conn.execute("DELETE FROM teams WHERE team_id = %s", (team,))  # what deletion used to do
    assert (await w.client.get(f"/v1/keys?team_id={team}", headers=team_admin)).status_code == 200

    await w.admin("PUT", f"/v1/teams/{team}")
    assert (await w.client.get(f"/v1/teams/{team}", headers=team_admin)).status_code == 401
    assert [r["action"] for r in await audit_of(w, f"token/{token_id}")] == ["mint_token", "revoke_token"]


async def test_denials_say_what_was_refused(world: World) -> None:
    w = world
    remove = await w.client.delete(f"/v1/budgets/team:{T}", headers=w.headers["ta_T"])
    assert remove.json()["error"]["message"] == f"only an admin may remove the budget of team {T}"
    read = await w.client.get(f"/v1/spend/org:{O}", headers=w.headers["ta_T"])
    assert (
        read.json()["error"]["message"] == "a team_admin may not read org scopes, only those of its own team"
    )
