"""``spendgate notifier`` against the real broker, real Postgres and real HTTP receivers on
127.0.0.1 (issue 18): matching, signatures, Slack bodies, retries, give-ups to the DLQ, a dead
receiver next to a healthy one, and a SIGKILLed notifier that still delivers everything."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from tests.kafka_helpers import eventually, produce, read_all, running_services

from spendgate.api.errors import DatabaseUnavailable
from spendgate.control.webhooks import WebhookService
from spendgate.domain.authority import Principal, Role
from spendgate.domain.webhook_delivery import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    RetryPolicy,
    verify,
)
from spendgate.domain.webhooks import (
    parse_kinds,
    parse_patterns,
)
from spendgate.notifier import Notifier
from spendgate.settings import Settings
from spendgate.store.pool import open_pool
from spendgate.store.webhooks import WebhookSpec, WebhookStore

pytestmark = pytest.mark.integration

ADMIN = Principal(Role.ADMIN, token_id="test-admin")
SECRET = "whsec_test_secret_0123456789"
FAST = RetryPolicy(base_s=0.2, cap_s=1.0, max_attempts=6)


def alert(scope: str, kind: str = "soft_limit", **extra: Any) -> dict[str, Any]:
    return {
        "v": 1,
        "scope": scope,
        "kind": kind,
        "window": "1d",
        "spend_usd": "412.5",
        "limit_usd": "400",
        "resets_at": "2026-12-02T00:00:00Z",
        "as_of": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        **extra,
    }


@dataclass
class Received:
    at: float
    headers: dict[str, str]
    body: bytes

    @property
    def event_id(self) -> str:
        return self.headers[EVENT_ID_HEADER]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Endpoint:
    """One receiver path: answers ``script`` statuses in turn, then ``then``; may hang."""

    script: list[int] = field(default_factory=list)
    then: int = 200
    delay_s: float = 0.0
    got: list[Received] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.got.append(Received(time.monotonic(), dict(request.headers), body))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        status = self.script.pop(0) if self.script else self.then
        return web.Response(status=status, text="ok")

    def ids(self) -> set[str]:
        return {r.event_id for r in self.got}


@dataclass
class Receiver:
    base: str
    endpoints: dict[str, Endpoint]

    def add(self, **kw: Any) -> tuple[str, Endpoint]:
        name = uuid.uuid4().hex[:8]
        self.endpoints[name] = Endpoint(**kw)
        return f"{self.base}/{name}", self.endpoints[name]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    endpoints: dict[str, Endpoint] = {}

    async def route(request: web.Request) -> web.Response:
        endpoint = endpoints.get(request.match_info["name"])
        return await endpoint.handle(request) if endpoint else web.Response(status=404)

    app = web.Application()
    app.router.add_post("/{name}", route)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Receiver(f"http://127.0.0.1:{port}", endpoints)
    finally:
        await runner.cleanup()


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[WebhookStore]:
    pool = await open_pool(settings.database_url, max_size=6)
    await pool.wait(timeout=10)
    made = WebhookStore(pool)
    try:
        yield made
    finally:
        async with pool.connection() as conn:  # each test's webhooks (and deliveries) go
            await conn.execute("SET statement_timeout = '20s'")  # a lock left behind fails, not hangs
            await conn.execute("DELETE FROM webhooks")
        await pool.close()


async def subscribe(
    store: WebhookStore, url: str, scopes: list[str], *, kinds: list[str] | None = None, **kw: Any
) -> str:
    webhook_id = f"w-{uuid.uuid4().hex[:8]}"
    spec = WebhookSpec(url, parse_patterns(scopes), parse_kinds(kinds), kw.pop("format", "json"), **kw)
    await WebhookService(store).put(ADMIN, webhook_id, spec)
    return webhook_id


@pytest.fixture
async def notifier(settings: Settings, store: WebhookStore) -> AsyncIterator[Callable[..., Any]]:
    started: list[Notifier] = []

    async def start(**kw: Any) -> Notifier:
        kw.setdefault("policy", FAST)
        made = Notifier(settings, store, **kw)
        await made.start()
        started.append(made)
        return made

    try:
        yield start
    finally:
        for made in started:
            await made.stop()


async def test_matching_alerts_are_delivered_once_signed_and_slack_renders_decimals(
    settings: Settings, store: WebhookStore, receiver: Receiver, notifier: Callable[..., Any]
) -> None:
    team = f"team-{uuid.uuid4().hex[:6]}"
    json_url, signed = receiver.add()
    slack_url, slack = receiver.add()
    other_url, other = receiver.add()
    await subscribe(store, json_url, [f"team:{team}"], secret=SECRET)
    await subscribe(store, slack_url, ["team:*"], kinds=["soft_limit"], format="slack", secret=None)
    await subscribe(store, other_url, ["team:someone-else", "key:k1"])
    await notifier()

    soft, blocked = alert(f"team:{team}"), alert(f"team:{team}", "blocked", spend_usd="400.000000001")
    await produce(settings, "alerts", [(f"team:{team}", soft), (f"team:{team}", blocked)])

    async def both_arrived() -> None:
        assert len(signed.got) == 2 and len(slack.got) == 1

    await eventually(both_arrived, timeout=30, interval=0.1)
    await asyncio.sleep(1.0)  # nothing more arrives: exactly once each
    assert len(signed.got) == 2 and len(slack.got) == 1 and other.got == []

    assert sorted(r.json()["kind"] for r in signed.got) == ["blocked", "soft_limit"]
    assert {r.json()["spend_usd"] for r in signed.got} == {"412.5", "400.000000001"}
    for r in signed.got:
        assert verify(SECRET, r.headers[SIGNATURE_HEADER], r.body, now=time.time())
        assert not verify("whsec_some_other_secret_xx", r.headers[SIGNATURE_HEADER], r.body, now=time.time())
        assert r.headers["Content-Type"] == "application/json"
    assert len(signed.ids()) == 2

    message = slack.got[0].json()
    assert set(message) == {"text", "blocks"} and SIGNATURE_HEADER not in slack.got[0].headers
    assert f"team:{team}" in message["text"] and "$412.50" in message["text"] and "$400.00" in message["text"]
    assert "1d" in message["text"] and "2026-12-02T00:00:00Z" in message["text"]


async def test_500s_are_retried_with_one_event_id_and_410_is_not(
    settings: Settings, store: WebhookStore, receiver: Receiver, notifier: Callable[..., Any]
) -> None:
    flaky_url, flaky = receiver.add(script=[500, 500, 500])
    gone_url, gone = receiver.add(then=410)
    flaky_id = await subscribe(store, flaky_url, ["key:*"])
    gone_id = await subscribe(store, gone_url, ["key:*"])
    await notifier()
    await produce(settings, "alerts", [("key:k9", alert("key:k9", "blocked"))])

    async def settled() -> None:
        rows = (await WebhookService(store).deliveries(ADMIN, flaky_id))["items"]
        assert [(r["status"], r["attempts"], r["last_status"]) for r in rows] == [("delivered", 4, 200)]

    await eventually(settled, timeout=30, interval=0.1)
    assert len(flaky.got) == 4 and len(flaky.ids()) == 1  # the same Spendgate-Event-Id each time
    (row,) = (await WebhookService(store).deliveries(ADMIN, flaky_id))["items"]
    assert [(h["status"], h["error"]) for h in row["history"]] == [(500, "HTTP 500")] * 3 + [(200, None)]
    gaps = [b.at - a.at for a, b in zip(flaky.got, flaky.got[1:], strict=False)]
    assert all(gap >= 0.09 for gap in gaps), gaps  # backed off (0.1-0.2 s, 0.2-0.4 s, 0.4-0.8 s)

    async def given_up() -> dict[str, Any]:
        rows = (await WebhookService(store).deliveries(ADMIN, gone_id))["items"]
        assert [(r["status"], r["attempts"], r["last_status"]) for r in rows] == [("failed", 1, 410)]
        return rows[0]

    gone_row = await eventually(given_up, timeout=10, interval=0.1)
    assert "not retried" in gone_row["last_error"] and len(gone.got) == 1

    async def dead_lettered() -> list[Any]:
        dlq = [v for k, v in await read_all(settings, "alerts.dlq") if k == gone_id]
        assert len(dlq) == 1
        return dlq

    (record,) = await eventually(dead_lettered, timeout=10, interval=0.2)
    assert record["event_id"] == gone.got[0].event_id and record["last_status"] == 410
    assert record["alert"]["scope"] == "key:k9" and record["attempts"] == 1
    await asyncio.sleep(1.0)
    assert len(gone.got) == 1  # never retried


async def test_a_dead_or_hanging_receiver_does_not_delay_a_healthy_one(
    settings: Settings, store: WebhookStore, receiver: Receiver, notifier: Callable[..., Any]
) -> None:
    hanging_url, hanging = receiver.add(delay_s=30)
    healthy_url, healthy = receiver.add()
    dead_url = f"http://127.0.0.1:{_closed_port()}/dead"
    for url in (hanging_url, dead_url, healthy_url):
        await subscribe(store, url, ["tag:*"])
    await notifier(timeout_s=5.0, per_webhook=2)

    # first the stuck receivers fill their slots, then a burst the healthy one must get at once
    await produce(settings, "alerts", [("tag:warmup", alert("tag:warmup"))])
    await eventually(lambda: _assert(len(healthy.got) == 1), timeout=30, interval=0.05)
    sent = time.monotonic()
    await produce(settings, "alerts", [(f"tag:t{i}", alert(f"tag:t{i}")) for i in range(6)])
    await eventually(lambda: _assert(len(healthy.got) == 7), timeout=10, interval=0.02)
    took = healthy.got[-1].at - sent
    assert took < 1.5, f"healthy receiver waited {took:.2f}s behind the stuck ones"
    assert len(hanging.got) <= 2  # its per-webhook cap: the others wait for a slot, not a thread


async def test_a_notifier_killed_mid_delivery_still_delivers_every_alert(
    settings: Settings, store: WebhookStore, receiver: Receiver, tmp_path: Path
) -> None:
    url, slow = receiver.add(delay_s=0.15)
    await subscribe(store, url, ["team:*"])
    alerts = [alert(f"team:k{i}", "blocked") for i in range(30)]
    with running_services(tmp_path) as start:
        first = start("notifier", settings, "notifier-1")
        await produce(settings, "alerts", [(a["scope"], a) for a in alerts])
        await eventually(lambda: _assert(len(slow.got) >= 3), timeout=40, interval=0.05)
        first.kill()  # SIGKILL: deliveries in flight, offsets possibly uncommitted
        seen_before = len(slow.ids())
        assert seen_before < 30
        start("notifier", settings, "notifier-2")
        await eventually(lambda: _assert(len(slow.ids()) == 30), timeout=45, interval=0.1)
    per_id: dict[str, int] = {}
    for r in slow.got:
        per_id[r.event_id] = per_id.get(r.event_id, 0) + 1
    assert len(per_id) == 30 and all(n >= 1 for n in per_id.values())
    assert {r.json()["scope"] for r in slow.got} == {a["scope"] for a in alerts}


async def _assert(condition: bool) -> None:
    assert condition


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_team_crossing_its_soft_limit_then_its_limit_end_to_end(
    settings: Settings,
    store: WebhookStore,
    receiver: Receiver,
    notifier: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """Usage -> worker -> spend.alerts -> notifier -> the receiver: exactly the matching alerts."""
    team = f"e2e-{uuid.uuid4().hex[:6]}"
    url, got = receiver.add()
    slack_url, slack = receiver.add()
    other_url, other = receiver.add()
    await subscribe(store, url, [f"team:{team}"], secret=SECRET)
    await subscribe(store, slack_url, [f"team:{team}"], kinds=["soft_limit"], format="slack", secret=None)
    await subscribe(store, other_url, [f"team:{team}-not"])
    limits = [{"window": "1d", "max_usd": "10", "soft_usd": "8"}]
    budget = {"v": 1, "type": "budget", "version": 1, "scope": f"team:{team}", "tz": "UTC", "limits": limits}
    await produce(settings, "config", [(f"budget/team:{team}", budget)])

    def usage(cost: str) -> tuple[str, dict[str, Any]]:
        now = datetime.now(UTC).isoformat()
        event = {"v": 1, "event_id": uuid.uuid4().hex, "occurred_at": now, "key_id": "ke2e"}
        return "ke2e", {**event, "cost_usd": cost, "team_id": team}

    with running_services(tmp_path) as start:
        start("worker", settings, "worker")
        await notifier()
        await produce(settings, "usage", [usage("8.5")])
        await eventually(lambda: _assert(len(got.got) == 1), timeout=50, interval=0.1)
        await produce(settings, "usage", [usage("2.25")])
        await eventually(lambda: _assert(len(got.got) == 2), timeout=20, interval=0.1)
        await asyncio.sleep(1.0)
    assert [r.json()["kind"] for r in got.got] == ["soft_limit", "blocked"]
    assert [r.json()["spend_usd"] for r in got.got] == ["8.5", "10.75"]
    assert all(verify(SECRET, r.headers[SIGNATURE_HEADER], r.body, now=time.time()) for r in got.got)
    assert len(slack.got) == 1 and other.got == []
    text = slack.got[0].json()["text"]
    assert f"team:{team}" in text and "$8.50" in text and "1d" in text, text


class FailingOnce(WebhookStore):
    """Postgres refusing the first scheduling of a batch (as when it restarts)."""

    failures = 1

    async def schedule(self, items: Any) -> int:
        if self.failures and items:
            self.failures -= 1
            raise DatabaseUnavailable()
        return await super().schedule(items)


async def test_an_alert_whose_scheduling_failed_is_read_again_not_skipped(
    settings: Settings, store: WebhookStore, receiver: Receiver
) -> None:
    url, got = receiver.add()
    await subscribe(store, url, ["org:*"])
    failing = FailingOnce(store.pool)
    notifier = Notifier(settings, failing, policy=FAST)
    await notifier.start()
    try:
        await produce(settings, "alerts", [("org:o1", alert("org:o1"))])
        await eventually(lambda: _assert(len(got.got) == 1), timeout=30, interval=0.1)
        await produce(settings, "alerts", [("org:o2", alert("org:o2"))])  # and what follows, too
        await eventually(lambda: _assert(len(got.got) == 2), timeout=10, interval=0.1)
    finally:
        await notifier.stop()
    assert failing.failures == 0
    assert [r.json()["scope"] for r in got.got] == ["org:o1", "org:o2"]
