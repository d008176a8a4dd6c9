"""The accounting worker against the real broker: exact sums, exactly once, decisions, DLQ."""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from tests.kafka_helpers import (
    ServiceProcess,
    assert_consumed,
    eventually,
    group_offsets,
    latest,
    produce,
    read_all,
    running_services,
)

from spendgate.settings import Settings


def event(key_id: str, cost: str, **fields: object) -> dict[str, object]:
    return {
        "v": 1,
        "event_id": fields.pop("event_id", None) or uuid.uuid4().hex,
        "occurred_at": fields.pop("occurred_at", datetime.now(UTC).isoformat()),  # now, not at import
        "key_id": key_id,
        "cost_usd": cost,
        **fields,
    }


def random_cost(rng: random.Random) -> str:
    return format(Decimal(rng.randrange(0, 10**10)).scaleb(-9), "f")  # plain text, never "5E-9"


def expected_scopes(
    ev: dict[str, object], keys: dict[str, tuple[str, str]], team_org: dict[str, str]
) -> set[str]:
    """The CONTRACT §1 table, written out independently of the worker's code."""
    key_id = str(ev["key_id"])
    user, team = keys.get(key_id, (ev.get("user_id"), ev.get("team_id")))
    org = (team_org.get(str(team)) if team else None) or ev.get("org_id")
    scopes = {f"key:{key_id}"}
    if user:
        scopes.add(f"user:{user}")
    if team:
        scopes.add(f"team:{team}")
    if user and team:
        scopes.add(f"member:{team}/{user}")
    if org:
        scopes.add(f"org:{org}")
    if ev.get("end_user_id"):
        scopes.add(f"end_user:{ev['end_user_id']}")
    if ev.get("model"):
        model = str(ev["model"]).replace("/", "%2F")
        scopes |= {f"model:{model}", f"key_model:{key_id}/{model}"}
    for tag in ev.get("tags") or []:  # type: ignore[attr-defined]
        scopes.add(f"tag:{tag}")
    return scopes


async def register(settings: Settings, keys: dict[str, tuple[str, str]], team_org: dict[str, str]) -> None:
    records: list[tuple[str | None, object]] = []
    for team, org in team_org.items():
        records.append(
            (f"team/{team}", {"v": 1, "type": "team", "version": 1, "team_id": team, "org_id": org})
        )
    for key, (user, team) in keys.items():
        records.append(
            (
                f"key/{key}",
                {"v": 1, "type": "key", "version": 1, "key_id": key, "user_id": user, "team_id": team},
            )
        )
    await produce(settings, "config", records)


def totals_from_state(state: dict[str, dict]) -> dict[str, Decimal]:
    out = {}
    for scope, record in state.items():
        for window in record["windows"]:
            if window["window"] == "total":
                out[scope] = Decimal(window["spend_usd"])
    return out


@pytest.fixture
def worker_factory(tmp_path: Path):
    with running_services(tmp_path) as start:

        def make(settings: Settings, name: str = "worker") -> ServiceProcess:
            return start("worker", settings, name)

        yield make


def make_events(rng: random.Random, n: int) -> list[dict[str, object]]:
    events = []
    for _ in range(n):
        fields: dict[str, object] = {}
        if rng.random() < 0.7:
            fields["end_user_id"] = f"eu{rng.randrange(20)}"
        if rng.random() < 0.8:
            fields["model"] = rng.choice(["openai/gpt-4o", "anthropic/claude", "local"])
        if rng.random() < 0.5:
            fields["tags"] = rng.sample(["prod", "batch", "eval"], rng.randrange(1, 3))
        key = f"k{rng.randrange(30)}"
        if key in ("k28", "k29"):  # unregistered keys: attribution from the event's own fields
            fields.update(user_id="u-free", team_id="t-free", org_id="o-free")
        events.append(event(key, random_cost(rng), **fields))
    return events


KEYS = {f"k{i}": (f"u{i % 7}", f"t{i % 3}") for i in range(28)}
TEAM_ORG = {"t0": "o1", "t1": "o1", "t2": "o2"}


def expected_totals(events: list[dict[str, object]]) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for ev in events:
        for scope in expected_scopes(ev, KEYS, TEAM_ORG):
            totals[scope] += Decimal(str(ev["cost_usd"]))
    return dict(totals)


async def test_events_fan_out_to_every_scope_with_exact_sums_and_garbage_goes_to_dlq(
    settings_factory, worker_factory
) -> None:
    settings = await settings_factory(database_url="")
    rng = random.Random(7)
    await register(settings, KEYS, TEAM_ORG)
    events = make_events(rng, 3000)
    garbage: list[tuple[str | None, object]] = [
        ("k1", b"not json"),
        ("k1", event("k1", "-1")),
        ("k1", event("k1", "1e400")),
        ("k1", {**event("k1", "1"), "occurred_at": "yesterday"}),
        ("k1", event("k1", "1000000.000000001")),
        ("k1", event("k1", "0.0000000001")),
    ]
    records: list[tuple[str | None, object]] = [(str(e["key_id"]), e) for e in events]
    records[1500:1500] = garbage
    worker = worker_factory(settings)
    await produce(settings, "usage", records)
    expected = expected_totals(events)

    async def all_exact() -> None:
        totals = totals_from_state(await latest(settings, "state"))
        missing = {s: v for s, v in expected.items() if totals.get(s) != v}
        assert not missing, f"{len(missing)} scopes differ, e.g. {list(missing.items())[:3]}\n{worker.log()}"

    await eventually(all_exact, timeout=60)
    assert {"model:openai%2Fgpt-4o", "org:o1", "member:t0/u0", "tag:prod", "org:o-free"} <= set(expected)

    dlq = [value for _, value in await read_all(settings, "usage.dlq")]
    assert len(dlq) == len(garbage)
    reasons = " | ".join(d["error"] for d in dlq)
    assert "invalid JSON" in reasons and "negative" in reasons and "decimal places" in reasons
    assert all(d["topic"] == settings.topic("usage") and "offset" in d for d in dlq)


async def test_redelivery_and_sigkill_restarts_never_double_count(settings_factory, worker_factory) -> None:
    settings = await settings_factory(database_url="")
    rng = random.Random(11)
    await register(settings, KEYS, TEAM_ORG)
    events = make_events(rng, 4000)
    expected = expected_totals(events)
    worker = worker_factory(settings, "w1")
    chunks = [events[i : i + 500] for i in range(0, len(events), 500)]
    for i, chunk in enumerate(chunks):
        await produce(settings, "usage", [(str(e["key_id"]), e) for e in chunk])
        if i % 3 == 1:  # SIGKILL mid-stream, then restart from the last committed offset
            await eventually(lambda: _any_state(settings), timeout=30)
            worker.kill()
            worker = worker_factory(settings, f"w{i}")
    # The gateway retries everything once more: nothing may change.
    await produce(settings, "usage", [(str(e["key_id"]), e) for e in events])

    async def all_exact() -> None:
        totals = totals_from_state(await latest(settings, "state"))
        wrong = {s: (totals.get(s), v) for s, v in expected.items() if totals.get(s) != v}
        assert not wrong, f"{len(wrong)} differ, e.g. {list(wrong.items())[:3]}\n{worker.log()}"

    await eventually(all_exact, timeout=90)


async def _any_state(settings: Settings) -> None:
    assert await latest(settings, "state")


async def test_multi_window_budget_blocks_on_first_window_crossed_and_reset_unblocks(
    settings_factory, worker_factory
) -> None:
    settings = await settings_factory(database_url="")
    worker_factory(settings)
    scope = "key:kb"
    await produce(
        settings,
        "config",
        [
            (
                f"budget/{scope}",
                {
                    "v": 1,
                    "type": "budget",
                    "version": 1,
                    "scope": scope,
                    "tz": "UTC",
                    "limits": [
                        {"window": "1m", "max_usd": "1"},
                        {"window": "1mo", "max_usd": "500"},
                        {"window": "total", "max_usd": "5000"},
                    ],
                },
            )
        ],
    )
    now = datetime.now(UTC)
    if now.second > 45:  # keep the whole test inside one minute window
        await _sleep_until(now.replace(second=0, microsecond=0) + timedelta(minutes=1, seconds=1))
    await produce(
        settings, "usage", [("kb", event("kb", "0.6", occurred_at=datetime.now(UTC).isoformat()))] * 1
    )
    await produce(settings, "usage", [("kb", event("kb", "0.4", occurred_at=datetime.now(UTC).isoformat()))])

    async def blocked() -> dict:
        decision = (await latest(settings, "decisions")).get(scope)
        assert decision and decision["blocked"] is True, decision
        return decision

    decision = await eventually(blocked, timeout=30)
    assert [w["window"] for w in decision["windows"]] == ["1m"]
    assert decision["windows"][0]["spend_usd"] == "1" and decision["windows"][0]["limit_usd"] == "1"
    resets_at = datetime.fromisoformat(decision["windows"][0]["resets_at"])
    assert resets_at.second == 0 and resets_at - datetime.now(UTC) <= timedelta(minutes=1)
    assert decision["source"]["offset"] >= 0

    async def unblocked() -> None:
        decision = (await latest(settings, "decisions")).get(scope)
        assert decision and decision["blocked"] is False and decision["windows"] == []

    await eventually(unblocked, timeout=75)  # no new event: the timer unblocks at the reset
    alerts = [v["kind"] for k, v in await read_all(settings, "alerts") if k == scope]
    assert alerts[:1] == ["blocked"] and "unblocked" in alerts


async def _sleep_until(moment: datetime) -> None:
    import asyncio

    await asyncio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()))


async def test_two_workers_give_the_same_totals_as_one(settings_factory, worker_factory) -> None:
    settings = await settings_factory(database_url="")
    rng = random.Random(3)
    await register(settings, KEYS, TEAM_ORG)
    events = make_events(rng, 2000)
    worker_factory(settings, "a")
    worker_factory(settings, "b")
    await produce(settings, "usage", [(str(e["key_id"]), e) for e in events])
    expected = expected_totals(events)

    async def all_exact() -> None:
        totals = totals_from_state(await latest(settings, "state"))
        wrong = {s: (totals.get(s), v) for s, v in expected.items() if totals.get(s) != v}
        assert not wrong, f"{len(wrong)} scopes differ, e.g. {list(wrong.items())[:3]}"

    try:
        await eventually(all_exact, timeout=90)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await group_offsets(settings)}") from None


async def test_a_new_owner_publishes_the_state_of_every_scope_it_takes_over(
    settings_factory, tmp_path: Path
) -> None:
    """A worker that counted events (ledger writes acked) but had not published their state yet
    -- its state timer does not run during a rebalance, a SIGKILL stops it -- leaves them to the
    next owner, which must publish them even if no new event ever comes for these scopes.

    The first worker's state timer is 10 minutes here, so it publishes nothing; the second one
    takes every partition over with nothing left to consume."""
    settings = await settings_factory(database_url="")
    await register(settings, KEYS, TEAM_ORG)
    events = make_events(random.Random(5), 300)
    expected = expected_totals(events)
    with running_services(tmp_path) as start:
        first = start("worker", settings, "first", SPENDGATE_STATE_INTERVAL_MS="600000")
        await produce(settings, "usage", [(str(e["key_id"]), e) for e in events])
        await eventually(lambda: assert_consumed(settings), timeout=90, interval=1.0)
        assert not await latest(settings, "state"), "the first worker published state (timer not slow?)"
        first.stop()
        start("worker", settings, "second")

        async def all_exact() -> None:
            totals = totals_from_state(await latest(settings, "state"))
            wrong = {s: (totals.get(s), v) for s, v in expected.items() if totals.get(s) != v}
            assert not wrong, f"{len(wrong)} of {len(expected)} scopes differ, e.g. {list(wrong.items())[:3]}"

        await eventually(all_exact, timeout=90)


def budget_record(scope: str, version: int, limits: list[dict[str, str]] | None) -> tuple[str, object]:
    return (
        f"budget/{scope}",
        {"v": 1, "type": "budget", "version": version, "scope": scope, "tz": "UTC", "limits": limits},
    )


async def test_budget_changes_decide_at_once_on_spend_already_made(settings_factory, worker_factory) -> None:
    """A budget set mid-window sees earlier spend; raising or removing it unblocks, no event needed."""
    settings = await settings_factory(database_url="")
    worker_factory(settings)
    scope = "team:tb"
    await produce(
        settings, "usage", [("kx", event("kx", "3", team_id="tb")), ("ky", event("ky", "2", team_id="tb"))]
    )

    async def spent() -> None:
        assert totals_from_state(await latest(settings, "state")).get(scope) == Decimal("5")

    await eventually(spent)

    async def decision_is(blocked: bool) -> dict:
        decision = (await latest(settings, "decisions")).get(scope)
        assert decision is not None and decision["blocked"] is blocked, decision
        return decision

    await produce(settings, "config", [budget_record(scope, 1, [{"window": "1d", "max_usd": "5"}])])
    blocked = await eventually(lambda: decision_is(True), timeout=10)
    assert blocked["windows"][0]["spend_usd"] == "5" and blocked["windows"][0]["limit_usd"] == "5"
    assert blocked["source"] is not None  # provenance even when a config change caused it

    await produce(settings, "config", [budget_record(scope, 2, [{"window": "1d", "max_usd": "5.01"}])])
    await eventually(lambda: decision_is(False), timeout=10)

    await produce(settings, "config", [budget_record(scope, 3, [{"window": "1d", "max_usd": "0"}])])
    await eventually(lambda: decision_is(True), timeout=10)  # a limit of 0 blocks

    await produce(settings, "config", [(f"budget/{scope}", None)])
    await eventually(lambda: decision_is(False), timeout=10)
    assert totals_from_state(await latest(settings, "state")).get(scope) == Decimal("5")  # spend untouched


async def test_malformed_config_records_are_skipped_and_never_stop_the_worker(
    settings_factory, worker_factory
) -> None:
    """A poison record on spend.config (at start and while running) must not stop accounting."""
    settings = await settings_factory(database_url="")
    scope = "key:kp"
    poison: list[tuple[str | None, object]] = [
        ("budget/key:kp", b"{not json"),
        ("key/kp", {"v": 1, "type": "key", "version": 99}),  # no key_id, high version
        ("team/tq", [1, 2, 3]),  # not an object
        budget_record(scope, 50, [{"window": "1x", "max_usd": "1"}]),  # bad window, high version
    ]
    await produce(settings, "config", poison)  # present at start: the catch-up must get past it
    worker_factory(settings)
    await produce(settings, "config", [budget_record(scope, 1, [{"window": "1d", "max_usd": "2"}])])
    await produce(settings, "usage", [("kp", event("kp", "1.5")), ("kp", event("kp", "0.5"))])

    async def blocked() -> None:
        decision = (await latest(settings, "decisions")).get(scope)
        assert decision is not None and decision["blocked"] is True, decision

    await eventually(blocked, timeout=30)
    await produce(settings, "config", poison)  # and while running
    await produce(settings, "config", [budget_record(scope, 2, [{"window": "1d", "max_usd": "3"}])])

    async def unblocked() -> None:
        decision = (await latest(settings, "decisions")).get(scope)
        assert decision is not None and decision["blocked"] is False, decision

    await eventually(unblocked, timeout=10)
    assert totals_from_state(await latest(settings, "state")).get(scope) == Decimal("2")


async def test_worker_serves_metrics_and_a_killed_worker_is_processing_again_within_seconds(
    settings_factory, worker_factory
) -> None:
    import time

    import httpx

    from spendgate.adapters.embedded import free_port

    port = free_port()
    settings = await settings_factory(database_url="", worker_web_port=port)
    worker = worker_factory(settings)
    first = event("km", "1")
    await produce(settings, "usage", [("km", first), ("km", first), ("km", b"garbage")])

    async def counted(expected: str) -> None:
        assert totals_from_state(await latest(settings, "state")).get("key:km") == Decimal(expected)

    await eventually(lambda: counted("1"))

    async def scraped() -> str:
        try:
            async with httpx.AsyncClient() as client:
                text = (await client.get(f"http://127.0.0.1:{port}/metrics", timeout=2)).text
        except httpx.HTTPError as exc:
            raise AssertionError(f"worker web not up yet: {exc!r}") from exc
        assert "spendgate_worker_events_total 1.0" in text
        return text

    text = await eventually(scraped, timeout=10)
    assert "spendgate_worker_duplicates_total 1.0" in text
    assert 'spendgate_worker_dead_letters_total{reason="invalid JSON"} 1.0' in text
    assert "spendgate_worker_consumer_lag" in text

    worker.kill()
    # Events that wait for the restarted worker are fetched while Faust seeks to the committed
    # offsets: without recovery_fix's seek fix most runs lost them (see recovery_fix, part 2).
    waiting = [(f"kw{i}", event(f"kw{i}", "0.5")) for i in range(8)] + [("km", event("km", "2"))]
    await produce(settings, "usage", waiting)
    restarted_at = time.monotonic()
    worker_factory(settings, "restarted")

    async def all_counted() -> None:
        totals = totals_from_state(await latest(settings, "state"))
        assert totals.get("key:km") == Decimal("3")
        assert {k: v for k, v in totals.items() if k.startswith("key:kw")} == {
            f"key:kw{i}": Decimal("0.5") for i in range(8)
        }

    await eventually(all_counted, timeout=60)
    # Faust's defaults made a restarted worker wait ~31 s to rejoin on the embedded broker;
    # tuned, it takes ~5 s here (the bound leaves room for a loaded CI machine).
    assert time.monotonic() - restarted_at < 20
    await produce(settings, "usage", [("km", event("km", "4"))])
    await eventually(lambda: counted("7"), timeout=20)
