"""Sending from a Faust worker without Faust's per-message buffer, and waiting for the acks:
``send_batches``, ``send_many``, ``flush`` (which reports what it waits for)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any, cast

import faust
import orjson
from faust.types import ChannelT, RecordMetadata

log = logging.getLogger(__name__)


def encode(topic: Any, obj: Any, serializer: Any, *, key: bool) -> bytes:
    # Faust's json codec is the stdlib's; orjson writes the same JSON (UTF-8 rather than
    # \u-escapes, which Faust's decoder reads the same) several times faster. Like the stdlib,
    # write integer dict keys as strings (the ledger records' buckets).
    if serializer in (None, "json"):
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    prepared = topic.prepare_key(obj, serializer) if key else topic.prepare_value(obj, serializer)
    return cast(bytes, prepared[0])


async def send_batches(
    app: faust.types.AppT, topic: str, partition: int, records: Sequence[tuple[bytes | None, bytes | None]]
) -> list[asyncio.Future]:
    """Produce ``(key, value)`` records to one partition as few producer batches.

    One future per batch instead of one per record: aiokafka's per-message futures and
    accumulator bookkeeping were most of the cost of a table write. Order is kept.
    """
    # Faust keeps its aiokafka producer private; batches need it (public aiokafka API).
    producer = app.producer._ensure_producer()  # type: ignore[attr-defined]
    futures: list[asyncio.Future] = []
    batch = producer.create_batch()
    pending = 0
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is None:
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"record of {len(value or b'')} bytes exceeds the producer batch size")
            pending = 0
        pending += 1
    if pending:
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


def persist_offset(store: Any, fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        meta = fut.result()
        store.set_persisted_offset(meta.topic_partition, meta.offset)


#: A flush still waiting after this long logs the producer's pending batches (and again every
#: this many seconds): which partition, its leader, the in-flight requests.
FLUSH_REPORT_AFTER_S = 15.0


async def flush(app: faust.App, futures: Iterable[asyncio.Future] = ()) -> list[Any]:
    """Send everything Faust has buffered and wait for the broker's acks.

    Waits for ``futures`` (from :func:`write_in_partition`, ``table.send_changelog`` or
    ``await channel.send(...)``) and returns their results; raises the first send error. Without
    ``futures`` it only drains the producer (aiokafka's flush never raises, so a failed send
    would go unnoticed -- pass the futures whenever durability matters). A wait longer than
    :data:`FLUSH_REPORT_AFTER_S` is logged with the producer's state (:func:`producer_report`).
    """
    waiting = asyncio.ensure_future(_flush_and_gather(app, list(futures)))
    started = time.monotonic()
    while True:
        try:
            done, _ = await asyncio.wait([waiting], timeout=FLUSH_REPORT_AFTER_S)
        except asyncio.CancelledError:
            waiting.cancel()
            raise
        if done:
            return waiting.result()
        log.warning(
            "flush: waiting %.0fs for the broker's acks; %s", time.monotonic() - started, producer_report(app)
        )


async def _flush_and_gather(app: faust.App, futures: list[asyncio.Future]) -> list[Any]:
    await app.producer.flush()
    return list(await asyncio.gather(*futures))


def producer_report(app: faust.App) -> str:
    """One line on what the worker's aiokafka producer is waiting for (best effort, no I/O)."""
    try:
        producer: Any = app.producer._producer  # type: ignore[attr-defined]
        if producer is None:
            return "no producer"
        acc, sender, client = producer._message_accumulator, producer._sender, producer.client
        now = time.monotonic()
        queued = [
            f"{tp.topic}/{tp.partition}(leader {client.cluster.leader_for_partition(tp)}, "
            f"{len(batches)} queued, oldest {now - batches[0]._ctime:.0f}s)"
            for tp, batches in acc._batches.items()
            if batches
        ]
        pending = [
            f"{b.tp.topic}/{b.tp.partition}(leader {client.cluster.leader_for_partition(b.tp)}, "
            f"age {now - b._ctime:.0f}s, tries {b.retry_count})"
            for b in acc._pending_batches
        ]
        conns = [
            f"node {node}/{group.name} {'up' if conn.connected() else 'down'} {len(conn._requests)} in flight"
            for (node, group), conn in client._conns.items()
        ]
        task = sender.sender_task
        return (
            f"queued {queued[:8]} ({len(queued)}); sent, unanswered {pending[:8]} ({len(pending)}); "
            f"in-flight nodes {sorted(sender._in_flight)}; muted {len(sender._muted_partitions)}; "
            f"sender {'done' if task is not None and task.done() else 'running'}; conns {conns}"
        )
    except Exception as exc:  # noqa: BLE001 - a diagnostic must never break the flush
        return f"(no report: {exc!r})"


async def send_many(
    channel: ChannelT,
    records: Iterable[tuple[Any, Any] | tuple[Any, Any, int | None]],
) -> list[RecordMetadata]:
    """Send ``(key, value[, partition])`` records to ``channel`` and wait for every ack.

    Records are handed to the producer in order (per partition order is kept) and awaited
    together, so the cost is about one round trip, not one per record. Raises on the first
    failed send; records sent before it may already be written (at-least-once).
    """
    pending: list[Any] = []
    for record in records:
        key, value = record[0], record[1]
        partition = record[2] if len(record) > 2 else None  # type: ignore[misc]
        pending.append(await channel.send(key=key, value=value, partition=partition, force=True))
    return list(await asyncio.gather(*pending))


# -- ownership -------------------------------------------------------------------------------
