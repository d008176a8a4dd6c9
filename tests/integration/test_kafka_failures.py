"""Broker failure under load on a real 3-broker Apache Kafka cluster (``make test-kafka`` only).

What spendgate exists to survive: while 10,000 usage events stream in (half through the API,
half straight to Kafka) and checks run at a steady rate, a broker dies (SIGKILL of the one
leading the most ``usage`` partitions, restarted later) or all three restart one at a time.
Every accepted event must be counted exactly once, no check may answer 5xx, and the worker and
the API must recover without being restarted.

The cluster is this module's own (not the session's), so killing brokers disturbs no other test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from tests.integration.test_worker import (
    KEYS,
    TEAM_ORG,
    expected_totals,
    make_events,
    register,
    totals_from_state,
)
from tests.kafka_helpers import eventually, latest, running_services

from spendgate.adapters import kafka
from spendgate.adapters.kafka_cluster import KafkaCluster, require_tools
from spendgate.api.app import create_app
from spendgate.settings import Settings

pytestmark = pytest.mark.skipif(
    os.environ.get("SPENDGATE_TEST_KAFKA_REAL") != "1",
    reason="real-Kafka failure tests run under `make test-kafka` (SPENDGATE_TEST_KAFKA_REAL=1)",
)

ADMIN_TOKEN = "failure-test-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
EVENTS = 10_000
BATCH = 50
CHECK_INTERVAL_S = 0.05


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    require_tools()
    with KafkaCluster(tmp_path_factory.mktemp("kafka-failures")) as started:
        yield started


async def usage_leaders(settings: Settings) -> Counter[int]:
    """How many ``usage`` partitions each broker leads."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        [description] = await admin.describe_topics([settings.topic("usage")])
        return Counter(p["leader"] for p in description["partitions"] if p["leader"] >= 0)
    finally:
        await admin.close()


async def fully_replicated(settings: Settings) -> None:
    """Assert every partition of every spendgate topic has its 3 replicas in sync."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        topics = [kafka.topic_name(settings, spec.short) for spec in kafka.TOPICS]
        for description in await admin.describe_topics(topics):
            for p in description["partitions"]:
                assert len(p["isr"]) == 3, f"{description['topic']}/{p['partition']} isr {p['isr']}"
    finally:
        await admin.close()


class Load:
    """10,000 events at a steady pace (API and Kafka alternating) plus checks every 50 ms.

    A batch the API answers 503 (or Kafka fails to acknowledge) is sent again with the same
    event ids, as a gateway would: the worker counts each event id once.
    """

    def __init__(self, client: httpx.AsyncClient, settings: Settings, events: list[dict[str, Any]]) -> None:
        self.client = client
        self.settings = settings
        self.events = events
        self.check_status: Counter[int] = Counter()
        self.check_errors: list[str] = []
        self.degraded = 0
        self.retries: Counter[str] = Counter()
        self.done = asyncio.Event()

    async def checks(self) -> None:
        while not self.done.is_set():
            try:
                r = await self.client.post("/v1/check", json={"key_id": "k1"}, headers=ADMIN)
                self.check_status[r.status_code] += 1
                if r.status_code == 200 and r.json().get("degraded"):
                    self.degraded += 1
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on
                self.check_errors.append(repr(exc))
            await asyncio.sleep(CHECK_INTERVAL_S)

    async def _via_api(self, batch: list[dict[str, Any]]) -> None:
        while True:
            r = await self.client.post("/v1/events", json=batch, headers=ADMIN)
            if r.status_code == 202:
                return
            assert r.status_code == 503, f"/v1/events answered {r.status_code}: {r.text}"
            self.retries["api"] += 1
            await asyncio.sleep(0.2)

    async def _via_kafka(self, producer: Any, batch: list[dict[str, Any]]) -> None:
        topic = self.settings.topic("usage")
        while True:
            try:
                futures = [
                    await producer.send(topic, orjson.dumps(e), key=str(e["key_id"]).encode()) for e in batch
                ]
                await asyncio.wait_for(asyncio.gather(*futures), 20)
                return
            except Exception:  # noqa: BLE001 - the broker is failing over: send the batch again
                self.retries["kafka"] += 1
                await asyncio.sleep(0.2)

    async def events_at(self, per_second: float) -> None:
        producer = kafka.producer(self.settings, linger_ms=5)
        await producer.start()
        try:
            started = time.monotonic()
            for n, i in enumerate(range(0, len(self.events), BATCH)):
                batch = self.events[i : i + BATCH]
                if n % 2:
                    await self._via_api(batch)
                else:
                    await self._via_kafka(producer, batch)
                ahead = started + (i + BATCH) / per_second - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        finally:
            await producer.stop()


@contextlib.asynccontextmanager
async def spendgate_on(
    cluster: KafkaCluster, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Settings, Any]]:
    settings = Settings(
        kafka_bootstrap=cluster.bootstrap,
        topic_prefix=f"f{random.randrange(16**8):08x}.",
        partitions=8,
        replication_factor=3,
        database_url="",
        admin_token=ADMIN_TOKEN,
        data_dir=tmp_path / "data",
        api_port=0,
        worker_web_port=0,
    )
    await kafka.ensure_topics(settings)
    assert kafka.idempotence_supported(settings.kafka_bootstrap)
    await register(settings, KEYS, TEAM_ORG)
    app = create_app(settings)
    with running_services(tmp_path) as start:
        worker = start("worker", settings, "worker")
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gate", timeout=30) as client:

                async def ready() -> None:
                    assert (await client.get("/readyz")).status_code == 200

                await eventually(ready, timeout=60, interval=0.1)

                async def worker_ready() -> None:
                    # Faust creates its changelogs with RF 3 at start: Kafka refuses that while a
                    # broker is down, so no broker may go before the worker is up (~3-45 s here).
                    log = worker.log_path.read_text(errors="replace")
                    assert "[^Worker]: Ready" in log and "follower: live mode" in log, worker.log()

                await eventually(worker_ready, timeout=180, interval=0.5)
                yield client, settings, worker


async def converged(settings: Settings, expected: dict[str, Decimal], *, stall_s: float = 90.0) -> None:
    """Wait until ``spend.state`` totals equal ``expected``; fail when they stop moving for ``stall_s``.

    On a shared 2-core machine the worker may be slow: progress, not a fixed deadline, decides
    (bounded by 10 minutes). Totals above the expected value fail at once (counted twice).
    """
    deadline = time.monotonic() + 600
    last: dict[str, Decimal] = {}
    moved = time.monotonic()
    while True:
        totals = totals_from_state(await latest(settings, "state"))
        over = {s: (totals[s], v) for s, v in expected.items() if s in totals and totals[s] > v}
        assert not over, f"counted twice: {list(over.items())[:3]}"
        wrong = {s: (totals.get(s), v) for s, v in expected.items() if totals.get(s) != v}
        if not wrong:
            return
        if totals != last:
            last, moved = totals, time.monotonic()
        now = time.monotonic()
        assert now - moved < stall_s and now < deadline, (
            f"{len(wrong)} of {len(expected)} scopes differ, not moving: {list(wrong.items())[:3]}"
        )
        await asyncio.sleep(2.0)


async def run_under_load(
    cluster: KafkaCluster, tmp_path: Path, disrupt: Callable[[Settings], Awaitable[None]], per_second: float
) -> Load:
    events = make_events(random.Random(13), EVENTS)
    async with spendgate_on(cluster, tmp_path) as (client, settings, worker):
        load = Load(client, settings, events)
        checks = asyncio.create_task(load.checks())
        try:
            await asyncio.wait_for(asyncio.gather(load.events_at(per_second), disrupt(settings)), 300)
        finally:
            load.done.set()
            await checks
        expected = expected_totals(events)

        await converged(settings, expected)

        async def gate_agrees() -> None:  # the API recovered: it serves the same totals
            for scope in ("key:k1", "team:t0", "org:o1"):
                body = (await client.get(f"/v1/spend/{scope}", headers=ADMIN)).json()
                total = next(w for w in body["windows"] if w["window"] == "total")
                assert Decimal(total["spend_usd"]) == expected[scope], (scope, body)

        await eventually(gate_agrees, timeout=60, interval=0.5)
        assert worker.proc is not None and worker.proc.poll() is None, "the worker died:\n" + worker.log()
        await eventually(lambda: fully_replicated(settings), timeout=60, interval=1.0)
    assert not load.check_errors, load.check_errors[:5]
    assert all(code < 500 for code in load.check_status), load.check_status
    assert load.check_status[200] + load.check_status[429] > 100, load.check_status
    print(f"checks {dict(load.check_status)}, degraded {load.degraded}, retried batches {dict(load.retries)}")
    return load


async def test_sigkill_of_the_busiest_usage_leader_loses_and_doubles_nothing(
    cluster: KafkaCluster, tmp_path: Path
) -> None:
    victims: list[int] = []

    async def kill_then_restart(settings: Settings) -> None:
        await asyncio.sleep(8)
        leaders = await usage_leaders(settings)
        victim = leaders.most_common(1)[0][0]
        victims.append(victim)
        await asyncio.to_thread(cluster.kill, victim)
        await asyncio.sleep(10)

        async def moved_away() -> None:
            assert (await usage_leaders(settings))[victim] == 0  # its partitions have new leaders

        await eventually(moved_away, timeout=30, interval=1.0)
        await asyncio.to_thread(cluster.start_node, victim, timeout_s=180)

    await run_under_load(cluster, tmp_path, kill_then_restart, per_second=250)
    assert victims and cluster.node(victims[0]).alive()


async def test_rolling_restart_of_all_brokers_loses_and_doubles_nothing(
    cluster: KafkaCluster, tmp_path: Path
) -> None:
    restarted: list[int] = []

    async def rolling(settings: Settings) -> None:
        await eventually(lambda: fully_replicated(settings), timeout=60, interval=1.0)
        await asyncio.sleep(3)
        for node in cluster.nodes:
            await asyncio.to_thread(cluster.restart_node, node.node_id, timeout_s=180)
            restarted.append(node.node_id)
            await eventually(lambda: fully_replicated(settings), timeout=90, interval=1.0)

    await run_under_load(cluster, tmp_path, rolling, per_second=120)
    assert restarted == [1, 2, 3]
