"""Replay's reads of the topics: plain consumers, no group, nothing committed, nothing produced."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from aiokafka import TopicPartition

from spendgate.accounting.ingest import RawRecord
from spendgate.adapters.kafka import consumer
from spendgate.adapters.watermarks import fetch_high_watermarks
from spendgate.analysis import Rebuild
from spendgate.domain.gate_state import state_supersedes
from spendgate.domain.registry import RegistryView
from spendgate.replay.options import AsOf, UsageError
from spendgate.replay.progress import Progress
from spendgate.settings import Settings

FETCH_RECORDS = 10_000


async def read_registry(settings: Settings) -> tuple[RegistryView, int]:
    """The registry as of now: every ``spend.config`` record up to its end. Returns it and the
    number of records that could not be applied (logged, skipped)."""
    registry = RegistryView()
    rejected = 0

    def apply(key: str | None, value: Any) -> None:
        nonlocal rejected
        try:
            registry.apply(key or "", value)
        except Exception:  # noqa: BLE001 - a bad config record is skipped, as the gate does
            rejected += 1

    await _read_to_end(settings, settings.topic("config"), apply)
    return registry, rejected


async def read_latest(settings: Settings, short: str) -> dict[str, Any]:
    """Latest decoded value per key of a (compacted) topic, up to its end at start.

    For ``state``, latest as the gate sees it: a record older by provenance than the one kept
    (a late record from a worker that lost the scope) does not replace it.
    """
    latest: dict[str, Any] = {}
    ordered = short == "state"

    def keep(key: str | None, value: Any) -> None:
        if key is None:
            return
        held = latest.get(key)
        if ordered and value is not None and held is not None:
            try:
                if not state_supersedes(value, held):
                    return
            except (KeyError, TypeError, ValueError):
                pass  # a malformed record: log order, as before the field existed
        latest[key] = value

    await _read_to_end(settings, settings.topic(short), keep)
    return latest


async def _read_to_end(settings: Settings, topic: str, handler: Any) -> None:
    ends = await fetch_high_watermarks(settings.kafka_bootstrap, topic)
    client = consumer(settings, client_id="spendgate-replay")
    await client.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(ends)]
        client.assign(tps)
        await client.seek_to_beginning(*tps)
        pending = {tp for tp in tps if ends[tp.partition] > 0}
        pending = {tp for tp in pending if await client.position(tp) < ends[tp.partition]}
        while pending:
            batches = await client.getmany(*pending, timeout_ms=500, max_records=FETCH_RECORDS)
            for tp, messages in batches.items():
                for m in messages:
                    if m.offset >= ends[tp.partition]:
                        break
                    try:
                        value = None if m.value is None else orjson.loads(m.value)
                    except orjson.JSONDecodeError:
                        continue
                    handler(m.key.decode() if m.key else None, value)
            pending = {tp for tp in pending if await client.position(tp) < ends[tp.partition]}
    finally:
        await client.stop()


async def usage_targets(settings: Settings, as_of: AsOf | None) -> tuple[dict[int, int], dict[int, int]]:
    """``(start, target)`` offset per partition of ``spend.usage``: the log start, and where to stop."""
    topic = settings.topic("usage")
    ends = await fetch_high_watermarks(settings.kafka_bootstrap, topic)
    client = consumer(settings, client_id="spendgate-replay")
    await client.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(ends)]
        starts = {tp.partition: o for tp, o in (await client.beginning_offsets(tps)).items()}
    finally:
        await client.stop()
    targets = dict(ends)
    if as_of is not None and as_of.offsets is not None:
        unknown = sorted(set(as_of.offsets) - set(ends))
        if unknown:
            raise UsageError(f"--as-of: {topic} has no partition {unknown[0]} (it has {len(ends)})")
        for p, o in as_of.offsets.items():
            targets[p] = min(o, ends[p])
    return starts, {p: max(t, starts.get(p, 0)) for p, t in targets.items()}


async def read_usage(
    settings: Settings,
    state: Rebuild,
    starts: Mapping[int, int],
    targets: dict[int, int],
    progress: Progress,
    *,
    as_of_ms: int | None = None,
) -> None:
    """Feed every ``spend.usage`` record in ``[start, target)`` to ``state``, batch by batch."""
    topic = settings.topic("usage")
    client = consumer(settings, client_id="spendgate-replay", max_partition_fetch_bytes=4 * 1024 * 1024)
    await client.start()
    try:
        tps = {p: TopicPartition(topic, p) for p in sorted(targets)}
        client.assign(list(tps.values()))
        for p, tp in tps.items():
            client.seek(tp, starts.get(p, 0))
        pending = {p for p in tps if starts.get(p, 0) < targets[p]}
        while pending:
            batches = await client.getmany(
                *(tps[p] for p in pending), timeout_ms=500, max_records=FETCH_RECORDS
            )
            records: list[RawRecord] = []
            for tp, messages in batches.items():
                p = tp.partition
                for m in messages:
                    if m.offset >= targets[p]:
                        break
                    if as_of_ms is not None and m.timestamp >= as_of_ms:
                        targets[p] = m.offset  # the position of --as-of TIME in this partition
                        break
                    records.append(RawRecord(p, m.offset, m.value, m.key, m.timestamp / 1000))
            state.feed(records)
            progress.advance(len(records))
            pending = {p for p in pending if await client.position(tps[p]) < targets[p]}
    finally:
        await client.stop()
