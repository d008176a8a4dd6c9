"""Kafka adapter: topic names and creation, client factories (``adapters.watermarks``: the
true end of a partition).

Everything here must be correct on Apache Kafka and on the embedded Tansu broker
(see docs/BROKER-NOTES.md):

- Tansu ignores compaction and auto-created topics get no config, so every topic is created
  explicitly, with its cleanup policy, by :func:`ensure_topics`.
- Tansu's ListOffsets answers ``last batch base offset + 1``, so ``end_offsets()`` is wrong
  there; ``adapters.watermarks`` reads the high watermark of a Fetch response instead.
- Tansu has no idempotent or transactional producer; :func:`producer` is at-least-once with
  ``acks="all"`` and consumers make counting idempotent by ``event_id``. Where the broker grants
  a producer id (Apache Kafka), :func:`ensure_topics` notes it and :func:`producer` turns
  idempotence on (no duplicates from the producer's own retries).

aiokafka exceptions do not escape this module: callers see :class:`KafkaUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, NodeNotReadyError, RequestTimedOutError
from aiokafka.protocol.metadata import MetadataRequest

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


#: bootstrap -> aiokafka security options, noted by :func:`client_security` for the clients
#: that are built from a bootstrap string alone (followers, watermark probes, the outbox).
_SECURITY: dict[str, dict[str, Any]] = {}


def client_security(settings: Settings) -> dict[str, Any]:
    """aiokafka keyword arguments for SASL/TLS (MSK, Confluent Cloud) from ``settings``.

    Also remembered for ``settings.kafka_bootstrap`` so :func:`security_for` gives every client
    of this process the same options. PLAINTEXT (the default) gives ``{}``.
    """
    protocol = settings.kafka_security_protocol
    options: dict[str, Any] = {}
    if protocol != "PLAINTEXT":
        options["security_protocol"] = protocol
    if protocol.endswith("SSL"):
        from aiokafka.helpers import create_ssl_context

        cafile = str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None
        options["ssl_context"] = create_ssl_context(cafile=cafile)
    if protocol.startswith("SASL"):
        password = settings.kafka_sasl_password
        options.update(
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_plain_username=settings.kafka_sasl_username,
            sasl_plain_password=password.get_secret_value() if password else "",
        )
    _SECURITY[settings.kafka_bootstrap] = options
    return options


def security_for(bootstrap: str) -> dict[str, Any]:
    """The options :func:`client_security` noted for ``bootstrap`` (``{}``: plaintext)."""
    return dict(_SECURITY.get(bootstrap, {}))


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
    TopicSpec("alerts.dlq", "delete"),  # webhook deliveries given up (spendgate notifier)
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

    Returns once every broker lists every spendgate topic with a leader for each partition
    (Apache Kafka answers CreateTopics before every broker knows them).

    Raises :class:`KafkaUnavailable` when the broker cannot be reached within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    names = {topic_name(settings, spec.short): spec for spec in TOPICS}
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka_bootstrap,
        request_timeout_ms=int(timeout_s * 1000),
        client_id="spendgate-admin",
        **client_security(settings),
    )
    try:
        await asyncio.wait_for(admin.start(), timeout_s)
        replication = _replication_factor(await _broker_count(admin))
        new = [
            NewTopic(
                name,
                num_partitions=settings.partitions,
                replication_factor=replication,
                topic_configs=_with_min_isr(topic_configs(spec), replication),
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
        await _wait_until_every_broker_lists(admin, list(names), deadline)
        await _warn_on_partition_mismatch(admin, settings, [n for n in names if n not in created])
        await probe_idempotence(settings.kafka_bootstrap, timeout_s=timeout_s)
        return sorted(created)
    except (KafkaError, TimeoutError, OSError) as exc:
        raise KafkaUnavailable(f"Kafka at {settings.kafka_bootstrap} did not answer: {exc!r}") from exc
    finally:
        await admin.close()


async def _wait_until_every_broker_lists(
    admin: AIOKafkaAdminClient, topics: list[str], deadline: float
) -> None:
    """Return once every broker that answers lists each of ``topics`` with a leader for every
    partition. A client sends its first request for a topic to any broker; on Apache Kafka a
    broker whose metadata lags answers "unknown topic" for a while after another one listed it
    (and after another process created it). A broker that does not answer is left out: it is
    down, and clients will not be sent to it."""
    client = admin._client  # noqa: SLF001 - aiokafka's admin has no per-broker metadata call
    request = MetadataRequest(list(topics), allow_auto_topic_creation=False)
    while True:
        lagging: dict[int, list[str]] = {}
        answered = 0
        for broker in sorted(client.cluster.brokers(), key=lambda b: b.nodeId):
            remaining = max(0.1, deadline - time.monotonic())
            try:
                response = await asyncio.wait_for(client.send(broker.nodeId, request), remaining)
            except (KafkaError, OSError, TimeoutError):
                continue
            answered += 1
            listed = {
                t["topic"]
                for t in response.to_object()["topics"]
                if t["error_code"] == 0 and t["partitions"] and all(p["leader"] >= 0 for p in t["partitions"])
            }
            if missing := sorted(set(topics) - listed):
                lagging[broker.nodeId] = missing
        if answered and not lagging:
            return
        if time.monotonic() >= deadline:
            if not answered:
                raise KafkaUnavailable(f"no broker answered a metadata request for {topics} in time")
            raise KafkaUnavailable(f"brokers {sorted(lagging)} do not list topics {lagging} in time")
        await asyncio.sleep(0.1)


async def _broker_count(admin: AIOKafkaAdminClient) -> int:
    try:
        cluster = await admin.describe_cluster()
        return max(1, len(cluster.get("brokers", [])))
    except KafkaError:
        return 1


def _replication_factor(brokers: int) -> int:
    return min(3, brokers)


def _with_min_isr(configs: dict[str, str], replication: int) -> dict[str, str]:
    """RF 3 gets ``min.insync.replicas=2``: an acks=all write survives one broker lost."""
    if replication >= 3:
        return {**configs, "min.insync.replicas": "2"}
    return configs


#: bootstrap -> whether its broker grants idempotent producer ids (filled by probe_idempotence).
_IDEMPOTENCE: dict[str, bool] = {}


def idempotence_supported(bootstrap: str) -> bool:
    """What :func:`probe_idempotence` found for ``bootstrap``; False until it has asked."""
    return _IDEMPOTENCE.get(bootstrap, False)


async def probe_idempotence(bootstrap: str, *, timeout_s: float = 10.0) -> bool:
    """Whether the broker grants an idempotent producer id; cached per bootstrap.

    Apache Kafka does; Tansu answers InitProducerId with UnknownError (docs/BROKER-NOTES.md). A broker
    that cannot be reached is not cached (asked again next time) and counts as False.
    """
    if bootstrap in _IDEMPOTENCE:
        return _IDEMPOTENCE[bootstrap]
    probe = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        client_id="spendgate-idempotence-probe",
        request_timeout_ms=int(timeout_s * 1000),
        **security_for(bootstrap),
    )
    sender_log = logging.getLogger("aiokafka.producer.sender")
    sender_log.addFilter(_quiet_init_producer_id)  # Tansu's refusal is an answer, not an error
    try:
        await asyncio.wait_for(probe.start(), timeout_s)
        _IDEMPOTENCE[bootstrap] = True
    except (KafkaConnectionError, NodeNotReadyError, RequestTimedOutError, TimeoutError, OSError):
        return False
    except KafkaError as exc:
        log.info("broker at %s grants no idempotent producer (%r): at-least-once producers", bootstrap, exc)
        _IDEMPOTENCE[bootstrap] = False
    finally:
        sender_log.removeFilter(_quiet_init_producer_id)
        with contextlib.suppress(Exception):
            await probe.stop()
    return _IDEMPOTENCE[bootstrap]


def _quiet_init_producer_id(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Unexpected error during InitProducerIdRequest")


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
    """An unstarted producer: ``acks="all"``, small linger, idempotent where the broker can.

    Idempotence needs :func:`probe_idempotence` (run by :func:`ensure_topics`) to have said
    yes; Tansu cannot. Delivery is at least once either way (a failed send retried by the
    caller is a new record); consumers deduplicate by ``event_id``.
    """
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "acks": "all",
        "linger_ms": 5,
        "enable_idempotence": idempotence_supported(settings.kafka_bootstrap),
        "client_id": "spendgate-producer",
        **CLIENT_SETTINGS,
        **client_security(settings),
    }
    options.update(overrides)
    return track_every_topic(AIOKafkaProducer(**options))


def track_every_topic(producer: AIOKafkaProducer) -> AIOKafkaProducer:
    """Make ``producer`` keep the metadata of every topic it sends to; returns it. Idempotent.

    Works around an aiokafka 0.14 bug that stalled the worker on Apache Kafka: its client
    refreshes metadata only for the topics it *tracks* (all topics while it tracks none), and a
    send to a topic already present in the metadata does not track it. Once any other topic is
    tracked (Faust sends to a changelog it created after the producer started), the next refresh
    -- any new topic, NotLeaderForPartition, a broker going down -- drops the untracked topic:
    a batch already queued for it has no leader and waits for refreshes that never include it
    until the batch expires (Faust's producer: 20 minutes). Tracking the topic before every
    send (a set lookup) keeps it in every refresh.
    """
    client = producer.client
    wait_on_metadata = client._wait_on_metadata
    if getattr(wait_on_metadata, "tracks_every_topic", False):
        return producer

    async def tracking_wait_on_metadata(topic: str) -> Any:
        if topic not in client._topics:
            client.add_topic(topic)
        return await wait_on_metadata(topic)

    tracking_wait_on_metadata.tracks_every_topic = True  # type: ignore[attr-defined]
    client._wait_on_metadata = tracking_wait_on_metadata
    return producer


def consumer(settings: Settings, *topics: str, **overrides: Any) -> AIOKafkaConsumer:
    """An unstarted consumer with spendgate's client settings (no group unless given one)."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": FETCH_MAX_WAIT_MS,
        "client_id": "spendgate-consumer",
        **CLIENT_SETTINGS,
        **client_security(settings),
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **options)
