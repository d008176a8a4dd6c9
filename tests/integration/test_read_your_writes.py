"""Read-your-writes (CONTRACT §4): a control-plane write answers only once it is visible, and every
usage event appended after the answer is attributed with it.

Real broker, one worker process and two API processes. The race this guards against: a gateway
registers a key and uses it at once; if the worker attributed the event before it had the key's
registration, the spend would escape the team's and the user's budgets for good.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from psycopg import sql
from tests.kafka_helpers import ServiceProcess, eventually, latest, running_services

from spendgate.adapters.embedded import free_port, start_broker
from spendgate.adapters.kafka import ensure_topics
from spendgate.settings import Settings
from spendgate.store.migrate import apply_migrations

TOKEN = "ryw-admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
REPETITIONS = 5
CHAINS = 200
CONCURRENCY = 10


def usage(key_id: str, cost: str = "1") -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"v": 1, "event_id": uuid.uuid4().hex, "occurred_at": now, "key_id": key_id, "cost_usd": cost}


async def wait_ready(client: httpx.AsyncClient, proc: ServiceProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.proc is not None and proc.proc.poll() is None, proc.log()
        try:
            if (await client.get("/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"API not ready within {timeout}s:\n{proc.log()}")


@asynccontextmanager
async def stack(
    settings: Settings, log_dir: Path, *, apis: int = 2, worker: bool = True, **env: str
) -> AsyncIterator[list[httpx.AsyncClient]]:
    """``apis`` API processes (and a worker) on ``settings``; yields one client per API."""
    with running_services(log_dir) as start:
        if worker:
            start("worker", settings, "worker")
        clients, procs = [], []
        for n in range(apis):
            port = free_port()
            procs.append(
                start(
                    "api",
                    settings,
                    f"api{n}",
                    SPENDGATE_API_PORT=str(port),
                    SPENDGATE_ADMIN_TOKEN=TOKEN,
                    **env,
                )
            )
            clients.append(
                httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{port}",
                    headers=ADMIN,
                    timeout=30,
                    # drop idle connections before uvicorn does (5 s), or a reused one can be
                    # closed under a request (a ReadError that says nothing about spendgate)
                    limits=httpx.Limits(keepalive_expiry=2),
                )
            )
        try:
            for client, proc in zip(clients, procs, strict=True):
                await wait_ready(client, proc)
            yield clients
        finally:
            for client in clients:
                await client.aclose()


async def totals(settings: Settings) -> dict[str, Decimal]:
    """``total`` spend per scope from ``spend.state``."""
    out: dict[str, Decimal] = {}
    for scope, record in (await latest(settings, "state")).items():
        if record is None:
            continue
        for window in record["windows"]:
            if window["window"] == "total":
                out[scope] = Decimal(window["spend_usd"])
    return out


async def ok(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return response.json() if response.content else {}


@pytest.fixture
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    p = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=0)
    await p.start()
    yield p
    await p.stop()


async def test_keys_registered_a_moment_ago_are_charged_to_their_team_every_time(
    settings: Settings, tmp_path: Path, producer: AIOKafkaProducer
) -> None:
    """200 x (register a key with team and user -> at once one event), 5 times, over two APIs;
    the events go through the other API or straight to Kafka. Not one may miss its team."""
    async with stack(settings, tmp_path) as apis:
        teams = [f"race{r}" for r in range(REPETITIONS)]
        for team in teams:
            await ok(await apis[0].put(f"/v1/teams/{team}"))
        limiter = asyncio.Semaphore(CONCURRENCY)
        counter = itertools.count()

        async def chain(team: str, key: str) -> None:
            n = next(counter)
            async with limiter:
                written = await ok(
                    await apis[n % 2].put(f"/v1/keys/{key}", json={"team_id": team, "user_id": f"u-{key}"})
                )
                assert written["version"] > 0
                if n % 3 == 2:  # straight to Kafka, as a gateway producing itself would
                    await producer.send_and_wait(
                        settings.topic("usage"), orjson.dumps(usage(key)), key=key.encode()
                    )
                else:  # through the *other* API process
                    await ok(await apis[(n + 1) % 2].post("/v1/events", json=[usage(key)]), 202)

        for rep, team in enumerate(teams):
            keys = [f"k{rep}-{i}-{uuid.uuid4().hex[:6]}" for i in range(CHAINS)]
            await asyncio.gather(*(chain(team, key) for key in keys))

            async def all_attributed(team: str = team, keys: list[str] = keys) -> None:
                spent = await totals(settings)
                assert spent.get(f"team:{team}") == Decimal(CHAINS), (team, spent.get(f"team:{team}"))
                missing = [k for k in keys if spent.get(f"user:u-{k}") != Decimal(1)]
                assert not missing, f"{len(missing)} user scopes without their event, e.g. {missing[:3]}"

            await eventually(all_attributed, timeout=60, interval=1.0)


async def test_a_key_moved_to_another_team_charges_the_new_team_from_the_answer_on(
    settings: Settings, tmp_path: Path, producer: AIOKafkaProducer
) -> None:
    async with stack(settings, tmp_path) as (api_a, api_b):
        for team in ("ta", "tb"):
            await ok(await api_a.put(f"/v1/teams/{team}"))
        await ok(await api_a.put("/v1/keys/mover", json={"team_id": "ta"}))
        await ok(await api_b.post("/v1/events", json=[usage("mover") for _ in range(3)]), 202)

        async def counted_in_a() -> None:  # events sent *before* a move may be charged either way
            assert (await totals(settings)).get("team:ta") == Decimal(3)

        await eventually(counted_in_a, timeout=60, interval=0.5)
        moved = await ok(await api_a.put("/v1/keys/mover", json={"team_id": "tb"}))
        assert moved["team_id"] == "tb"
        for n in range(30):
            if n % 2:
                await producer.send_and_wait(
                    settings.topic("usage"), orjson.dumps(usage("mover")), key=b"mover"
                )
            else:
                await ok(await api_b.post("/v1/events", json=[usage("mover")]), 202)

        async def charged_to_b_only() -> None:
            spent = await totals(settings)
            assert spent.get("key:mover") == Decimal(33)
            assert spent.get("team:ta") == Decimal(3)
            assert spent.get("team:tb") == Decimal(30)

        await eventually(charged_to_b_only, timeout=60, interval=1.0)


async def test_a_zero_budget_denies_the_very_next_check_on_the_same_api(
    settings: Settings, tmp_path: Path
) -> None:
    async with stack(settings, tmp_path, worker=False) as (api_a, api_b):
        assert (await ok(await api_a.post("/v1/check", json={"key_id": "z1"})))["allowed"] is True
        written = await api_a.put("/v1/budgets/key:z1", json={"limits": [{"window": "1d", "max_usd": "0"}]})
        body = await ok(written)
        assert written.headers["Spendgate-Version"] == str(body["version"])
        answer = await ok(await api_a.post("/v1/check", json={"key_id": "z1"}))
        assert answer["allowed"] is False, answer
        assert answer["blocked_by"][0]["scope"] == "key:z1"

        # the other replica applies it too, within a bound (measured in make bench)
        async def denied_on_b() -> None:
            assert (await ok(await api_b.post("/v1/check", json={"key_id": "z1"})))["allowed"] is False

        await eventually(denied_on_b, timeout=5, interval=0.05)
        deleted = await api_a.delete("/v1/budgets/key:z1")
        assert deleted.status_code == 204 and int(deleted.headers["Spendgate-Version"]) > body["version"]
        assert (await ok(await api_a.post("/v1/check", json={"key_id": "z1"})))["allowed"] is True


@pytest.fixture
def own_database(database_url: str) -> Callable[[], str]:
    """A fresh migrated database (the paused-broker test needs its own stack end to end)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = psycopg.conninfo.make_conninfo(database_url, dbname=name)
    apply_migrations(url)
    return lambda: url


async def test_a_write_while_the_broker_is_paused_answers_503_and_applies_when_it_is_back(
    tmp_path: Path, own_database: Callable[[], str]
) -> None:
    broker = start_broker(free_port(), tmp_path / "broker.log")
    try:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            database_url=own_database(),
            topic_prefix="p.",
            partitions=2,
            data_dir=tmp_path / "data",
            worker_web_port=0,
        )
        await ensure_topics(settings)
        async with stack(settings, tmp_path, apis=2, worker=False, SPENDGATE_WRITE_TIMEOUT_S="2") as (
            api,
            other,
        ):
            await ok(await api.put("/v1/budgets/key:p1", json={"limits": [{"window": "1d", "max_usd": "5"}]}))
            budget = {"limits": [{"window": "1d", "max_usd": "0"}]}
            os.kill(broker.process.popen.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                answer = await api.put("/v1/budgets/key:p1", json=budget)
                took = time.monotonic() - started
            finally:
                os.kill(broker.process.popen.pid, signal.SIGCONT)
            assert answer.status_code == 503, answer.text
            error = answer.json()["error"]
            assert error["code"] == "not_yet_visible"
            assert "durable" in error["message"]
            version = error["details"]["version"]
            assert answer.headers["Spendgate-Version"] == str(version)
            assert answer.headers["Retry-After"]
            assert took < 2 + 1.5, f"answered after {took:.1f}s"

            async def applied_everywhere() -> None:
                for client in (api, other):
                    result = await ok(await client.post("/v1/check", json={"key_id": "p1"}))
                    assert result["allowed"] is False, result

            await eventually(applied_everywhere, timeout=30, interval=0.2)
            retried = await ok(await api.put("/v1/budgets/key:p1", json=budget))
            assert retried["version"] == version  # the same change, not a second one
    finally:
        broker.stop()
