"""Holds (issue 15) against the real broker, a real worker process and the whole API.

One worker and one in-process API serve the module (its own topics); each test uses keys of its
own. The tests run in file order: the last one replays the whole log the others wrote (holds
settled, released, voided, duplicated and expired) and diffs it against live ``spend.state``.
"""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from tests.integration.test_gate import running, wait_ready
from tests.kafka_helpers import ServiceProcess, eventually, latest, produce

from spendgate.adapters.embedded import free_port
from spendgate.adapters.kafka import ensure_topics
from spendgate.api.app import create_app
from spendgate.replay import ReplayOptions, ReportFormat, main_async
from spendgate.settings import Settings

ADMIN_TOKEN = "holds-admin-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class World:
    settings: Settings
    client: httpx.AsyncClient
    worker: ServiceProcess
    logs: Path
    app: Any


@pytest.fixture(scope="module")
async def world(
    kafka_bootstrap: str, migrated_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[World]:
    logs = tmp_path_factory.mktemp("holds")
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"h{uuid.uuid4().hex[:8]}.",
        partitions=2,
        admin_token=ADMIN_TOKEN,
        data_dir=logs / "data",
        worker_web_port=0,
        database_url=migrated_database_url,  # `spendgate api` needs one (the killed replica)
    )
    await ensure_topics(settings)
    worker = ServiceProcess("worker", settings, logs / "worker.log").start()
    try:
        app = create_app(settings)
        async with running(app) as client:
            await wait_ready(client)
            yield World(settings, client, worker, logs, app)
    finally:
        worker.stop()
        print(f"--- worker (tail) ---\n{worker.log()}")


def new_key() -> str:
    return f"k-{uuid.uuid4().hex[:8]}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


async def budget(w: World, scope: str, max_usd: str) -> None:
    """Put a 1d budget on ``scope`` straight on spend.config; wait until the gate has it."""
    record = {
        "v": 1,
        "type": "budget",
        "version": 1,
        "scope": scope,
        "tz": "UTC",
        "limits": [{"window": "1d", "max_usd": max_usd}],
    }
    await produce(w.settings, "config", [(f"budget/{scope}", record)])

    async def applied() -> None:
        windows = (await w.client.get(f"/v1/spend/{scope}", headers=AUTH)).json()["windows"]
        assert windows[0]["limit_usd"] == max_usd

    await eventually(applied, timeout=30, interval=0.05)


async def check(w: World, key: str, request_id: str | None = None, estimate: str | None = None, **extra: Any):
    body: dict[str, Any] = {"key_id": key, **extra}
    if request_id is not None:
        body.update(reserve=True, request_id=request_id, estimated_cost_usd=estimate)
    resp = await w.client.post("/v1/check", json=body, headers=AUTH)
    assert resp.status_code == 200, resp.text
    return resp.json()


def cost(key: str, request_id: str, usd: str, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": fields.pop("event_id", None) or uuid.uuid4().hex,
        "occurred_at": now_iso(),
        "key_id": key,
        "kind": "cost",
        "cost_usd": usd,
        "request_id": request_id,
        **fields,
    }


def hold(key: str, request_id: str, usd: str, ttl: int = 600, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": fields.pop("event_id", None) or uuid.uuid4().hex,
        "occurred_at": fields.pop("occurred_at", None) or now_iso(),
        "key_id": key,
        "kind": "hold",
        "estimated_cost_usd": usd,
        "hold_ttl_s": ttl,
        "request_id": request_id,
        **fields,
    }


async def record_at(settings: Settings, short_topic: str, partition: int, offset: int) -> dict[str, Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(settings.topic(short_topic), partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        record = await asyncio.wait_for(consumer.getone(), 10)
        assert record.offset == offset
        return dict(orjson.loads(record.value))
    finally:
        await consumer.stop()


async def post_events(w: World, *events: dict[str, Any]) -> None:
    resp = await w.client.post("/v1/events", json=list(events), headers=AUTH)
    assert resp.status_code == 202, resp.text


async def gate_view(w: World, scope: str) -> tuple[Decimal, Decimal]:
    """(spend, reserved) of the scope's total window as the gate answers ``/v1/spend``."""
    windows = (await w.client.get(f"/v1/spend/{scope}", headers=AUTH)).json()["windows"]
    total = next(x for x in windows if x["window"] == "total")
    return Decimal(total["spend_usd"]), Decimal(total["reserved_usd"])


async def live_state(w: World, scope: str) -> tuple[Decimal, Decimal]:
    """(spend, reserved) of the scope's total window in its latest spend.state record."""
    record = (await latest(w.settings, "state")).get(scope)
    assert record is not None, f"no state record for {scope} yet"
    total = next(x for x in record["windows"] if x["window"] == "total")
    return Decimal(total["spend_usd"]), Decimal(total.get("reserved_usd", "0"))


async def settles_to(w: World, scope: str, spend: str, reserved: str, timeout: float = 60) -> None:
    """Wait until both the worker's state record and the gate show ``(spend, reserved)``."""
    want = (Decimal(spend), Decimal(reserved))

    async def both() -> None:
        assert await live_state(w, scope) == want, w.worker.log()[-1500:]
        assert await gate_view(w, scope) == want

    await eventually(both, timeout=timeout, interval=0.2)


# --- settle, release ---------------------------------------------------------------------------------


async def test_a_hold_counts_at_once_and_is_replaced_by_a_larger_or_smaller_cost(world: World) -> None:
    key = new_key()
    await budget(world, f"key:{key}", "1")
    answer = await check(world, key, "r1", "0.40")
    assert answer["allowed"]
    assert await gate_view(world, f"key:{key}") == (0, Decimal("0.4"))  # this gate, at once
    assert not (await check(world, key, "r2", "0.61"))["allowed"]  # 0.40 + 0.61 > 1
    await settles_to(world, f"key:{key}", "0", "0.4")  # the worker counted the hold event
    await post_events(world, cost(key, "r1", "0.55"))  # larger than the estimate
    await settles_to(world, f"key:{key}", "0.55", "0")
    assert (await check(world, key, "r3", "0.20"))["allowed"]
    await post_events(world, cost(key, "r3", "0.01"))  # smaller
    await settles_to(world, f"key:{key}", "0.56", "0")


async def test_delete_releases_a_hold_here_at_once_and_everywhere_through_the_log(world: World) -> None:
    key = new_key()
    await budget(world, f"key:{key}", "1")
    assert (await check(world, key, "r1", "0.90"))["allowed"]
    assert (await check(world, key))["allowed"]  # plain: 0 + 0.90 < 1
    assert not (await check(world, key, "r2", "0.20"))["allowed"]
    await settles_to(world, f"key:{key}", "0", "0.9")
    resp = await world.client.delete("/v1/holds/r1", params={"key_id": key}, headers=AUTH)
    assert resp.status_code == 204
    await settles_to(world, f"key:{key}", "0", "0")
    assert (await check(world, key, "r2", "0.20"))["allowed"]
    again = await world.client.delete("/v1/holds/r1", params={"key_id": key}, headers=AUTH)
    assert again.status_code == 204  # a release repeated changes nothing
    await post_events(world, cost(key, "r1", "0.30"))  # the released call's cost is still a cost
    await settles_to(world, f"key:{key}", "0.3", "0.2")
    # Checked again after its release: this gate holds it a moment, but the request has ended in
    # the log (a hold after its end holds nothing), so the copy here stops counting too.
    assert (await check(world, key, "r1", "0.10"))["allowed"]
    assert await gate_view(world, f"key:{key}") == (Decimal("0.3"), Decimal("0.3"))
    await settles_to(world, f"key:{key}", "0.3", "0.2")


async def test_the_gate_knows_where_each_of_its_hold_events_landed(world: World) -> None:
    """It counts a hold until a state record reflects that offset: it must be the hold's own."""
    keys = [new_key() for _ in range(3)]
    for key in keys:
        await budget(world, f"key:{key}", "1")
    local = world.app.state.gate.state.local
    holds = []

    async def reserve(n: int) -> None:  # at once (several in one record batch, as under load)
        assert (await check(world, keys[n % 3], f"r{n}", "0.01"))["allowed"]
        holds.append(local.requests[(keys[n % 3], f"r{n}")])  # it leaves once state reflects it

    await asyncio.gather(*(reserve(n) for n in range(12)))

    async def placed() -> None:
        assert all(h.place is not None for h in holds)

    await eventually(placed, timeout=10, interval=0.05)
    for hold in holds:
        landed = await record_at(world.settings, "usage", *hold.place)
        assert (landed["kind"], landed["key_id"], landed["request_id"]) == (
            "hold",
            hold.key_id,
            hold.request_id,
        )


# --- exactly once ------------------------------------------------------------------------------------


async def test_settle_before_its_hold_and_duplicates_hold_and_charge_exactly_once(world: World) -> None:
    key = new_key()
    scope = f"key:{key}"
    repeated_cost = cost(key, "r2", "0.02")
    # Straight to spend.usage, in this order in the key's partition:
    await produce(
        world.settings,
        "usage",
        [
            (key, cost(key, "r1", "0.05")),  # the settle first (the gateway was faster than the gate)
            (key, hold(key, "r1", "0.50")),  # its hold: void
            (key, hold(key, "r2", "0.10")),
            (key, hold(key, "r2", "0.10")),  # another event, same request: holds once
            (key, repeated_cost),
            (key, repeated_cost),  # the same event again: counted once
            (key, cost(key, "r2", "0.02")),  # a second cost of r2: a cost, not a second settle
            (key, hold(key, "r3", "0.07")),
            (key, hold(key, "r3", "0.07")),
        ],
    )
    await settles_to(world, scope, "0.09", "0.07")
    # A retried reserving check gets the same answer and holds once.
    first = await check(world, key, "r4", "0.01")
    second = await check(world, key, "r4", "0.01")
    assert first == second and first["allowed"]
    await settles_to(world, scope, "0.09", "0.08")


# --- expiry ------------------------------------------------------------------------------------------


async def test_holds_expire_in_event_time_even_while_the_worker_is_down(world: World) -> None:
    key = new_key()
    scope = f"key:{key}"
    await budget(world, scope, "1")
    await post_events(world, hold(key, "r1", "0.70", ttl=8))
    await settles_to(world, scope, "0", "0.7")
    assert not (await check(world, key, "r2", "0.50"))["allowed"]
    world.worker.kill()
    try:
        # The gate stops counting the hold at holds_expire_at without any news from the worker.
        async def expired_here() -> None:
            assert await gate_view(world, scope) == (0, 0)

        await eventually(expired_here, timeout=15, interval=0.2)
        assert (await check(world, key, "r2", "0.50"))["allowed"]
    finally:
        world.worker.start()
    # Restarted past the TTL: the worker publishes the scope again with nothing held but r2.
    await settles_to(world, scope, "0", "0.5", timeout=90)


async def test_holds_of_a_killed_gate_expire(world: World) -> None:
    key = new_key()
    scope = f"key:{key}"
    await budget(world, scope, "1")
    port = free_port()
    other = ServiceProcess(
        "api",
        world.settings,
        world.logs / "api-killed.log",
        SPENDGATE_API_PORT=str(port),
        SPENDGATE_ADMIN_TOKEN=ADMIN_TOKEN,
    ).start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as replica:

            async def ready() -> None:
                try:
                    resp = await replica.get("/readyz")
                except httpx.TransportError as exc:
                    raise AssertionError(str(exc)) from None
                assert resp.status_code == 200

            await eventually(ready, timeout=60, interval=0.2)
            await eventually(lambda: replica_has_budget(replica, scope), timeout=30, interval=0.1)
            for n in range(3):
                body = {"key_id": key, "reserve": True, "request_id": f"r{n}", "hold_ttl_s": 8}
                body["estimated_cost_usd"] = "0.30"
                assert (await replica.post("/v1/check", json=body, headers=AUTH)).json()["allowed"]
            # This gate sees the other replica's holds through spend.state.
            await settles_to(world, scope, "0", "0.9")
            assert not (await check(world, key, "r9", "0.20"))["allowed"]
            other.kill()
    finally:
        other.kill()
    await settles_to(world, scope, "0", "0", timeout=60)  # expired: nothing leaked
    assert (await check(world, key, "r9", "0.20"))["allowed"]


async def replica_has_budget(client: httpx.AsyncClient, scope: str) -> None:
    windows = (await client.get(f"/v1/spend/{scope}", headers=AUTH)).json()["windows"]
    assert windows[0]["limit_usd"] == "1"


# --- replay ------------------------------------------------------------------------------------------


async def test_replay_equals_live_over_the_log_with_holds(world: World) -> None:
    """Runs last: every hold, settle, release, void and expiry of this module is in the log."""
    key = new_key()
    await post_events(world, hold(key, "r1", "0.25", model="m1"), hold(key, "r2", "0.25"))
    await post_events(world, cost(key, "r1", "0.30", model="m1"))
    await settles_to(world, f"key:{key}", "0.3", "0.25")

    async def no_difference() -> None:
        out, err = io.StringIO(), io.StringIO()
        code = await main_async(
            ReplayOptions(diff_live=True, quiet=True), settings=world.settings, stdout=out, stderr=err
        )
        assert code == 0, err.getvalue()

    await eventually(no_difference, timeout=60, interval=1)
    # The report shows what is held (r2; r1 was settled by its cost).
    out, err = io.StringIO(), io.StringIO()
    path = world.logs / "replay.json"
    args = ReplayOptions(scope=f"key:{key}", format=ReportFormat.JSON, out=path, quiet=True)
    assert await main_async(args, settings=world.settings, stdout=out, stderr=err) == 0, err.getvalue()
    [scope] = orjson.loads(path.read_bytes())["scopes"]
    assert [(w["window"], w["spend_usd"], w["reserved_usd"]) for w in scope["windows"]] == [
        ("total", "0.3", "0.25")
    ]


async def test_a_slash_in_a_request_id_releases_and_a_revoked_key_is_denied_on_a_retry(world: World) -> None:
    key = new_key()
    await budget(world, f"key:{key}", "1")
    assert (await check(world, key, "chat/123", "0.90"))["allowed"]
    assert not (await check(world, key, "r2", "0.50"))["allowed"]
    resp = await world.client.delete("/v1/holds/chat%2F123", params={"key_id": key}, headers=AUTH)
    assert resp.status_code == 204  # was a 404: the router decoded %2F before matching
    assert (await check(world, key, "r2", "0.50"))["allowed"]
    bad = {"key_id": key, "reserve": True, "request_id": "a\nb", "estimated_cost_usd": "0.1"}
    refused = await world.client.post("/v1/check", json=bad, headers=AUTH)
    assert refused.status_code == 422 and "request_id" in refused.text  # it could never be released
    revoked = {"v": 1, "type": "key", "version": 1, "key_id": key, "revoked": True}
    await produce(world.settings, "config", [(f"key/{key}", revoked)])

    async def denied() -> None:
        assert not (await check(world, key))["allowed"]

    await eventually(denied, timeout=30, interval=0.05)
    retry = await check(world, key, "r2", "0.50")  # its earlier answer was "allowed"
    assert not retry["allowed"] and retry["blocked_by"][0].get("code") == "key_revoked"
