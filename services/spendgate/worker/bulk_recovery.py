"""Table recovery reads the changelogs in bulk before Faust's own, record-by-record, recovery.

Why: Faust's recovery (``faust.tables.recovery.Recovery._slurp_changelogs``) hands every changelog
record through the consumer thread, the conductor, a queue and the recovery loop, which
recomputes the remaining count of every partition per record: 200-350 us of CPU per record on
this box, so a worker restarting over a 100,000-record ledger changelog spent 20-35 s there
before it counted anything (bench ``cold``).

What: :func:`install` wraps ``Recovery._build_offsets``, the step after the high watermarks are
known and before Faust seeks its changelog partitions. For each active changelog partition
still behind its high watermark it reads the records with a plain aiokafka consumer (no
group, whole fetches), turns each into the event Faust's recovery would have built (the
consumer's ``_to_message``, the changelog topic's ``decode``) and applies them with the table's
own ``apply_changelog_batch`` a fetch at a time, moving Faust's start offset
(``active_offsets``) past them in the same synchronous step. Faust then reads only what is left,
normally nothing, the usual way. The store, the offsets and the ordering are exactly those of
Faust's recovery; only the per-record path is skipped.

Whatever this step does not read, Faust's recovery still does: it stops at a new rebalance
(the generation changed: it was cancelled or applies nothing more), after :data:`BUDGET_SHARE`
of the step's timeout (a hard deadline, broker calls included: the step must not time out),
after :data:`EMPTY_FETCHES` empty fetches in a row, or on a Kafka error. Left out: tables with
an ``on_changelog_event`` callback (it would not be called) and transactional apps (their
recovery reads committed records only).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Set
from dataclasses import dataclass
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from faust.tables.recovery import Recovery
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth, server_list
from faust.types import TP, EventT

__all__ = ["install", "installed", "read_in_bulk"]

log = logging.getLogger(__name__)

#: Records handed to a table per apply (and fetched per ``getmany``).
CHUNK = 5000
#: Share of the recovery step's timeout (``broker_request_timeout``) the bulk read may use.
BUDGET_SHARE = 0.5
#: Consecutive empty fetches after which the rest is left to Faust.
EMPTY_FETCHES = 5

_ORIGINAL_BUILD_OFFSETS = Recovery._build_offsets


async def read_in_bulk(recovery: Recovery, tps: Set[TP]) -> int:
    """Apply the changelog records of ``tps`` up to their high watermarks (module docstring);
    returns how many were applied."""
    app = recovery.app
    offsets, highwaters = recovery.active_offsets, recovery.active_highwaters
    behind = {
        tp
        for tp in tps
        if cast(Any, recovery.tp_to_table[tp])._on_changelog_event is None
        and highwaters.get(tp) is not None
        and _at(offsets, tp) < highwaters[tp]
    }
    if not behind or app.in_transaction:
        return 0
    started, read = time.monotonic(), _Read(app.consumer_generation_id)
    consumer = _consumer(app)
    try:
        async with asyncio.timeout(BUDGET_SHARE * app.conf.broker_request_timeout):
            await consumer.start()
            await _seek(consumer, {tp: offsets.get(tp) for tp in behind})
            await _apply_fetches(recovery, consumer, behind, read)
    except (KafkaError, TimeoutError) as exc:  # what was applied stands; Faust's recovery reads the rest
        log.warning("bulk changelog read stopped after %d records: %r", read.applied, exc)
    finally:
        await consumer.stop()
    log.info("recovery read %d changelog records in bulk in %.2fs", read.applied, time.monotonic() - started)
    return read.applied


@dataclass
class _Read:
    generation: int  # the group generation the read is for
    applied: int = 0


async def _apply_fetches(
    recovery: Recovery, consumer: AIOKafkaConsumer, behind: set[TP], read: _Read
) -> None:
    """Fetch and apply until every partition reached its high watermark, a new generation
    began, or :data:`EMPTY_FETCHES` fetches in a row brought nothing."""
    offsets, highwaters = recovery.active_offsets, recovery.active_highwaters
    empty = 0
    while behind and empty < EMPTY_FETCHES:
        fetched = await consumer.getmany(*_aio(behind), timeout_ms=200, max_records=CHUNK)
        empty = 0 if fetched else empty + 1
        events = {TP(tp.topic, tp.partition): records for tp, records in fetched.items()}
        decoded = {tp: [await _event(recovery, tp, r) for r in rs] for tp, rs in events.items()}
        if recovery.app.consumer_generation_id != read.generation:
            return  # a rebalance began: its own recovery starts from the store's offsets
        for tp, batch in decoded.items():  # no await: applied and accounted for together
            recovery.tp_to_table[tp].apply_changelog_batch(batch)
            offsets[tp] = max(_at(offsets, tp), batch[-1].message.offset)
            read.applied += len(batch)
        behind = {tp for tp in behind if _at(offsets, tp) < highwaters[tp]}


def _at(offsets: Any, tp: TP) -> int:
    """Faust's start offset of ``tp``: the last offset applied, -1 for none (``None``)."""
    offset = offsets.get(tp)
    return -1 if offset is None else int(offset)


def _aio(tps: Set[TP]) -> list[TopicPartition]:
    return [TopicPartition(tp.topic, tp.partition) for tp in tps]


def _consumer(app: Any) -> AIOKafkaConsumer:
    """A group-less consumer with the app's brokers and credentials."""
    conf = app.conf
    return AIOKafkaConsumer(
        bootstrap_servers=server_list(app.transport.url, app.transport.default_port),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=100,  # Tansu answers a Fetch with max_wait 0 with nothing
        max_partition_fetch_bytes=conf.consumer_max_fetch_size,
        request_timeout_ms=int(conf.broker_request_timeout * 1000),
        client_id=f"{conf.broker_client_id}-recovery",
        **credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context),
    )


async def _seek(consumer: AIOKafkaConsumer, start_after: dict[TP, int | None]) -> None:
    """Assign the partitions; each starts after its offset, or at its first record."""
    consumer.assign(_aio(set(start_after)))
    fresh = [TopicPartition(tp.topic, tp.partition) for tp, offset in start_after.items() if offset is None]
    if fresh:
        await consumer.seek_to_beginning(*fresh)
    for tp, offset in start_after.items():
        if offset is not None:
            consumer.seek(TopicPartition(tp.topic, tp.partition), offset + 1)


async def _event(recovery: Recovery, tp: TP, record: Any) -> EventT:
    """The event Faust's recovery builds from this record (same message, same decoding)."""
    message = cast(Any, recovery.app.consumer)._to_message(tp, record)  # aiokafka record -> Faust's
    return await recovery.tp_to_table[tp].changelog_topic.decode(message, propagate=True)


async def _build_offsets(self: Recovery, consumer: Any, tps: set[TP], destination: Any, title: str) -> None:
    if title == "active" and destination is self.active_offsets:
        await read_in_bulk(self, tps)
    await _ORIGINAL_BUILD_OFFSETS(self, consumer, tps, destination, title)


def install() -> None:
    """Patch Faust's recovery (process-wide) to read changelogs in bulk first. Idempotent."""
    Recovery._build_offsets = _build_offsets  # type: ignore[method-assign]


def installed() -> bool:
    return Recovery._build_offsets is _build_offsets
