"""The gate against a real broker: readiness, following, fail modes, the HTTP routes."""

from __future__ import annotations

import asyncio
import gc
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from tests.kafka_helpers import eventually, produce, read_all

from spendgate.adapters.embedded import free_port, start_broker
from spendgate.adapters.follower import TopicFollower
from spendgate.adapters.kafka import ensure_topics
from spendgate.api.app import CATCH_UP_GC_THRESHOLD, create_app
from spendgate.domain.check import CheckRequest, check
from spendgate.domain.gate_state import GateState
from spendgate.settings import Settings

ADMIN_TOKEN = "gate-admin-" + uuid.uuid4().hex
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
_seq = itertools.count(1)


def iso(instant: datetime) -> str:
    return instant.isoformat().replace("+00:00", "Z")


def day_bounds() -> tuple[datetime, datetime]:
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


def budget_record(scope: str, max_usd: str, window: str = "1d") -> tuple[str, dict[str, Any]]:
    return f"budget/{scope}", {
        "v": 1,
        "type": "budget",
        "version": next(_seq),
        "scope": scope,
        "limits": [{"window": window, "max_usd": max_usd}],
        "tz": "UTC",
    }


def state_record(scope: str, spend_usd: str) -> tuple[str, dict[str, Any]]:
    start, end = day_bounds()
    return scope, {
        "v": 1,
        "scope": scope,
        "as_of": iso(datetime.now(UTC)),
        "source": {"partition": 0, "offset": 1},
        "windows": [
            {"window": "1d", "start": iso(start), "resets_at": iso(end), "spend_usd": spend_usd},
            {"window": "total", "start": None, "resets_at": None, "spend_usd": spend_usd},
        ],
    }


def decision_record(scope: str, blocked: bool) -> tuple[str, dict[str, Any]]:
    _, end = day_bounds()
    windows = (
        [{"window": "1d", "spend_usd": "11", "limit_usd": "10", "resets_at": iso(end)}] if blocked else []
    )
    return scope, {
        "v": 1,
        "scope": scope,
        "blocked": blocked,
        "seq": time.time_ns() // 1000 + next(_seq),
        "as_of": iso(datetime.now(UTC)),
        "windows": windows,
        "source": None,
    }


def event_body(key_id: str = "k1", **fields: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "event_id": uuid.uuid4().hex,
        "occurred_at": iso(datetime.now(UTC)),
        "key_id": key_id,
        "cost_usd": "0.25",
        **fields,
    }


def follower_for(settings: Settings, state: GateState, **kw: Any) -> TopicFollower:
    return TopicFollower(
        settings.kafka_bootstrap,
        {
            settings.topic("config"): lambda k, v, *_: state.apply_config(k, v),  # type: ignore[arg-type]
            settings.topic("decisions"): lambda k, v, *_: state.apply_decision(v, k),
            settings.topic("state"): lambda k, v, *_: state.apply_state(v, k),
        },
        **kw,
    )


async def produce_batched(settings: Settings, short_topic: str, records: list[tuple[str, Any]]) -> None:
    """Produce without waiting between records, so each partition gets multi-record batches."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=50)
    await producer.start()
    try:
        futures = [
            await producer.send(settings.topic(short_topic), orjson.dumps(v), key=k.encode())
            for k, v in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


@asynccontextmanager
async def running(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gate", timeout=30) as client:
            yield client


async def wait_ready(client: httpx.AsyncClient, timeout: float = 60.0) -> None:
    async def ready() -> None:
        assert (await client.get("/readyz")).status_code == 200

    await eventually(ready, timeout=timeout, interval=0.05)


# --- the follower ---------------------------------------------------------------------------


async def test_follower_is_ready_only_after_everything_present_at_start(settings_factory: Any) -> None:
    settings = await settings_factory(database_url="")
    config = [budget_record(f"key:k{i}", "10") for i in range(300)]
    decisions = [decision_record(f"key:k{i}", blocked=i % 2 == 0) for i in range(300)]
    states = [state_record(f"key:k{i}", f"{i}.5") for i in range(300)]
    await produce_batched(settings, "config", config)
    await produce_batched(settings, "decisions", decisions)
    await produce_batched(settings, "state", states)  # the last batch of each partition holds many records

    state = GateState()
    seen_at_ready: list[int] = []
    follower = follower_for(settings, state)
    await follower.start()
    try:
        await follower.wait_ready(60)
        seen_at_ready.append(follower.records)
        assert seen_at_ready[0] >= 900
        assert len(state.budgets) == 300 and len(state.decisions) == 300 and len(state.states) == 300
        assert state.states["key:k299"].windows[0].spend == 299_500_000_000
        assert follower.invalid_records == 0
        assert follower.state_lag_ms() is not None
    finally:
        await follower.stop()


async def test_the_api_collects_rarely_while_catching_up_then_as_usual(settings_factory: Any) -> None:
    """A cold start freezes batch by batch and collects about never; not so once serving."""
    settings = await settings_factory(database_url="")
    await produce_batched(settings, "state", [state_record(f"key:k{i}", "1") for i in range(50)])
    usual = gc.get_threshold()
    assert usual[0] < CATCH_UP_GC_THRESHOLD
    app = create_app(settings)
    async with running(app) as client:
        assert gc.get_threshold()[0] == CATCH_UP_GC_THRESHOLD  # the follower has read nothing yet
        await wait_ready(client)

        async def usual_again() -> None:
            assert gc.get_threshold() == usual

        await eventually(usual_again, timeout=10, interval=0.02)
    assert gc.get_threshold() == usual


async def test_follower_on_empty_topics_is_ready_at_once(settings_factory: Any) -> None:
    settings = await settings_factory(database_url="")
    follower = follower_for(settings, GateState())
    await follower.start()
    try:
        await follower.wait_ready(30)
    finally:
        await follower.stop()


async def test_follower_sees_a_new_block_within_tens_of_milliseconds(settings_factory: Any) -> None:
    settings = await settings_factory(database_url="")
    state = GateState()
    follower = follower_for(settings, state)
    await follower.start()
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=0)
    await producer.start()
    try:
        await follower.wait_ready(30)
        await asyncio.sleep(0.5)  # let it switch to live mode
        latencies = []
        for i in range(20):
            scope, value = decision_record(f"key:live{i}", blocked=True)
            sent = time.monotonic()
            await producer.send_and_wait(settings.topic("decisions"), orjson.dumps(value), key=scope.encode())
            while scope not in state.decisions:  # noqa: ASYNC110 - polling is what is measured
                await asyncio.sleep(0.001)
            latencies.append(time.monotonic() - sent)
            assert not check(CheckRequest(f"live{i}"), state, time.time()).allowed
        latencies.sort()
        print(f"produce->gate latency p50 {latencies[10] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
        assert latencies[10] < 0.1, latencies
    finally:
        await producer.stop()
        await follower.stop()


async def test_two_gates_give_the_same_answers(settings_factory: Any) -> None:
    settings = await settings_factory(database_url="")
    await produce(settings, "config", [budget_record(f"team:t{i}", "10") for i in range(20)])
    await produce(settings, "state", [state_record(f"team:t{i}", str(i)) for i in range(20)])
    a, b = GateState(), GateState()
    first = follower_for(settings, a)
    await first.start()
    await first.wait_ready(30)
    await produce(
        settings, "decisions", [decision_record(f"key:k{i}", blocked=i % 3 == 0) for i in range(20)]
    )
    second = follower_for(settings, b)
    await second.start()
    try:
        await second.wait_ready(30)

        async def same() -> None:
            assert len(a.decisions) == len(b.decisions) == 20

        await eventually(same, timeout=10, interval=0.05)
        now = time.time()
        for i in range(20):
            request = CheckRequest(f"k{i}", team_id=f"t{i}", estimated_cost_nanos=500_000_000)
            assert check(request, a, now) == check(request, b, now)
        assert [check(CheckRequest(f"k{i}", team_id=f"t{i}"), a, now).allowed for i in range(20)] == [
            not (i % 3 == 0 or i >= 10) for i in range(20)
        ]
    finally:
        await first.stop()
        await second.stop()


# --- fail modes -----------------------------------------------------------------------------


async def test_broker_outage_keeps_answering_from_memory_then_degrades_per_fail_mode(tmp_path: Path) -> None:
    broker = start_broker(free_port(), tmp_path / "broker.log")
    try:
        base = Settings(
            kafka_bootstrap=broker.bootstrap,
            topic_prefix="outage.",
            partitions=2,
            database_url="",
            admin_token=ADMIN_TOKEN,
            max_staleness_s=2.0,
        )
        await ensure_topics(base)
        await produce(base, "config", [budget_record("key:over", "10")])
        await produce(base, "state", [state_record("key:over", "10")])
        apps = {
            mode: create_app(Settings(**{**base.model_dump(), "fail_mode": mode}))
            for mode in ("open", "closed")
        }
        async with running(apps["open"]) as open_client, running(apps["closed"]) as closed_client:
            clients = {"open": open_client, "closed": closed_client}
            for client in clients.values():
                await wait_ready(client)
                over = (await client.post("/v1/check", json={"key_id": "over"}, headers=ADMIN)).json()
                assert over["allowed"] is False and over["degraded"] is False
                assert over["blocked_by"][0]["scope"] == "key:over"

            broker.process.popen.kill()  # SIGKILL: the outage starts now, not after a graceful exit
            outage = time.monotonic()
            for client in clients.values():  # right after the outage: still from memory, not degraded
                started = time.monotonic()
                body = (await client.post("/v1/check", json={"key_id": "fine"}, headers=ADMIN)).json()
                assert time.monotonic() - started < 0.5
                assert body["allowed"] is True and body["degraded"] is False
                over = (await client.post("/v1/check", json={"key_id": "over"}, headers=ADMIN)).json()
                assert over["allowed"] is False and over["degraded"] is False
            assert time.monotonic() - outage < 1.5

            await asyncio.sleep(2.5)
            for mode, client in clients.items():
                started = time.monotonic()
                body = (await client.post("/v1/check", json={"key_id": "fine"}, headers=ADMIN)).json()
                assert time.monotonic() - started < 0.5
                assert body["degraded"] is True and body["state_lag_ms"] > 2000
                assert body["allowed"] is (mode == "open")
                over = (await client.post("/v1/check", json={"key_id": "over"}, headers=ADMIN)).json()
                assert over["allowed"] is False and over["degraded"] is True  # a known block holds
                metrics = (await client.get("/metrics")).text
                assert (
                    f'spendgate_gate_degraded_answers_total{{fail_mode="{mode}",reason="stale"}} 2.0'
                    in metrics
                )
    finally:
        broker.stop()


async def test_not_ready_gate_answers_degraded_and_readyz_is_503() -> None:
    dead = f"127.0.0.1:{free_port()}"
    for mode, allowed in (("open", True), ("closed", False)):
        app = create_app(
            Settings(kafka_bootstrap=dead, database_url="", admin_token=ADMIN_TOKEN, fail_mode=mode)
        )
        async with running(app) as client:
            assert (await client.get("/healthz")).status_code == 200
            assert (await client.get("/readyz")).status_code == 503
            body = (await client.post("/v1/check", json={"key_id": "k1"}, headers=ADMIN)).json()
            assert body["allowed"] is allowed and body["degraded"] is True
            auth = await client.get("/v1/authorize", params={"key_id": "k1"}, headers=ADMIN)
            assert auth.status_code == (200 if allowed else 429)


# --- HTTP routes ----------------------------------------------------------------------------


@pytest.fixture
async def gate_client(settings_factory: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Settings]]:
    settings = await settings_factory(database_url="", admin_token=ADMIN_TOKEN)
    async with running(create_app(settings)) as client:
        await wait_ready(client)
        yield client, settings


async def test_check_authorize_and_spend_over_http(gate_client: tuple[httpx.AsyncClient, Settings]) -> None:
    client, settings = gate_client
    await produce(
        settings,
        "config",
        [
            budget_record("team:t1", "10"),
            (
                "key/k1",
                {
                    "v": 1,
                    "type": "key",
                    "version": next(_seq),
                    "key_id": "k1",
                    "user_id": "u1",
                    "team_id": "t1",
                },
            ),
        ],
    )
    await produce(settings, "state", [state_record("team:t1", "9.5")])

    async def team_is_known() -> None:
        body = (await client.get("/v1/spend/team:t1", headers=ADMIN)).json()
        assert body["windows"][0]["spend_usd"] == "9.5"

    await eventually(team_is_known, timeout=10, interval=0.05)
    spend = (await client.get("/v1/spend/team:t1", headers=ADMIN)).json()
    assert spend["blocked"] is False
    assert spend["windows"][0] == {
        "window": "1d",
        "spend_usd": "9.5",
        "limit_usd": "10",
        "remaining_usd": "0.5",
        "soft_usd": None,
        "reserved_usd": "0",
        "resets_at": iso(day_bounds()[1]),
    }
    assert spend["windows"][-1]["window"] == "total"

    ok = (
        await client.post("/v1/check", json={"key_id": "k1", "estimated_cost_usd": "0.5"}, headers=ADMIN)
    ).json()
    assert ok["allowed"] is True and ok["degraded"] is False
    over = (
        await client.post("/v1/check", json={"key_id": "k1", "estimated_cost_usd": "0.6"}, headers=ADMIN)
    ).json()
    assert over["allowed"] is False and over["blocked_by"][0]["scope"] == "team:t1"
    assert over["retry_after_s"] > 0

    await produce(settings, "decisions", [decision_record("end_user:alice", blocked=True)])

    async def alice_blocked() -> None:
        r = await client.get("/v1/authorize", params={"key_id": "k1", "end_user_id": "alice"}, headers=ADMIN)
        assert r.status_code == 429
        assert int(r.headers["Retry-After"]) == r.json()["retry_after_s"]

    await eventually(alice_blocked, timeout=10, interval=0.05)
    bob = await client.get(
        "/v1/authorize", params={"key_id": "k1", "end_user_id": "bob", "tags": "a,b"}, headers=ADMIN
    )
    assert bob.status_code == 200 and bob.json()["allowed"] is True

    bad = await client.post("/v1/check", json={"key_id": "k1", "surprise": 1}, headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid"
    assert (await client.post("/v1/check", json={"key_id": "k1"})).status_code == 401
    assert (await client.get("/v1/spend/nonsense", headers=ADMIN)).status_code == 422
    assert (await client.get("/v1/spend/model:openai%2Fgpt-4o", headers=ADMIN)).json()[
        "scope"
    ] == "model:openai%2Fgpt-4o"


async def test_events_are_acknowledged_and_exactly_the_valid_ones_reach_the_topic(
    gate_client: tuple[httpx.AsyncClient, Settings],
) -> None:
    client, settings = gate_client
    valid_ids: list[str] = []

    all_valid = [event_body(f"k{i}") for i in range(5)]
    r = await client.post("/v1/events", json=all_valid, headers=ADMIN)
    assert r.status_code == 202, r.text
    assert r.json()["accepted"] == 5
    valid_ids += [e["event_id"] for e in all_valid]

    good = event_body("k9")
    mixed = [good, {"event_id": "x"}, event_body(cost_usd="-1"), "not an object", event_body(cost_usd="NaN")]
    r = await client.post("/v1/events", json=mixed, headers=ADMIN)
    assert r.status_code == 207, r.text
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["accepted", "rejected", "rejected", "rejected", "rejected"]
    assert all(x["errors"] for x in results[1:])
    valid_ids.append(good["event_id"])

    r = await client.post(
        "/v1/events", json=[{"key_id": "k1"}, event_body(occurred_at="yesterday")], headers=ADMIN
    )
    assert r.status_code == 422 and r.json()["error"]["details"]["results"][1]["status"] == "rejected"

    r = await client.post(
        "/v1/events", content=b"{not json", headers={**ADMIN, "content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"

    r = await client.post("/v1/events", json=[event_body() for _ in range(1001)], headers=ADMIN)
    assert r.status_code == 413

    huge = b"[" + b",".join([orjson.dumps(event_body(request_id="x" * 200))] * 25_000) + b"]"
    assert len(huge) > 5 * 1024 * 1024
    r = await client.post("/v1/events", content=huge, headers={**ADMIN, "content-type": "application/json"})
    assert r.status_code == 413

    assert (await client.post("/v1/events", json=all_valid)).status_code == 401

    arrived = await read_all(settings, "usage")
    assert sorted(v["event_id"] for _, v in arrived) == sorted(valid_ids)
    assert {k for k, _ in arrived} == {"k0", "k1", "k2", "k3", "k4", "k9"}

    metrics = (await client.get("/metrics")).text
    assert "spendgate_gate_events_ingested_total 6.0" in metrics
    assert "spendgate_gate_events_rejected_total 6.0" in metrics


async def test_whole_app_tokens_and_budgets_flow_from_control_plane_to_gate(settings_factory: Any) -> None:
    settings = await settings_factory(admin_token=ADMIN_TOKEN)  # with this module's migrated database
    async with running(create_app(settings)) as client:
        await wait_ready(client)
        gateway = (await client.post("/v1/tokens", json={"role": "gateway"}, headers=ADMIN)).json()["token"]
        viewer = (await client.post("/v1/tokens", json={"role": "viewer"}, headers=ADMIN)).json()["token"]
        as_gateway = {"Authorization": f"Bearer {gateway}"}
        as_viewer = {"Authorization": f"Bearer {viewer}"}
        assert (await client.post("/v1/check", json={"key_id": "k1"}, headers=as_gateway)).json()["allowed"]
        assert (await client.post("/v1/check", json={"key_id": "k1"}, headers=as_viewer)).status_code == 403
        assert (await client.get("/v1/spend/key:k1", headers=as_viewer)).status_code == 200
        assert (await client.get("/v1/spend/key:k1", headers=as_gateway)).status_code == 200

        body = {"limits": [{"window": "1d", "max_usd": "0"}]}
        assert (await client.put("/v1/budgets/key:k1", json=body, headers=ADMIN)).status_code == 200

        async def blocked() -> None:
            answer = (await client.post("/v1/check", json={"key_id": "k1"}, headers=as_gateway)).json()
            assert answer["allowed"] is False and answer["blocked_by"][0]["scope"] == "key:k1"

        await eventually(blocked, timeout=10, interval=0.05)


async def test_the_check_fast_path_answers_exactly_like_the_routed_app(settings_factory: Any) -> None:
    from spendgate.api.check import with_check_fast_path

    settings = await settings_factory(database_url="", admin_token=ADMIN_TOKEN)
    await produce(settings, "config", [budget_record("key:kf", "10")])
    await produce(settings, "state", [state_record("key:kf", "10")])
    app = create_app(settings)
    fast = with_check_fast_path(app, app.state.check_handler)
    requests: list[tuple[bytes, dict[str, str]]] = [
        (b'{"key_id": "kf"}', ADMIN),  # blocked
        (b'{"key_id": "other", "model": "openai/gpt-4o"}', ADMIN),  # allowed
        (b'{"key_id": "kf"}', {}),  # 401
        (b'{"key_id": "kf"}', {"Authorization": "Bearer nope"}),  # 401
        (b"{not json", ADMIN),  # 400
        (b'{"key_id": "kf", "surprise": 1}', ADMIN),  # 422 unknown field
        (b'{"key_id": "kf", "estimated_cost_usd": "-1"}', ADMIN),  # 422 negative
    ]
    async with app.router.lifespan_context(app):
        routed = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gate")
        direct = httpx.AsyncClient(transport=httpx.ASGITransport(app=fast), base_url="http://gate")
        async with routed, direct:
            await wait_ready(routed)
            for body, headers in requests:
                a = await routed.post("/v1/check", content=body, headers=headers)
                b = await direct.post("/v1/check", content=body, headers=headers)
                same_moment = [{k: v for k, v in r.json().items() if k != "state_lag_ms"} for r in (a, b)]
                assert a.status_code == b.status_code and same_moment[0] == same_moment[1], body
            statuses = [
                (await direct.post("/v1/check", content=body, headers=headers)).status_code
                for body, headers in requests
            ]
            assert statuses == [200, 200, 401, 401, 400, 422, 422]
            blocked = (await direct.post("/v1/check", content=requests[0][0], headers=ADMIN)).json()
            assert blocked["allowed"] is False and blocked["blocked_by"][0]["scope"] == "key:kf"
            assert (await direct.get("/readyz")).status_code == 200  # everything else passes through
