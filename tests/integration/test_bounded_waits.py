"""Every wait is bounded: with Postgres or the broker frozen, requests answer 503 in time.

A frozen server (SIGSTOP of its process group) keeps its sockets open, so nothing times out on
its own; this is the outage that used to hang control-plane writes for 19 s and a
``POST /v1/events`` for more than 40 s. Each test freezes a Postgres or a Tansu broker of its
own (never the session-wide ones other tests use), asserts the answers come within
``SPENDGATE_DEPENDENCY_TIMEOUT_S`` with ``Retry-After`` and a code naming the dependency,
thaws it and asserts recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from tests.integration.test_gate import running, wait_ready
from tests.kafka_helpers import eventually

from spendgate.adapters.embedded import ManagedProcess, free_port, start_broker, start_postgres
from spendgate.api.app import create_app
from spendgate.settings import Settings
from spendgate.store.migrate import apply_migrations

pytestmark = pytest.mark.broker_agnostic  # see pyproject.toml: make test-kafka skips it

BOUND_S = 2.0
SLACK_S = 1.5  # scheduling on a loaded 2-core machine
ADMIN_TOKEN = "bounded-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@contextlib.contextmanager
def frozen(process: ManagedProcess) -> Iterator[None]:
    """SIGSTOP the server, then its children; SIGCONT them all on the way out.

    Children one by one: Postgres backends call setsid(), so the server's process group does
    not hold them. The server is stopped first, so it forks no new child meanwhile.
    """
    server = psutil.Process(process.pid)
    server.send_signal(signal.SIGSTOP)
    children = server.children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in [server, *children]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)


async def timed(request: Coroutine[Any, Any, httpx.Response]) -> tuple[httpx.Response, float]:
    """The response and how long it took; a request still unanswered after 20 s fails the test."""
    started = time.monotonic()
    response = await asyncio.wait_for(request, BOUND_S + 20)
    return response, time.monotonic() - started


def assert_unavailable(resp: httpx.Response, took: float, code: str) -> None:
    assert resp.status_code == 503, (resp.status_code, resp.text)
    assert resp.json()["error"]["code"] == code, resp.text
    assert int(resp.headers["retry-after"]) >= 1
    assert took < BOUND_S + SLACK_S, f"answered after {took:.1f}s"


@pytest.fixture
def own_root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="spendgate-bounded-"))  # not under basetemp (see conftest)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def postgres_app(
    own_root: Path, kafka_bootstrap: str
) -> AsyncIterator[tuple[ManagedProcess, httpx.AsyncClient]]:
    server = start_postgres(own_root / "pg", free_port(), own_root / "pg.log", durable=False)
    try:
        url = server.create_database("bounded")
        apply_migrations(url)
        settings = Settings(
            kafka_bootstrap=kafka_bootstrap,
            database_url=url,
            topic_prefix=f"b{uuid.uuid4().hex[:8]}.",
            partitions=2,
            admin_token=ADMIN_TOKEN,
            dependency_timeout_s=BOUND_S,
        )
        async with running(create_app(settings)) as client:
            await wait_ready(client)
            yield server.process, client
    finally:
        server.stop()


async def test_control_plane_answers_503_within_the_bound_while_postgres_is_frozen(
    postgres_app: tuple[ManagedProcess, httpx.AsyncClient],
) -> None:
    process, client = postgres_app
    team = f"t-{uuid.uuid4().hex[:8]}"
    assert (await client.put(f"/v1/teams/{team}", headers=ADMIN)).status_code == 200  # the pool is warm
    late = f"t-{uuid.uuid4().hex[:8]}"
    with frozen(process):
        for _ in range(2):  # the second one finds the first one's connection still stuck
            resp, took = await timed(client.put(f"/v1/teams/{late}", headers=ADMIN))
            assert_unavailable(resp, took, "database_unavailable")
        resp, took = await timed(client.get(f"/v1/teams/{team}", headers=ADMIN))
        assert_unavailable(resp, took, "database_unavailable")
        resp, took = await timed(client.post("/v1/check", json={"key_id": "k"}, headers=ADMIN))
        assert resp.status_code == 200 and took < 1.0  # the gate never waits on Postgres

    async def recovered() -> None:
        resp = await client.put(f"/v1/teams/{late}", headers=ADMIN)
        assert resp.status_code == 200, resp.text

    await eventually(recovered, timeout=60, interval=0.5)
    # Applied whole (or not at all) and once: repeating it is the same record.
    first = (await client.get(f"/v1/teams/{late}", headers=ADMIN)).json()
    again = (await client.put(f"/v1/teams/{late}", headers=ADMIN)).json()
    assert first == again and first["team_id"] == late
    audit = (await client.get("/v1/audit", params={"limit": 1000}, headers=ADMIN)).json()["items"]
    assert len([row for row in audit if row["target"] == f"team/{late}"]) == 1, audit


@pytest.fixture
async def broker_app(own_root: Path) -> AsyncIterator[tuple[ManagedProcess, httpx.AsyncClient]]:
    broker = start_broker(free_port(), own_root / "tansu.log")
    try:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            database_url="",
            topic_prefix="bounded.",
            partitions=2,
            admin_token=ADMIN_TOKEN,
            dependency_timeout_s=BOUND_S,
        )
        async with running(create_app(settings)) as client:
            await wait_ready(client)
            yield broker.process, client
    finally:
        broker.stop()


def usage(key: str = "k1") -> list[dict[str, str]]:
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return [{"event_id": uuid.uuid4().hex, "occurred_at": now, "key_id": key, "cost_usd": "0.5"}]


async def test_events_answer_503_within_the_bound_while_the_broker_is_frozen(
    broker_app: tuple[ManagedProcess, httpx.AsyncClient],
) -> None:
    process, client = broker_app
    first = usage()
    with frozen(process):  # before the producer ever started: its start and metadata waits
        resp, took = await timed(client.post("/v1/events", json=first, headers=ADMIN))
        assert_unavailable(resp, took, "broker_unavailable")
        resp, took = await timed(client.post("/v1/check", json={"key_id": "k1"}, headers=ADMIN))
        assert resp.status_code == 200 and took < 1.0  # checks read memory only

    async def accepted(batch: list[dict[str, str]]) -> None:
        resp = await client.post("/v1/events", json=batch, headers=ADMIN)
        assert resp.status_code == 202, resp.text

    await eventually(lambda: accepted(first), timeout=60, interval=0.5)  # the client retries, same ids

    second = usage()
    with frozen(process):  # a started producer: acknowledgements never come
        for _ in range(2):
            resp, took = await timed(client.post("/v1/events", json=second, headers=ADMIN))
            assert_unavailable(resp, took, "broker_unavailable")
    await eventually(lambda: accepted(second), timeout=60, interval=0.5)
