"""5. Cold start: a fresh API to /readyz over the gate's 100k-scope topics; a restarted worker over a
ledger changelog holding many window entries (minute and quarter-hour buckets).

The worker's ledger changelog is written directly in the format the worker itself writes
(``w-{prefix}-ledger-changelog``: key = JSON string of the scope / ``scope@day``, value =
``{"t", "m": {minute: nanos}, "w": {p: offset}}`` for the hot record and
``{"q": {quarter: nanos}, "w"}`` for a day record, each in the scope's partition), because
producing a million buckets through the worker would take far longer than the time budget.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import data
from bench.common import log, summary
from bench.stack import Stack, rss_mib, wait_http
from spendgate.adapters.embedded import free_port
from spendgate.accounting.ledgers import partition_of


def api_cold_start(stack: Stack, prefix: str, reps: int) -> dict[str, Any]:
    runs = []
    for _ in range(reps):
        port = free_port()
        spawned = time.monotonic()
        api = stack.service("api", prefix, "cold-api.log", SPENDGATE_API_PORT=str(port))
        try:
            wait_http(f"http://127.0.0.1:{port}/readyz", api, 300, 0.02)
            took = time.monotonic() - spawned
            runs.append({"ready_s": took, "rss_mib": rss_mib(api.pid)})
        finally:
            stack.stop_child(api, 10)
        log(f"API cold start: ready in {took:.2f}s, rss {runs[-1]['rss_mib']:.0f} MiB")
    return {"runs": runs, "ready_s": summary([r["ready_s"] for r in runs]), "rss_mib": summary([r["rss_mib"] for r in runs])}


def ledger_records(scopes: int, buckets: int, now: float) -> tuple[list[tuple[bytes, bytes, int]], int]:
    minute_now = int(now) // 60
    day = int(now) // 86400
    quarter_now = (int(now) % 86400) // 900
    out = []
    entries = 0
    for i in range(scopes):
        scope = f"key:c{i}"
        p = partition_of(scope, 8)
        minutes = {str(minute_now - j): 1000 * (j + 1) for j in range(buckets)}
        total = sum(minutes.values())
        hot = {"t": total, "m": minutes, "w": {str(p): 0}}
        quarters = {str(max(0, quarter_now - j)): 1000 for j in range(buckets)}
        dayrec = {"q": quarters, "w": {str(p): 0}}
        out.append((orjson.dumps(scope), orjson.dumps(hot), p))
        out.append((orjson.dumps(f"{scope}@{day}"), orjson.dumps(dayrec), p))
        entries += len(minutes) + len(quarters)
    return out, entries


async def _produce_partitioned(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, int]]) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, max_batch_size=512 * 1024)
    await producer.start()
    try:
        pending = []
        for key, value, p in records:
            pending.append(await producer.send(topic, value, key=key, partition=p))
            if len(pending) >= 20000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def _wait_state(bootstrap: str, topic: str, scope: bytes, timeout_s: float) -> float:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition_of(scope.decode(), 8))
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=100)).values():
                for m in messages:
                    if m.key == scope:
                        return time.monotonic()
        raise TimeoutError(f"no state for {scope!r} in {timeout_s}s")
    finally:
        await consumer.stop()


async def worker_cold_start(stack: Stack, prefix: str, scopes: int, buckets: int, reps: int) -> dict[str, Any]:
    s = await stack.topics(prefix)
    records, entries = ledger_records(scopes, buckets, time.time())
    # the changelog topic is Faust's: let a first worker declare it, then fill it
    worker_id = f"w-{prefix.strip('.')}"
    probe_key = "cprobe"
    await data.produce(stack.bootstrap, s.topic("config"), [data.key_record(probe_key, "cu", "ct")])
    first = stack.service("worker", prefix, "cold-worker.log")
    try:
        await data.produce(stack.bootstrap, s.topic("usage"), [(probe_key.encode(), data.j(data.usage_event(probe_key, "0.01", event_id="probe-0")))])
        await _wait_state(stack.bootstrap, s.topic("state"), f"key:{probe_key}".encode(), 90)
    finally:
        stack.stop_child(first, 15)
    started = time.monotonic()
    await _produce_partitioned(stack.bootstrap, f"{worker_id}-ledger-changelog", records)
    log(f"worker cold start: {len(records):,} ledger records ({entries:,} window entries) produced in "
        f"{time.monotonic() - started:.1f}s")
    runs = []
    for r in range(reps):
        probe = f"key:{probe_key}"
        waiter = asyncio.create_task(_wait_state_after(stack, s.topic("state"), probe.encode(), 300))
        await asyncio.sleep(0.5)
        spawned = time.monotonic()
        w = stack.service("worker", prefix, "cold-worker.log")
        try:
            await asyncio.sleep(0.2)
            await data.produce(stack.bootstrap, s.topic("usage"),
                               [(probe_key.encode(), data.j(data.usage_event(probe_key, "0.01", event_id=f"probe-{r + 1}")))])
            seen = await waiter
            runs.append({"resume_s": seen - spawned, "rss_mib": rss_mib(w.pid)})
        finally:
            stack.stop_child(w, 15)
        log(f"worker cold start: resumed (new event in spend.state) {runs[-1]['resume_s']:.1f}s after spawn, "
            f"rss {runs[-1]['rss_mib']:.0f} MiB")
    return {"ledger_records": len(records), "window_entries": entries, "scopes": scopes, "runs": runs,
            "resume_s": summary([r["resume_s"] for r in runs]), "rss_mib": summary([r["rss_mib"] for r in runs])}


async def _wait_state_after(stack: Stack, topic: str, scope: bytes, timeout_s: float) -> float:
    """The time of the first record of ``scope`` appended after now."""
    from spendgate.adapters.watermarks import fetch_high_watermarks

    ends = await fetch_high_watermarks(stack.bootstrap, topic)
    p = partition_of(scope.decode(), 8)
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        tp = TopicPartition(topic, p)
        consumer.assign([tp])
        consumer.seek(tp, ends.get(p, 0))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=100)).values():
                for m in messages:
                    if m.key == scope:
                        return time.monotonic()
        raise TimeoutError(f"no new state for {scope!r} in {timeout_s}s")
    finally:
        await consumer.stop()
