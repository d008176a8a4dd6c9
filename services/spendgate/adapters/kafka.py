"""Kafka adapter: topic names and creation, client factories, the true end of a partition.

Everything here must be correct on Apache Kafka and on the embedded Tansu broker
(see shared/BROKER-NOTES.md):

- Tansu ignores compaction and auto-created topics get no config, so every topic is created
  explicitly, with its cleanup policy, by :func:`ensure_topics`.
- Tansu's ListOffsets answers ``last batch base offset + 1``, so ``end_offsets()`` is wrong
  there; :func:`fetch_high_watermarks` reads the high watermark of a Fetch response instead.
- Tansu has no idempotent or transactional producer; :func:`producer` is at-least-once with
  ``acks="all"`` and consumers make counting idempotent by ``event_id``.

aiokafka exceptions do not escape this module: callers see :class:`KafkaUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from spendgate.settings import Settings

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36

#: Client settings short enough that a dead broker is noticed in seconds, not minutes.
CLIENT_SETTINGS: dict[str, Any] = {
    "request_timeout_ms": 15_000,
    "retry_backoff_ms": 100,
    "metadata_max_age_ms": 30_000,
    "connections_max_idle_ms": 60_000,
}

#: 100 ms serves both live latency and catch-up on Tansu, whose fetch polls storage
#: (10-20 ms waits made no progress catching up on 100k single-record batches).
FETCH_MAX_WAIT_MS = 100


class KafkaUnavailable(RuntimeError):
    """The broker did not answer in time. Retry later, or check SPENDGATE_KAFKA_BOOTSTRAP."""


@dataclass(frozen=True)
class TopicSpec:
    short: str
    cleanup_policy: str  # "compact" | "delete"


#: Every topic spendgate owns: the public ones of CONTRACT §2 and the internal stage A -> B one.
TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec("usage", "delete"),
    TopicSpec("usage.dlq", "delete"),
    TopicSpec("config", "compact"),
    TopicSpec("decisions", "compact"),
    TopicSpec("state", "compact"),
    TopicSpec("alerts", "delete"),
    TopicSpec("worker.deltas", "delete"),
)


def topic_name(settings: Settings, short: str) -> str:
    """Full topic name for a short name: ``usage`` -> ``spend.usage`` (prefix from settings)."""
    return f"{settings.topic_prefix}{short}"


def topic_configs(spec: TopicSpec) -> dict[str, str]:
    configs = {"cleanup.policy": spec.cleanup_policy}
    if spec.short == "usage":
        # Long retention: replay rebuilds spend from here. -1 = keep forever.
        configs["retention.ms"] = "-1"
    return configs


async def ensure_topics(settings: Settings, *, timeout_s: float = 30.0) -> list[str]:
    """Create every spendgate topic that does not exist yet; return the names created.

    Idempotent: an existing topic is left as it is (its partition count is not changed, a
    mismatch is logged; neither Kafka's create_partitions is attempted nor would Tansu
    support it). Safe to run concurrently from several processes.

    Raises :class:`KafkaUnavailable` when the broker cannot be reached within ``timeout_s``.
    """
    names = {topic_name(settings, spec.short): spec for spec in TOPICS}
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        request_timeout_ms=int(timeout_s * 1000),
        client_id="spendgate-admin",
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        replication = _replication_factor(await _broker_count(admin))
        new = [
            NewTopic(
                name,
                num_partitions=settings.partitions,
                replication_factor=replication,
                topic_configs=topic_configs(spec),
            )
            for name, spec in names.items()
        ]
        response = await asyncio.wait_for(admin.create_topics(new), timeout_s)
        created: list[str] = []
        for topic, error_code, *rest in response.topic_errors:
            if error_code == 0:
                created.append(topic)
            elif error_code != _TOPIC_ALREADY_EXISTS:
                message = rest[0] if rest else ""
                raise KafkaUnavailable(f"creating topic {topic} failed: {error_code} {message}")
        await _warn_on_partition_mismatch(admin, settings, [n for n in names if n not in created])
        return sorted(created)
    except (KafkaError, TimeoutError, OSError) as exc:
        raise KafkaUnavailable(
            f"Kafka at {settings.kafka_bootstrap} did not answer: {exc!r}"
        ) from exc
    finally:
        await admin.close()


async def _broker_count(admin: AIOKafkaAdminClient) -> int:
    try:
        cluster = await admin.describe_cluster()
        return max(1, len(cluster.get("brokers", [])))
    except KafkaError:
        return 1


def _replication_factor(brokers: int) -> int:
    return min(3, brokers)


async def _warn_on_partition_mismatch(
    admin: AIOKafkaAdminClient, settings: Settings, existing: list[str]
) -> None:
    if not existing:
        return
    for description in await admin.describe_topics(existing):
        count = len(description.get("partitions", []))
        if count and count != settings.partitions:
            log.warning(
                "topic %s has %d partitions, SPENDGATE_PARTITIONS=%d; keeping %d",
                description.get("topic"),
                count,
                settings.partitions,
                count,
            )


def producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """An unstarted producer: ``acks="all"``, small linger, no idempotence (Tansu lacks it).

    Delivery is at least once; consumers deduplicate by ``event_id``.
    """
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "acks": "all",
        "linger_ms": 5,
        "enable_idempotence": False,
        "client_id": "spendgate-producer",
        **CLIENT_SETTINGS,
    }
    options.update(overrides)
    return AIOKafkaProducer(**options)


def consumer(settings: Settings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """An unstarted consumer with spendgate's client settings (no group unless given one)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
        "client_id": "spendgate-consumer",
        **CLIENT_SETTINGS,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)


async def fetch_high_watermarks(
    bootstrap: str, topic: str, *, timeout_s: float = 15.0
) -> dict[int, int]:
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
            await client.getmany(timeout_ms=int(min(remaining, 0.5) * 1000))
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
        await client.topics()  # forces a metadata refresh
        await asyncio.sleep(0.1)
