"""Two fixes to Faust's recovery, installed together by :func:`install`.

1. Recovery waits for the true high watermark
---------------------------------------------

Why: Faust decides that a table is recovered when its changelog position reaches
``consumer.highwaters()`` (``faust.tables.recovery.Recovery._build_highwaters``), which the
aiokafka driver answers with ListOffsets (``AIOKafkaConsumerThread._highwaters`` ->
``AIOKafkaConsumer.end_offsets``). The embedded Tansu broker answers ListOffsets with the
*base offset of the last batch + 1*, so when the last changelog batch holds several records
the restarted worker stops reading early and silently drops them (100 restored as 99.99).

What: :func:`install` replaces ``AIOKafkaConsumerThread._highwaters`` with a version that
asks for the listed end offset as before, then sends one Fetch request at
``max(0, listed - 1)`` per partition leader and takes ``max(listed, high_watermark)`` from the
Fetch response. On Apache Kafka both numbers are equal, so the patch changes nothing there;
if a Fetch fails (leader moved, offset out of range after retention) the listed value is
kept, i.e. the behaviour falls back to stock Faust.

The Fetch is sent through the consumer's own client, so the consumer's positions, fetcher
and group membership are untouched. Only the transactional path (``exactly_once``, which
Tansu does not support) is left alone.

2. No record is lost between the seek to committed offsets and the resume of the flow
--------------------------------------------------------------------------------------

Why: after a rebalance, ``Recovery`` resumes the stream partitions, then seeks them to their
committed offsets (``Consumer.perform_seek``, one OffsetFetch per partition), and only then
calls ``app.flow_control.resume()``, which *clears every stream queue*. The flow is already
running during the seek (recovery resumed it to read the changelogs), so a record fetched
after the seek but queued before the resume is thrown away, and because the seek is already
done nothing fetches it again: the event is never processed, and a later offset's ack
commits past it. Seen here as a restarted worker ignoring the events that waited for it
(faust-streaming 0.15.3, same code on Apache Kafka).

What: :func:`install` wraps ``Consumer.perform_seek`` so that it first stops the flow
(``app.flow_control.suspend()`` + ``consumer.stop_flow()``): nothing is fetched or queued
while positions move, and every caller of ``perform_seek`` resumes the flow right after it,
which clears what was queued before the seek and starts fetching at the sought positions.
aiokafka's ``seek_to_committed`` leaves partitions *without* a committed offset wherever
the fetcher got to, so the wrapper seeks those stream partitions to the beginning (the
worker's ``auto_offset_reset`` is ``earliest``; changelog partitions are left to recovery). A
record already on its way may still be delivered once more; stage A is idempotent per
``(partition, offset)`` and stage B per delta watermark, so a repeat costs nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from aiokafka import TopicPartition
from aiokafka.protocol.fetch import FetchRequest
from faust.transport.consumer import Consumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

__all__ = ["install", "installed", "fetch_high_watermarks"]

log = logging.getLogger(__name__)

# Tansu answers a Fetch with max_wait 0 with an empty topic list, so wait a little; with
# min_bytes 0 Apache Kafka answers at once anyway.
_FETCH_MAX_WAIT_MS = 100
_FETCH_MAX_BYTES = 1 << 20
_PARTITION_MAX_BYTES = 1024

_ORIGINAL = AIOKafkaConsumerThread._highwaters
_ORIGINAL_PERFORM_SEEK = Consumer.perform_seek


async def fetch_high_watermarks(
    client: Any, listed: Mapping[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """Return ``max(listed, fetch high watermark)`` for each partition of ``listed``.

    ``client`` is a started ``aiokafka.AIOKafkaClient`` (``consumer._client``). Never raises
    for a broker-side error: a partition whose Fetch fails keeps its listed value.
    Costs one Fetch round trip per partition leader.
    """
    result = dict(listed)
    by_node: dict[int, list[TopicPartition]] = {}
    for tp in listed:
        node = client.cluster.leader_for_partition(tp)
        if node is None or node < 0:
            log.warning("no leader known for %s; keeping listed end offset", tp)
            continue
        by_node.setdefault(node, []).append(tp)

    for node, tps in by_node.items():
        topics: dict[str, list[tuple[int, int, int]]] = {}
        for tp in tps:
            offset = max(0, (listed[tp] or 0) - 1)
            topics.setdefault(tp.topic, []).append((tp.partition, offset, _PARTITION_MAX_BYTES))
        request = FetchRequest(_FETCH_MAX_WAIT_MS, 0, _FETCH_MAX_BYTES, 0, list(topics.items()))
        try:
            response = await client.send(node, request)
        except Exception as exc:  # the stock ListOffsets answer is still usable
            log.warning("high-watermark fetch from node %s failed: %r", node, exc)
            continue
        for topic, partitions in response.topics:
            for partition, error_code, highwater, *_ in partitions:
                tp = TopicPartition(topic, partition)
                if error_code == 0 and tp in result:
                    result[tp] = max(result[tp] or 0, highwater)
                elif tp in result:
                    log.warning("high-watermark fetch for %s: error code %s", tp, error_code)
    return result


async def _highwaters(self: AIOKafkaConsumerThread, partitions: list[Any]) -> Mapping[TopicPartition, int]:
    listed = await _ORIGINAL(self, partitions)
    if self.consumer.in_transaction:  # last stable offsets; not reachable on Tansu
        return listed
    client = self._ensure_consumer()._client
    return await fetch_high_watermarks(client, listed)


async def _perform_seek(self: Consumer) -> None:
    self.app.flow_control.suspend()
    self.stop_flow()
    await _ORIGINAL_PERFORM_SEEK(self)
    # aiokafka's seek_to_committed skips partitions without a committed offset (or at 0), so
    # records fetched there before the seek would be cleared from the queues and not re-read.
    changelogs = self.app.tables.changelog_topics
    uncommitted = [
        TopicPartition(tp.topic, tp.partition)
        for tp in self.assignment()
        if tp.topic not in changelogs and not self._committed_offset.get(tp)
    ]
    if uncommitted:
        await self._thread.seek_to_beginning(*uncommitted)  # type: ignore[attr-defined]


def install() -> None:
    """Patch Faust (process-wide) with both fixes of this module. Idempotent."""
    AIOKafkaConsumerThread._highwaters = _highwaters  # type: ignore[method-assign]
    Consumer.perform_seek = _perform_seek  # type: ignore[method-assign]


def installed() -> bool:
    """Return True when :func:`install` is in effect."""
    return AIOKafkaConsumerThread._highwaters is _highwaters and Consumer.perform_seek is _perform_seek
