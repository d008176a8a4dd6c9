"""The true end of a partition: the high watermark of a Fetch, never ListOffsets.

Tansu's ListOffsets answers ``last batch base offset + 1`` (docs/BROKER-NOTES.md), so
``end_offsets()`` is wrong there; a Fetch response's high watermark is right on Tansu and on
Apache Kafka alike. :func:`fetch_high_watermarks` asks once (replay, the outbox relay);
:class:`HighWatermarkProbe` keeps a client and asks again and again (read-your-writes).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from spendgate.adapters.kafka import FETCH_MAX_WAIT_MS, KafkaUnavailable, security_for


async def fetch_high_watermarks(bootstrap: str, topic: str, *, timeout_s: float = 15.0) -> dict[int, int]:
    """The true end offset (next offset to be written) of every partition of ``topic``.

    Reads the high watermark of a Fetch response, never ListOffsets (wrong on Tansu: it says
    last batch base + 1, e.g. 1 after one 5-record batch). To keep the fetch small, each
    partition is positioned at ``max(log start, listed end - 1)``: at most the last batch is
    read on Tansu and one record on Kafka. Correct on both brokers.

    Does not block on traffic: an empty partition answers its high watermark too. Raises
    :class:`KafkaUnavailable` when the topic is unknown or the broker does not answer within
    ``timeout_s``.
    """
    client = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        max_partition_fetch_bytes=64 * 1024,
        client_id="spendgate-watermarks",
        request_timeout_ms=int(timeout_s * 1000),
        **security_for(bootstrap),
    )
    deadline = time.monotonic() + timeout_s
    try:
        await asyncio.wait_for(client.start(), timeout_s)
        partitions = await _partitions_for(client, topic, deadline)
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        client.assign(tps)
        starts = await client.beginning_offsets(tps)
        listed_ends = await client.end_offsets(tps)
        for tp in tps:
            client.seek(tp, max(starts[tp], listed_ends[tp] - 1))
        result: dict[int, int] = {}
        while len(result) < len(tps):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(tp.partition for tp in tps if tp.partition not in result)
                raise KafkaUnavailable(f"no fetch answer for {topic} partitions {missing}")
            # short polls: an empty partition's answer carries no record, so getmany would
            # sit out its whole timeout although the high watermark is already known
            await client.getmany(timeout_ms=int(min(remaining, 0.05) * 1000))
            for tp in tps:
                highwater = client.highwater(tp)
                if highwater is not None:
                    result[tp.partition] = highwater
        return result
    except (KafkaError, TimeoutError, OSError) as exc:
        raise KafkaUnavailable(f"Kafka at {bootstrap} did not answer: {exc!r}") from exc
    finally:
        await client.stop()


async def _partitions_for(client: AIOKafkaConsumer, topic: str, deadline: float) -> set[int]:
    while True:
        partitions = client.partitions_for_topic(topic)
        if partitions:
            return set(partitions)
        if time.monotonic() >= deadline:
            raise KafkaUnavailable(f"topic {topic} does not exist")
        # Ask for this topic by name: Kafka answers an empty topic list with no topics (Tansu
        # with all of them), and consumer.topics() does not update the client's cluster view.
        # Never with auto-creation: a reader must not create the topic it waits for.
        if await _topic_exists(client, topic):
            await client._client.add_topic(topic)
        await asyncio.sleep(0.1)


async def _topic_exists(client: AIOKafkaConsumer, topic: str) -> bool:
    from aiokafka.protocol.metadata import MetadataRequest

    inner = client._client
    node = inner.get_random_node()
    if node is None:
        return False
    answer = await inner.send(node, MetadataRequest([topic], allow_auto_topic_creation=False))
    return any(entry[1] == topic and entry[0] == 0 for entry in answer.topics)


class HighWatermarkProbe:
    """Asks the partition leaders for a topic's true end offsets, one Fetch round trip a call.

    Why: read-your-writes needs "everything acknowledged on ``topic`` before now" as offsets,
    cheaply and often (the worker asks once per usage batch). :func:`fetch_high_watermarks`
    opens a consumer per call; this keeps one client and sends each leader one Fetch that
    answers at once for its partitions, at the last end seen (so the answer carries no or few
    records: at most 64 KiB a partition), and reads the high watermark of the answer. A record
    acknowledged with ``acks=all`` is below the high watermark, on Kafka and on Tansu alike
    (ListOffsets would under-report on Tansu, see the module docstring).

    A request is sent after ``high_watermarks()`` was called, so its answer covers every record
    acknowledged before the call. Raises :class:`KafkaUnavailable` after ``timeout_s``; retries
    leader changes and lost connections inside that bound. Not safe for concurrent callers of
    one instance beyond sharing answers (each call sends its own requests).
    """

    def __init__(self, bootstrap: str, *, client_id: str = "spendgate-watermarks") -> None:
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._client: Any = None
        self._ends: dict[tuple[str, int], int] = {}

    async def _ready_client(self, timeout_s: float) -> Any:
        if self._client is None:
            from aiokafka.client import AIOKafkaClient

            client = AIOKafkaClient(
                bootstrap_servers=self._bootstrap,
                client_id=self._client_id,
                request_timeout_ms=int(max(1.0, timeout_s) * 1000),
                retry_backoff_ms=50,
                metadata_max_age_ms=30_000,
                **security_for(self._bootstrap),
            )
            try:
                await asyncio.wait_for(client.bootstrap(), timeout_s)
            except BaseException:
                await client.close()
                raise
            self._client = client
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def high_watermarks(self, topic: str, *, timeout_s: float = 5.0) -> dict[int, int]:
        """The end offset (next offset to be written) of every partition of ``topic``."""
        deadline = time.monotonic() + timeout_s
        last_error: BaseException | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KafkaUnavailable(f"no high watermarks for {topic} within {timeout_s}s: {last_error!r}")
            try:
                return await asyncio.wait_for(self._probe(topic, remaining), remaining)
            except (KafkaError, OSError, TimeoutError, _Retry) as exc:
                last_error = exc
                if not isinstance(exc, _Retry):
                    await self.close()  # a fresh client re-resolves leaders and connections
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    async def _probe(self, topic: str, timeout_s: float) -> dict[int, int]:
        from aiokafka.protocol.fetch import FetchRequest

        client = await self._ready_client(timeout_s)
        await client.add_topic(topic)
        partitions = client.cluster.partitions_for_topic(topic)
        if not partitions:
            await client.force_metadata_update()
            raise _Retry(f"topic {topic} has no known partitions yet")
        by_leader: dict[int, list[tuple[int, int, int]]] = {}
        for partition in sorted(partitions):
            leader = client.cluster.leader_for_partition(TopicPartition(topic, partition))
            if leader is None or leader < 0:
                await client.force_metadata_update()
                raise _Retry(f"{topic}/{partition} has no leader")
            at = self._ends.get((topic, partition), 0)
            by_leader.setdefault(leader, []).append((partition, at, 1 << 16))
        # max_wait 1 ms, min_bytes 0: answer at once. (Tansu answers max_wait 0 with no
        # partitions at all; 1 ms costs it ~2-4 ms and Kafka nothing.)
        answers = await asyncio.gather(
            *(
                client.send(leader, FetchRequest(1, 0, 1 << 20, 0, [(topic, parts)]))
                for leader, parts in by_leader.items()
            )
        )
        ends: dict[int, int] = {}
        for answer in answers:
            for _topic, partition_answers in answer.topics:
                for partition, error_code, highwater, *_ in partition_answers:
                    if error_code == _OFFSET_OUT_OF_RANGE:
                        self._ends.pop((topic, partition), None)  # truncated log: ask from 0
                        raise _Retry(f"{topic}/{partition}: offset out of range")
                    if error_code != 0 or highwater < 0:
                        await client.force_metadata_update()
                        raise _Retry(f"{topic}/{partition}: fetch error {error_code}")
                    ends[partition] = highwater
        missing = set(partitions) - set(ends)
        if missing:
            raise _Retry(f"{topic}: no answer for partitions {sorted(missing)}")
        for partition, end in ends.items():
            self._ends[topic, partition] = end
        return ends


_OFFSET_OUT_OF_RANGE = 1


class _Retry(Exception):
    """A transient probe failure (leader moving, metadata not there yet): ask again."""
