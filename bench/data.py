"""Data the benchmarks load: registry/budget config records, state records, usage events."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from spendgate.adapters.watermarks import fetch_high_watermarks
from spendgate.domain.money import parse_usd

Record = tuple[bytes | None, bytes | None]


def now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def day_bounds(now: float) -> tuple[str, str]:
    start = int(now) // 86400 * 86400
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    return (datetime.fromtimestamp(start, UTC).strftime(fmt), datetime.fromtimestamp(start + 86400, UTC).strftime(fmt))


async def produce(bootstrap: str, topic: str, records: Iterable[Record], *, partition_of=None) -> int:  # noqa: ANN001
    """Produce raw records fast (acks=all, batched); returns the count."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024, max_request_size=8 * 2**20
    )
    await producer.start()
    n = 0
    try:
        pending = []
        for key, value in records:
            kw = {} if partition_of is None else {"partition": partition_of(key)}
            pending.append(await producer.send(topic, value, key=key, **kw))
            n += 1
            if len(pending) >= 20000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return n


def j(value: Any) -> bytes:
    return orjson.dumps(value)


# ---------------------------------------------------------------------------------- config


def registry_records(keys: int, teams: int, orgs: int, key_prefix: str = "k", version: int = 1) -> list[Record]:
    out: list[Record] = []
    for o in range(orgs):
        out.append((f"org/o{o}".encode(), j({"v": 1, "type": "org", "version": version, "org_id": f"o{o}"})))
    for t in range(teams):
        out.append(
            (f"team/t{t}".encode(), j({"v": 1, "type": "team", "version": version, "team_id": f"t{t}", "org_id": f"o{t % orgs}"}))
        )
    for i in range(keys):
        out.append(
            (
                f"key/{key_prefix}{i}".encode(),
                j({"v": 1, "type": "key", "version": version, "key_id": f"{key_prefix}{i}", "user_id": f"u{i}",
                   "team_id": f"t{i % teams}"}),
            )
        )
    return out


def key_record(key: str, user: str, team: str, version: int = 1) -> Record:
    return (f"key/{key}".encode(), j({"v": 1, "type": "key", "version": version, "key_id": key, "user_id": user, "team_id": team}))


def budget_record(scope: str, limits: list[dict[str, str]], version: int = 1) -> Record:
    return (
        f"budget/{scope}".encode(),
        j({"v": 1, "type": "budget", "version": version, "scope": scope, "limits": limits, "tz": "UTC"}),
    )


KEY_LIMITS = [{"window": "1d", "max_usd": "100"}, {"window": "total", "max_usd": "100000"}]
TEAM_LIMITS = [{"window": "1d", "max_usd": "10000"}, {"window": "1mo", "max_usd": "200000", "soft_usd": "150000"}]


def gate_budgets(keys: int, teams: int) -> list[Record]:
    out = [budget_record(f"key:k{i}", KEY_LIMITS) for i in range(keys)]
    out += [budget_record(f"team:t{t}", TEAM_LIMITS) for t in range(teams)]
    return out


def state_records(keys: int, teams: int, now: float) -> list[Record]:
    """What the worker would have emitted: every budgeted scope with spend under its limits."""
    start, resets = day_bounds(now)
    as_of = now_iso()
    out: list[Record] = []
    for i in range(keys):
        scope = f"key:k{i}"
        out.append((scope.encode(), j({"v": 1, "scope": scope, "as_of": as_of, "source": {"partition": 0, "offset": i},
                                       "windows": [{"window": "1d", "start": start, "resets_at": resets,
                                                    "spend_usd": f"{i % 90}.125"},
                                                   {"window": "total", "start": None, "resets_at": None,
                                                    "spend_usd": f"{i % 900}.5"}]})))
    for t in range(teams):
        scope = f"team:t{t}"
        out.append((scope.encode(), j({"v": 1, "scope": scope, "as_of": as_of, "source": {"partition": 0, "offset": t},
                                       "windows": [{"window": "1d", "start": start, "resets_at": resets,
                                                    "spend_usd": f"{t % 9000}.25"},
                                                   {"window": "total", "start": None, "resets_at": None,
                                                    "spend_usd": f"{t % 90000}.5"}]})))
    return out


# ---------------------------------------------------------------------------------- events


def usage_event(key: str, cost: str, *, model: str | None = "m1", event_id: str | None = None,
                occurred_at: str | None = None) -> dict[str, Any]:
    ev: dict[str, Any] = {"v": 1, "event_id": event_id or uuid.uuid4().hex, "kind": "cost",
                          "occurred_at": occurred_at or now_iso(), "key_id": key, "cost_usd": cost}
    if model:
        ev["model"] = model
    return ev


def usage_records(n: int, keys: int, key_prefix: str = "k", seed: int = 1) -> tuple[list[Record], int]:
    """``n`` events over ``keys`` keys; returns the records and the sum of their costs in nanos."""
    import random

    rng = random.Random(seed)
    at = now_iso()
    out: list[Record] = []
    total = 0
    for i in range(n):
        k = f"{key_prefix}{rng.randrange(keys)}"
        micros = rng.randrange(1, 50_000)
        total += micros * 1000
        cost = f"0.{micros:06d}"
        ev = {"v": 1, "event_id": f"e{seed}-{i}", "kind": "cost", "occurred_at": at, "key_id": k,
              "model": f"m{rng.randrange(20)}", "end_user_id": f"eu{rng.randrange(1000)}", "cost_usd": cost,
              "tokens": {"input": 800, "output": 100}}
        out.append((k.encode(), j(ev)))
    return out, total


def nanos_of(text: str) -> int:
    return parse_usd(text)


async def read_topic(bootstrap: str, topic: str) -> list[tuple[bytes | None, bytes | None]]:
    ends = await fetch_high_watermarks(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100)
    await consumer.start()
    out: list[tuple[bytes | None, bytes | None]] = []
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while any([await consumer.position(tp) < ends[tp.partition] for tp in tps]):
            for messages in (await consumer.getmany(timeout_ms=200, max_records=10000)).values():
                out.extend((m.key, m.value) for m in messages)
    finally:
        await consumer.stop()
    return out
