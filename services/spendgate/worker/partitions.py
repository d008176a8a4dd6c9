"""Faust tables, one partition at a time: which partitions this worker owns, reads and writes
in an explicit partition, a ``take_events`` batch split by partition."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import faust
from faust.streams import _current_event
from faust.tables.base import Collection
from faust.types import ChannelT, EventT

from spendgate.worker.sends import encode, persist_offset, send_batches

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Message:
    topic: str
    partition: int


class _PartitionEvent:
    """Stand-in for an event of ``topic``/``partition`` (only ``.message`` is read)."""

    __slots__ = ("message", "__weakref__")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = _Message(topic, partition)


@contextlib.contextmanager
def in_partition(table: Collection, where: EventT | int) -> Iterator[None]:
    """Make table writes and reads inside the block use one partition.

    ``where`` is an event of the source partition (preferred: Faust then also checks that the
    source topic and the changelog have the same partition count) or a partition number.
    Faust picks a table write's changelog partition, and RocksDB's per-partition database for
    ``table.data[k] = v`` and for ``table.data.get(k)`` / ``k in table.data``, from the
    contextvar behind ``faust.current_event()``, which a batch from ``stream.take_events()``
    does not set per event (a stale event of another partition may be current: a RocksDB read
    then looks in the wrong database and misses). This sets it for the block and restores it
    afterwards. Does not block; nothing is awaited.
    """
    if isinstance(where, int):
        event: Any = _PartitionEvent(table.changelog_topic.get_topic_name(), where)
    else:
        event = where
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


async def write_in_partition(
    table: Collection, where: EventT | int, items: Iterable[tuple[Any, Any]]
) -> list[asyncio.Future]:
    """Set (value) or delete (value ``None``) table keys; changelog records go to one partition.

    The store is updated at once; the changelog records are handed straight to the producer
    (not through Faust's per-message send buffer, which made a table write ~15x dearer than a
    plain aiokafka send). Returns their send futures (``RecordMetadata`` on broker ack, raise
    on failure): pass them to :func:`flush` when the writes must be durable before you go on.
    Deleting a missing key is a no-op (no tombstone). Awaits only the producer's enqueue.

    Do not mix with ``table[k] = v`` on the same table: those records travel through Faust's
    buffer and could reach the changelog after newer ones written here. Not for windowed
    tables (their key TTL bookkeeping is skipped).
    """
    partition = where if isinstance(where, int) else where.message.partition
    store = table.data
    topic = table.changelog_topic
    records: list[tuple[bytes, bytes | None]] = []
    # RocksDB (rocks_store.Store): mark the partition dirty until the changelog has it all.
    guarded = hasattr(store, "begin_write")
    if guarded:
        store.begin_write(partition)
    with in_partition(table, where):
        for key, value in items:
            key_bytes = encode(topic, key, table.key_serializer, key=True)
            if value is None:
                if key not in store:
                    continue
                del store[key]
                records.append((key_bytes, None))
            else:
                store[key] = value
                records.append((key_bytes, encode(topic, value, table.value_serializer, key=False)))
    futures = await send_batches(table.app, topic.get_topic_name(), partition, records)
    if guarded:
        store.end_write(partition, futures)  # stores the offsets, then clears the mark
    else:
        for fut in futures:
            # what Faust's own changelog callback does: lets a store remember how far it is
            fut.add_done_callback(partial(persist_offset, store))
    return futures


def get_in_partition(table: Collection, where: EventT | int, key: Any, default: Any = None) -> Any:
    """``table.data.get(key, default)`` from the store of partition ``where`` (event or number).

    Use for every single-key read: with RocksDB the key is looked up in that partition's
    database only (see :func:`in_partition` for why the current event can't be trusted).
    The partition must be the one the key is written to. The memory store keeps one dict for
    every partition, so it is read directly: stage B reads a table key for every scope it has
    not loaded yet, and setting the partition cost more than the read.
    """
    store = table.data
    if not hasattr(store, "items_in_partition"):  # the memory store (rocks_store.Store has it)
        return store.data.get(key, default)
    with in_partition(table, where):
        return store.get(key, default)


def items_in_partition(table: Collection, partition: int) -> Iterator[tuple[Any, Any]]:
    """``(key, value)`` pairs of ``partition``'s store; **every** item for the memory store.

    The memory store does not know the partition of keys written live (FAUST-NOTES.md), so
    callers filter by key (e.g. a ``f"{partition}/"`` prefix) either way. With RocksDB only
    that partition's database is read.
    """
    store: Any = table.data
    if hasattr(store, "items_in_partition"):
        return cast(Iterator[tuple[Any, Any]], store.items_in_partition(partition))
    return iter(store.items())


def assigned_partitions(app: faust.App, topic: str | ChannelT) -> set[int]:
    """Partitions of ``topic`` (a source topic or a changelog topic) this worker owns.

    From Faust's assignor: reflects the last completed rebalance and is empty before the
    first one. Use :func:`partitions_ready` before writing from outside an agent.
    """
    name = topic if isinstance(topic, str) else topic.get_topic_name()
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == name}


def partitions_ready(app: faust.App, topic: str | ChannelT) -> set[int]:
    """Like :func:`assigned_partitions`, but empty while a rebalance or recovery is running."""
    if app.rebalancing or getattr(app, "in_recovery", False):
        return set()
    return assigned_partitions(app, topic)


def group_by_partition(events: Sequence[EventT]) -> dict[int, list[EventT]]:
    """Split a ``take_events`` batch by source partition, keeping offset order in each."""
    groups: dict[int, list[EventT]] = {}
    for event in events:
        groups.setdefault(event.message.partition, []).append(event)
    return groups
