"""Scaling the worker group out and in under load never rolls a scope back (issue 19).

Three worker processes join and leave one group (join, join, SIGTERM, SIGKILL, restart) while
usage arrives at a bounded rate. Afterwards ``spend.state`` and ``spend.decisions`` are read
from the start: no record may move a scope's spend backwards within a window, no decision may
unblock a scope over its ``total`` limit, and the final totals must be exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from tests.kafka_helpers import (
    ServiceProcess,
    eventually,
    group_offsets,
    latest,
    produce,
    read_all,
    running_services,
)

from spendgate.domain.gate_state import provenance_order
from spendgate.settings import Settings

RATE = 80  # events per second: modest, two busy cores run the broker and three workers too
KEYS = {f"k{i}": (f"u{i % 5}", f"t{i % 3}") for i in range(20)}
TEAM_ORG = {"t0": "o1", "t1": "o1", "t2": "o2"}
TOTAL_LIMITS = {"team:t0": "4", "team:t1": "10", "key:k0": "0.5", "key:k1": "1.2", "key:k2": "2.5"}
STEP_S = 3.0  # after a membership change, what must be counted: events produced this much later
STEP_TIMEOUT_S = 60.0


def scopes_of(key_id: str) -> list[str]:
    user, team = KEYS[key_id]
    return [f"key:{key_id}", f"user:{user}", f"team:{team}", f"member:{team}/{user}", f"org:{TEAM_ORG[team]}"]


class Load:
    """Produces usage at ``RATE`` until stopped; remembers what was produced (and a few retries)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.rng = random.Random(19)
        self.events: dict[str, tuple[str, Decimal]] = {}  # event_id -> (key, cost)
        self.org_usd: dict[str, Decimal] = defaultdict(Decimal)
        self.stop = asyncio.Event()

    def _next(self) -> tuple[str, bytes]:
        if self.events and self.rng.random() < 0.05:  # the gateway retries: same event_id
            event_id = self.rng.choice(list(self.events))
            key, cost = self.events[event_id]
        else:
            event_id, key = uuid.uuid4().hex, f"k{self.rng.randrange(len(KEYS))}"
            cost = Decimal(self.rng.randrange(0, 2 * 10**7)).scaleb(-9)
            self.events[event_id] = (key, cost)
            self.org_usd[TEAM_ORG[KEYS[key][1]]] += cost
        body = {
            "v": 1,
            "event_id": event_id,
            "occurred_at": datetime.now(UTC).isoformat(),
            "key_id": key,
            "cost_usd": format(cost, "f"),
        }
        return key, orjson.dumps(body)

    async def run(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            tick, started, sent = 0.05, time.monotonic(), 0
            while not self.stop.is_set():
                due = int((time.monotonic() - started) * RATE)
                futures = []
                for _ in range(min(due - sent, RATE)):  # never a burst after a stall
                    key, value = self._next()
                    futures.append(await producer.send(self.settings.topic("usage"), value, key=key.encode()))
                sent = max(due - RATE, sent + len(futures))
                await asyncio.wait_for(asyncio.gather(*futures), 30)
                await asyncio.sleep(tick)
        finally:
            await producer.stop()

    def org_snapshot(self) -> dict[str, Decimal]:
        return dict(self.org_usd)

    def expected_totals(self) -> dict[str, Decimal]:
        totals: dict[str, Decimal] = defaultdict(Decimal)
        for key, cost in self.events.values():
            for scope in scopes_of(key):
                totals[scope] += cost
        return dict(totals)


def total_of(record: dict[str, Any]) -> Decimal:
    return next(Decimal(w["spend_usd"]) for w in record["windows"] if w["window"] == "total")


async def counted_at_least(settings: Settings, floor: dict[str, Decimal]) -> None:
    state = await latest(settings, "state")
    have = {org: total_of(state[f"org:{org}"]) if f"org:{org}" in state else Decimal(0) for org in floor}
    assert all(have[org] >= usd for org, usd in floor.items()), (have, floor)


def rollbacks_in_state(records: list[tuple[str | None, Any]]) -> list[str]:
    """Every state record that shows less than the one before it for the same scope and window,
    or that reflects less usage (watermarks) than it."""
    held: dict[str, dict[str, Any]] = {}
    problems = []
    for scope, value in records:
        if scope is None or value is None:
            continue
        before = held.get(scope)
        if before is not None:
            if provenance_order(value.get("watermarks"), before.get("watermarks")) < 0:
                problems.append(f"{scope}: watermarks {before['watermarks']} -> {value['watermarks']}")
            spent = {(w["window"], w["start"]): Decimal(w["spend_usd"]) for w in before["windows"]}
            for w in value["windows"]:
                previous = spent.get((w["window"], w["start"]))
                if previous is not None and Decimal(w["spend_usd"]) < previous:
                    problems.append(
                        f"{scope} {w['window']}: {previous} -> {w['spend_usd']} (as_of {value['as_of']})"
                    )
        held[scope] = value
    return problems


def unblocks_over_limit(records: list[tuple[str | None, Any]]) -> list[str]:
    """Every decision that unblocks a scope once blocked on its ``total`` limit (never resets)."""
    blocked: dict[str, dict[str, Any]] = {}
    problems = []
    for scope, value in records:
        if scope not in TOTAL_LIMITS or value is None:
            continue
        if value["blocked"]:
            blocked[scope] = value
        elif scope in blocked:
            problems.append(f"{scope}: unblocked (seq {value['seq']}) after {blocked[scope]}")
    return problems


async def test_scaling_out_and_in_under_load_never_rolls_a_scope_back(
    settings_factory, tmp_path: Path
) -> None:
    settings = await settings_factory(database_url="")
    config: list[tuple[str | None, object]] = [
        (f"team/{t}", {"v": 1, "type": "team", "version": 1, "team_id": t, "org_id": o})
        for t, o in TEAM_ORG.items()
    ]
    config += [
        (f"key/{k}", {"v": 1, "type": "key", "version": 1, "key_id": k, "user_id": u, "team_id": t})
        for k, (u, t) in KEYS.items()
    ]
    config += [
        (
            f"budget/{scope}",
            {
                "v": 1,
                "type": "budget",
                "version": 1,
                "scope": scope,
                "tz": "UTC",
                "limits": [{"window": "total", "max_usd": usd}, {"window": "1d", "max_usd": "1000"}],
            },
        )
        for scope, usd in TOTAL_LIMITS.items()
    ]
    await produce(settings, "config", config)
    load = Load(settings)
    changes: list[tuple[str, float]] = []
    with running_services(tmp_path) as start:
        workers: dict[str, ServiceProcess] = {}

        def worker(name: str) -> None:
            workers[name] = start("worker", settings, name, SPENDGATE_STATE_INTERVAL_MS="200")

        async def step(label: str, change: Callable[[], None]) -> None:
            """Make a membership change; return once spend produced STEP_S after it is counted."""
            change()
            started = time.monotonic()
            await asyncio.sleep(STEP_S)
            floor = load.org_snapshot()
            try:
                await eventually(
                    lambda: counted_at_least(settings, floor), timeout=STEP_TIMEOUT_S, interval=0.5
                )
            except AssertionError as exc:
                raise AssertionError(f"{label}: {exc}\n{await group_offsets(settings)}") from None
            changes.append((label, time.monotonic() - started))

        producing = asyncio.create_task(load.run())
        try:
            await step("w1 starts alone", lambda: worker("w1"))
            await step("w2 joins", lambda: worker("w2"))
            await step("w3 joins", lambda: worker("w3"))
            await step("w1 SIGTERM", lambda: workers["w1"].stop())
            await step("w2 SIGKILL", lambda: workers["w2"].kill())
            await step("w4 starts", lambda: worker("w4"))
        finally:
            load.stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producing, 30)
        assert producing.done() and producing.exception() is None
        expected = load.expected_totals()

        async def all_exact() -> None:
            state = await latest(settings, "state")
            wrong = {s: (total_of(state[s]) if s in state else None, v) for s, v in expected.items()}
            wrong = {s: pair for s, pair in wrong.items() if pair[0] != pair[1]}
            assert not wrong, f"{len(wrong)} scopes differ, e.g. {list(wrong.items())[:3]}"

        try:
            await eventually(all_exact, timeout=60, interval=1.0)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{await group_offsets(settings)}") from None

    states = await read_all(settings, "state")
    decisions = await read_all(settings, "decisions")
    assert len(load.events) > 1000 and len(states) > len(expected), (len(load.events), len(states))
    assert not rollbacks_in_state(states), rollbacks_in_state(states)[:10]
    assert not unblocks_over_limit(decisions), unblocks_over_limit(decisions)[:10]
    final = {scope: value for scope, value in decisions if value is not None}
    for scope, usd in TOTAL_LIMITS.items():
        assert final[scope]["blocked"] is (expected[scope] >= Decimal(usd)), (
            scope,
            expected[scope],
            final[scope],
        )
    assert any(final[scope]["blocked"] for scope in TOTAL_LIMITS)  # the run crossed limits
    print("membership change -> spend counted again:", [(label, round(s, 1)) for label, s in changes])
