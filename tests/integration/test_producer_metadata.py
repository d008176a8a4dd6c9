"""Producers keep the metadata of every topic they send to (``kafka.track_every_topic``).

aiokafka 0.14 refreshes metadata only for the topics its client tracks, and a send to a topic
that the first (all-topics) metadata already listed does not track it. The next refresh for a
tracked topic dropped it: a batch already queued for it had no leader and waited until it
expired (20 minutes for Faust's producer). On Apache Kafka this stalled the worker in its flush
(FAUST-NOTES "worker stalled in flush"); this test makes it happen on purpose, on either broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from spendgate.adapters import kafka
from spendgate.settings import Settings

SettingsFactory = Callable[..., Awaitable[Settings]]


async def _create_topic(settings: Settings, name: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await asyncio.wait_for(admin.create_topics([NewTopic(name, 1, settings.replication_factor)]), 15)
    finally:
        await admin.close()


async def _send_while_another_topic_gets_tracked(settings: Settings, producer: AIOKafkaProducer) -> None:
    """Queue a lingering batch for a topic the producer's first metadata listed, then send to a
    topic created after the producer started (tracked: metadata refresh); the first must land."""
    later = settings.topic("created-later")
    await _create_topic(settings, later)
    lingering = await producer.send(settings.topic("usage"), b"queued first", partition=0)
    await asyncio.wait_for(producer.send_and_wait(later, b"tracked", partition=0), 10)
    await asyncio.wait_for(lingering, 10)


async def test_a_batch_queued_before_a_refresh_for_another_topic_still_finds_its_leader(
    settings_factory: SettingsFactory,
) -> None:
    settings = await settings_factory(database_url="", partitions=1)
    producer = kafka.producer(settings, linger_ms=2000, request_timeout_ms=30_000)
    await producer.start()
    try:
        await _send_while_another_topic_gets_tracked(settings, producer)
    finally:
        await producer.stop()


async def test_faust_producer_keeps_the_metadata_of_every_topic(settings_factory: SettingsFactory) -> None:
    """The worker's Faust producer gets the same client (``faust_app._Producer``)."""
    from spendgate.worker.faust_app import make_app

    settings = await settings_factory(database_url="", partitions=1)
    app = make_app(settings, app_id=f"w-{settings.topic_prefix.strip('.')}")
    producer = app.producer._new_producer()  # type: ignore[attr-defined]
    assert getattr(producer.client._wait_on_metadata, "tracks_every_topic", False)
