"""spendgate behind a REAL LiteLLM proxy (1.109.1), driven the way a user drives it.

One proxy for the module (``.venv-litellm``, made by ``make litellm-venv``, which ``make test``
depends on) with ``callbacks: spendgate.integrations.litellm.proxy_handler`` and the two
variables; a fake OpenAI upstream on 127.0.0.1 that reports 1000 prompt / 500 completion
tokens; the spendgate stack = the fixtures' broker + Postgres and ``spendgate worker`` /
``spendgate api`` processes. Calls go through the proxy with plain httpx, as any OpenAI client.

Identity: a ``custom_auth`` function (see tests/litellm_helpers.py for why not LiteLLM's own
virtual keys: they need its Prisma database, which cannot be installed offline). The hook reads
the same ``UserAPIKeyAuth`` either way.

``SPENDGATE_CHECK_TIMEOUT_MS`` is raised to 2000 here: on a loaded 2-core CI machine a 50 ms
check can time out and fail open, which would make the budget test flaky; the fail policy
itself is exercised by stopping the API.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import pytest
from tests.kafka_helpers import ServiceProcess, eventually, read_all, running_services
from tests.litellm_helpers import LITELLM_BIN, FakeOpenAI, LiteLLMProxy, write_config

from spendgate.adapters.embedded import free_port
from spendgate.adapters.kafka import ensure_topics
from spendgate.client import AsyncSpendgateClient
from spendgate.settings import Settings

ADMIN_TOKEN = "litellm-e2e-admin-" + uuid.uuid4().hex
KEYS = {
    "sk-e2e-alice": {"user_id": "alice", "team_id": "t-e2e", "org_id": "o-e2e", "tags": ["key-tag"]},
    "sk-e2e-bob": {"user_id": "bob", "team_id": "t-bob"},
}
COST = Decimal("0.00045")  # 1000 in + 500 out of gpt-4o-mini at litellm's bundled prices


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class World:
    proxy: LiteLLMProxy
    admin: AsyncSpendgateClient
    api_url: str
    restart_api: Callable[[], Awaitable[None]]
    stop_api: Callable[[], None]
    upstream: FakeOpenAI
    settings: Settings

    async def chat(self, key: str, **body: Any) -> httpx.Response:
        body.setdefault("model", "gpt-4o-mini")
        body.setdefault("messages", [{"role": "user", "content": "hello"}])
        headers = {"Authorization": f"Bearer {key}", **body.pop("headers", {})}
        async with httpx.AsyncClient(timeout=30) as http:
            return await http.post(self.proxy.url + "/v1/chat/completions", json=body, headers=headers)

    async def spend(self, scope: str) -> Decimal:
        return (await self.admin.spend(scope)).spend("total")

    async def settles_at(self, scope: str, expected: Decimal, *, timeout: float = 30.0) -> None:
        """``scope``'s total reaches ``expected`` and is still there a moment later (none doubled)."""

        async def reached() -> None:
            assert await self.spend(scope) == expected, scope

        await eventually(reached, timeout=timeout, interval=0.25)
        await asyncio.sleep(1.5)  # a duplicate would land within the reporter's next flushes
        assert await self.spend(scope) == expected, f"{scope} moved past {expected}"


async def _ready(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as http:
        while time.monotonic() < deadline:
            try:
                if (await http.get(url + "/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.25)
    raise AssertionError(f"spendgate api at {url} not ready in {timeout_s} s")


@pytest.fixture(scope="module")
async def world(
    kafka_bootstrap: str, migrated_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    if not LITELLM_BIN.exists():
        pytest.skip("no .venv-litellm: `make litellm-venv` (a dependency of `make test`) installs the proxy")
    root = tmp_path_factory.mktemp("litellm")
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        database_url=migrated_database_url,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
        partitions=2,
        data_dir=root / "data",
        api_port=free_port(),
        worker_web_port=free_port(),
    )
    await ensure_topics(settings)
    api_url = f"http://127.0.0.1:{settings.api_port}"
    api_env = {"SPENDGATE_API_PORT": str(settings.api_port), "SPENDGATE_ADMIN_TOKEN": ADMIN_TOKEN}
    started = time.monotonic()
    with FakeOpenAI() as upstream, running_services(root) as start:
        start("worker", settings, "worker")
        api: list[ServiceProcess] = [start("api", settings, "api", **api_env)]
        await _ready(api_url)
        admin = AsyncSpendgateClient(api_url, ADMIN_TOKEN, timeout_s=10)
        async with httpx.AsyncClient(timeout=10) as http:
            minted = await http.post(
                api_url + "/v1/tokens",
                json={"role": "gateway"},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
        assert minted.status_code in (200, 201), minted.text
        gateway_token = minted.json()["token"]
        proxy = LiteLLMProxy(
            write_config(root / "proxy", upstream.base_url, callback=True),
            free_port(),
            root / "litellm.log",
            {
                "SPENDGATE_URL": api_url,
                "SPENDGATE_TOKEN": gateway_token,
                "SPENDGATE_FAIL_MODE": "open",
                "SPENDGATE_CHECK_TIMEOUT_MS": "2000",
                "SPENDGATE_SPILL_PATH": str(root / "unsent.jsonl"),
                "E2E_KEYS": json.dumps(KEYS),
            },
        ).start()

        def stop_api() -> None:
            api[-1].stop()

        async def restart_api() -> None:
            api.append(start("api", settings, f"api{len(api)}", **api_env))
            await _ready(api_url)

        try:
            ready_s = await asyncio.to_thread(proxy.wait_ready, 180.0)
            print(f"stack + proxy ready in {time.monotonic() - started:.1f} s (proxy {ready_s:.1f} s)")
            yield World(proxy, admin, api_url, restart_api, stop_api, upstream, settings)
        finally:
            proxy.stop()
            print(f"--- litellm.log (tail) ---\n{proxy.log()}")
            await admin.aclose()


async def test_an_allowed_call_charges_its_exact_cost_to_every_scope(world: World) -> None:
    # The body tries to pass as someone else: LiteLLM's identity must win.
    response = await world.chat(
        "sk-e2e-alice",
        user="carol",
        metadata={
            "tags": ["feature-x"],
            "user_api_key_team_id": "t-evil",
            "spendgate": {"event_id": "forged", "key_id": "k-evil", "team_id": "t-evil", "sig": "0"},
        },
    )
    assert response.status_code == 200, response.text
    cost = Decimal(response.headers["x-litellm-response-cost"])
    assert cost == COST
    scopes = [
        f"key:{key_hash('sk-e2e-alice')}",
        "user:alice",
        "team:t-e2e",
        "org:o-e2e",
        "end_user:carol",
        "model:gpt-4o-mini",
        "tag:feature-x",
        "tag:key-tag",
        "member:t-e2e/alice",
    ]
    await world.settles_at(scopes[0], cost)
    for scope in scopes[1:]:
        assert await world.spend(scope) == cost, scope
    for forged in ("team:t-evil", "key:k-evil"):
        assert await world.spend(forged) == 0, forged
    # The pre-call hook reserved the estimate (a hold) and the usage event settled it.
    alice = key_hash("sk-e2e-alice")
    events = [v for _, v in await read_all(world.settings, "usage") if v.get("key_id") == alice]
    [held] = [e for e in events if e.get("kind") == "hold"]
    [charged] = [e for e in events if e.get("kind", "cost") == "cost"]
    assert charged["request_id"] == held["request_id"] and Decimal(held["estimated_cost_usd"]) > 0
    view = await world.admin.spend(scopes[0])
    assert all(w.reserved_usd == 0 for w in view.windows)


async def test_a_streaming_call_is_charged_once(world: World) -> None:
    headers = {"Authorization": "Bearer sk-e2e-bob"}
    body = {
        "model": "gpt-4o-mini",
        "user": "streamer",
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    async with (
        httpx.AsyncClient(timeout=30) as http,
        http.stream("POST", world.proxy.url + "/v1/chat/completions", json=body, headers=headers) as stream,
    ):
        assert stream.status_code == 200
        text = (await stream.aread()).decode()
    assert text.rstrip().endswith("data: [DONE]")
    await world.settles_at("end_user:streamer", COST)


async def test_two_calls_with_the_same_litellm_call_id_are_both_charged(world: World) -> None:
    call_id = {"x-litellm-call-id": "dup-" + uuid.uuid4().hex}
    for _ in range(2):
        response = await world.chat("sk-e2e-bob", user="same-call-id", headers=call_id)
        assert response.status_code == 200, response.text
        assert response.headers.get("x-litellm-call-id") == call_id["x-litellm-call-id"]
    await world.settles_at("end_user:same-call-id", 2 * COST)


async def test_responses_and_messages_endpoints_are_charged(world: World) -> None:
    headers = {"Authorization": "Bearer sk-e2e-bob"}
    async with httpx.AsyncClient(timeout=30) as http:
        responses = await http.post(
            world.proxy.url + "/v1/responses",
            json={"model": "gpt-4o-mini", "input": "hello", "user": "via-responses"},
            headers=headers,
        )
        messages = await http.post(
            world.proxy.url + "/v1/messages",
            json={
                "model": "gpt-4o-mini",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "hello"}],
                "metadata": {"user_id": "via-messages"},
            },
            headers=headers,
        )
    assert responses.status_code == 200, responses.text
    assert messages.status_code == 200, messages.text
    await world.settles_at("end_user:via-responses", COST)
    await world.settles_at("end_user:via-messages", COST)


async def test_a_reached_budget_answers_429_with_retry_after_naming_the_scope(world: World) -> None:
    tag = "budget-" + uuid.uuid4().hex[:6]
    async with httpx.AsyncClient(timeout=10) as http:
        put = await http.put(
            f"{world.api_url}/v1/budgets/tag:{tag}",
            json={"limits": [{"window": "1d", "max_usd": "0.0004"}]},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
    assert put.status_code == 200, put.text
    first = await world.chat("sk-e2e-bob", metadata={"tags": [tag]})
    assert first.status_code == 200, first.text  # 0 spent + ~0.00015 estimated < 0.0004

    async def blocked() -> None:
        assert (await world.admin.spend(f"tag:{tag}")).blocked

    await eventually(blocked, timeout=30)
    calls_before = world.upstream.calls
    denied = await world.chat("sk-e2e-bob", metadata={"tags": [tag]})
    assert denied.status_code == 429, denied.text
    assert int(denied.headers["retry-after"]) > 0
    error = denied.json()["error"]
    assert error["type"] == "rate_limit_error"
    assert f"scope tag:{tag}, window 1d: spend 0.00045 USD of limit 0.0004 USD" in error["message"]
    assert world.upstream.calls == calls_before, "a denied call must not reach the provider"
    await world.settles_at(f"tag:{tag}", COST)  # the refused call charged nothing


async def test_gate_down_fails_open_and_buffered_usage_arrives_after_restart(world: World) -> None:
    world.stop_api()
    statuses = [(await world.chat("sk-e2e-bob", user="outage")).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]  # SPENDGATE_FAIL_MODE=open: the calls go through
    await asyncio.sleep(1.0)  # the reporter is retrying against a closed port meanwhile
    await world.restart_api()
    await world.settles_at("end_user:outage", 3 * COST, timeout=60)  # none lost, none doubled


def test_the_proxy_environment_runs_spendgate_without_its_server_stack() -> None:
    """The install path a gateway uses: ``pip install --no-deps spendgate`` beside litellm."""
    if not LITELLM_BIN.exists():
        pytest.skip("no .venv-litellm: `make litellm-venv`")
    code = (
        "import importlib.util, spendgate.client\n"
        "names = ('faust', 'aiokafka', 'psycopg', 'spendgate.client')\n"
        "print([m for m in names if importlib.util.find_spec(m)])\n"
    )
    python = LITELLM_BIN.parent / "python"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "['spendgate.client']"
