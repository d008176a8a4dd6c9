"""Compaction is real on Apache Kafka: a gate that reads the compacted topics answers like one
that saw every record, deletes (tombstones) included (``make test-kafka`` only; Tansu never
compacts, docs/BROKER-NOTES.md).

The topics get test-sized settings (segments roll after 300 ms, any dirty ratio is cleanable,
no compaction lag, tombstones kept 500 ms) so the broker's cleaner (every second in the test
cluster) really removes the overwritten and deleted records before the second gate starts.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from tests.integration.test_gate import (
    ADMIN,
    ADMIN_TOKEN,
    budget_record,
    decision_record,
    running,
    state_record,
    wait_ready,
)
from tests.kafka_helpers import eventually, produce, read_all

from spendgate.api.app import create_app
from spendgate.settings import Settings

pytestmark = pytest.mark.skipif(
    os.environ.get("SPENDGATE_TEST_KAFKA_REAL") != "1",
    reason="compaction needs real Kafka (`make test-kafka`): Tansu never compacts",
)

COMPACTED = ("config", "decisions", "state")
# AlterConfigs replaces a topic's whole config: repeat what ensure_topics set.
FAST_COMPACTION = {
    "cleanup.policy": "compact",
    "min.insync.replicas": "2",
    "segment.ms": "300",
    "min.cleanable.dirty.ratio": "0.001",
    "min.compaction.lag.ms": "0",
    "delete.retention.ms": "500",
    "file.delete.delay.ms": "0",
}
SCOPES = [f"key:c{i}" for i in range(8)]
ROUNDS = 5  # the last round (4) blocks: live scopes end blocked, budget 14, spend 4.5
FILLER = "key:zz"  # appended to roll segments; never compared


async def compact_fast(settings: Settings) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.alter_configs(
            [
                ConfigResource(ConfigResourceType.TOPIC, settings.topic(short), configs=FAST_COMPACTION)
                for short in COMPACTED
            ]
        )
    finally:
        await admin.close()


async def history(settings: Settings) -> None:
    """ROUNDS overwrites of every scope's budget, state and decision; then delete half of them."""
    for round_ in range(ROUNDS):
        await produce(settings, "config", [budget_record(s, str(10 + round_)) for s in SCOPES])
        await produce(settings, "state", [state_record(s, f"{round_}.5") for s in SCOPES])
        await produce(settings, "decisions", [decision_record(s, blocked=round_ % 2 == 0) for s in SCOPES])
    doomed = SCOPES[::2]
    await produce(settings, "config", [(f"budget/{s}", None) for s in doomed])
    await produce(settings, "decisions", [(s, None) for s in doomed])
    await produce(settings, "state", [(s, None) for s in doomed])


async def roll_segments(settings: Settings) -> None:
    """The active segment is never cleaned: append one record (a copy of a live one) after it aged."""
    await asyncio.sleep(0.6)
    await produce(settings, "config", [budget_record(FILLER, "1")])
    await produce(settings, "state", [state_record(FILLER, "0.5")])
    await produce(settings, "decisions", [decision_record(FILLER, blocked=False)])


async def answers(client: httpx.AsyncClient) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for scope in SCOPES:
        spend = (await client.get(f"/v1/spend/{scope}", headers=ADMIN)).json()
        check = (await client.post("/v1/check", json={"key_id": scope[4:]}, headers=ADMIN)).json()
        out[scope] = (spend, check["allowed"], [b["scope"] for b in check.get("blocked_by", [])])
    return out


def without_clock(view: dict[str, Any]) -> dict[str, Any]:
    """Answers minus what moves with the clock (lag, as_of) so two gates can be compared."""
    noisy = {"state_lag_ms", "as_of", "degraded", "stale"}

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in noisy}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(view)


async def test_gate_reading_compacted_topics_answers_like_one_that_saw_every_record(
    settings_factory: Any,
) -> None:
    settings = await settings_factory(database_url="", admin_token=ADMIN_TOKEN, partitions=1)
    await compact_fast(settings)
    async with running(create_app(settings)) as early:
        await wait_ready(early)
        await history(settings)
        await roll_segments(settings)
        written = ROUNDS * len(SCOPES) + len(SCOPES[::2])  # per topic, fillers aside

        async def compacted() -> None:
            await roll_segments(settings)
            for short in COMPACTED:
                left = await read_all(settings, short)
                keys = [k for k, _ in left if k is not None and not k.endswith(FILLER)]
                assert len(keys) == len(set(keys)), f"{short}: not compacted yet ({len(left)} records)"
                tombstones = [k for k, v in left if v is None]
                assert not tombstones, f"{short}: tombstones still there: {tombstones}"

        started = time.monotonic()
        await eventually(compacted, timeout=90, interval=1.0)
        after = {short: len(await read_all(settings, short)) for short in COMPACTED}
        print(f"compacted in {time.monotonic() - started:.1f}s: {written} -> {after} records")
        for short in COMPACTED:
            assert after[short] < written // 3, (short, written, after[short])

        async def early_is_current() -> dict[str, Any]:
            seen = await answers(early)
            for scope in SCOPES[::2]:  # deleted: no budget, no block, no spend
                spend, allowed, blocked_by = seen[scope]
                assert allowed and not blocked_by and not spend["blocked"], (scope, seen[scope])
                assert [w["window"] for w in spend["windows"]] == ["total"], (scope, spend)
                assert spend["windows"][0]["spend_usd"] in ("0", "0.00", "0.000000000"), spend
            for scope in SCOPES[1::2]:  # the last round: budget 14, spend 4.5, blocked
                spend, allowed, blocked_by = seen[scope]
                assert not allowed and blocked_by == [scope] and spend["blocked"], (scope, seen[scope])
                day = next(w for w in spend["windows"] if w["window"] == "1d")
                assert float(day["limit_usd"]) == 14 and float(day["spend_usd"]) == 4.5, spend
            return seen

        seen_early = await eventually(early_is_current, timeout=30, interval=0.5)
        async with running(create_app(settings)) as late:
            await wait_ready(late)
            seen_late = await answers(late)
        assert without_clock(seen_late) == without_clock(seen_early)
