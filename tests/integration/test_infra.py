"""The foundation against a real broker and Postgres: topics, true end offsets, migrations."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import psycopg
import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from spendgate.adapters import kafka, watermarks
from spendgate.adapters.embedded import PortInUse, free_port, port_in_use, start_broker
from spendgate.adapters.follower import TopicFollower
from spendgate.settings import Settings
from spendgate.store.migrate import (
    MIGRATIONS_DIR,
    MigrationError,
    applied_versions,
    apply_migrations,
    discover,
)

SettingsFactory = Callable[..., Awaitable[Settings]]

CONTRACT_TOPICS = {"usage", "usage.dlq", "config", "decisions", "state", "alerts", "alerts.dlq"}


async def _describe(bootstrap: str, names: list[str]) -> dict[str, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {d["topic"]: len(d["partitions"]) for d in await admin.describe_topics(names)}
    finally:
        await admin.close()


async def test_ensure_topics_creates_every_topic_with_the_configured_partitions(
    settings_factory: SettingsFactory,
) -> None:
    settings = await settings_factory(database_url="", partitions=3)
    names = [kafka.topic_name(settings, short) for short in CONTRACT_TOPICS | {"worker.deltas"}]
    assert await _describe(settings.kafka_bootstrap, names) == {name: 3 for name in names}


async def test_ensure_topics_is_idempotent(settings_factory: SettingsFactory) -> None:
    settings = await settings_factory(database_url="")  # the factory ran it once
    assert await kafka.ensure_topics(settings) == []
    assert await kafka.ensure_topics(settings) == []


def test_topic_specs_follow_the_contract_cleanup_policies() -> None:
    policies = {spec.short: spec.cleanup_policy for spec in kafka.TOPICS}
    assert set(policies) == CONTRACT_TOPICS | {"worker.deltas"}
    assert {s for s, p in policies.items() if p == "compact"} == {"config", "decisions", "state"}


async def test_high_watermark_counts_every_record_of_a_batch(
    settings_factory: SettingsFactory,
) -> None:
    settings = await settings_factory(database_url="", partitions=2)
    topic = kafka.topic_name(settings, "usage")
    producer = kafka.producer(settings)
    await producer.start()
    try:
        batch = producer.create_batch()
        for i in range(5):
            assert batch.append(key=b"k", value=b'{"n": %d}' % i, timestamp=None) is not None
        await (await producer.send_batch(batch, topic, partition=1))
    finally:
        await producer.stop()

    assert await watermarks.fetch_high_watermarks(settings.kafka_bootstrap, topic) == {0: 0, 1: 5}

    # What ListOffsets says, for the record: Tansu answers 1 (last batch base + 1).
    consumer = kafka.consumer(settings)
    await consumer.start()
    try:
        listed = await consumer.end_offsets([TopicPartition(topic, 1)])
    finally:
        await consumer.stop()
    assert listed[TopicPartition(topic, 1)] in (1, 5)  # 1 on Tansu, 5 on Apache Kafka


async def test_high_watermark_after_several_batches(settings_factory: SettingsFactory) -> None:
    settings = await settings_factory(database_url="", partitions=1)
    topic = kafka.topic_name(settings, "state")
    producer = kafka.producer(settings)
    await producer.start()
    try:
        for size in (3, 1, 4):
            batch = producer.create_batch()
            for _ in range(size):
                batch.append(key=b"k", value=b"v", timestamp=None)
            await (await producer.send_batch(batch, topic, partition=0))
    finally:
        await producer.stop()
    assert await watermarks.fetch_high_watermarks(settings.kafka_bootstrap, topic) == {0: 8}


async def test_high_watermark_of_unknown_topic_raises(settings_factory: SettingsFactory) -> None:
    settings = await settings_factory(database_url="")
    with pytest.raises(kafka.KafkaUnavailable, match="does not exist"):
        await watermarks.fetch_high_watermarks(settings.kafka_bootstrap, "no-such-topic-here", timeout_s=1.0)


@pytest.mark.broker_agnostic
def test_migrations_apply_once_and_record_each_version(fresh_database_url: str) -> None:
    expected = [m.version for m in discover(MIGRATIONS_DIR)]
    assert apply_migrations(fresh_database_url) == expected
    assert apply_migrations(fresh_database_url) == []
    assert applied_versions(fresh_database_url) == expected


@pytest.mark.broker_agnostic
def test_a_failing_migration_is_rolled_back_and_not_recorded(database_url: str, tmp_path: Path) -> None:
    name = f"m_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = psycopg.conninfo.make_conninfo(database_url, dbname=name)
    (tmp_path / "001_ok.sql").write_text("CREATE TABLE ok (id int);")
    (tmp_path / "002_bad.sql").write_text("CREATE TABLE half (id int); SELECT nope;")
    with pytest.raises(MigrationError, match="002_bad.sql"):
        apply_migrations(url, tmp_path)
    assert applied_versions(url) == [1]
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('half')").fetchone() == (None,)

    (tmp_path / "001_ok.sql").write_text("CREATE TABLE ok (id bigint);")
    with pytest.raises(MigrationError, match="changed after it was applied"):
        apply_migrations(url, tmp_path)


@pytest.mark.broker_agnostic
def test_broker_on_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert port_in_use(port)
        with pytest.raises(PortInUse, match=f"{port}.*SPENDGATE_KAFKA_PORT"):
            start_broker(port, tmp_path / "broker.log")


@pytest.mark.broker_agnostic
def test_embedded_broker_stops_by_pid(tmp_path: Path) -> None:
    broker = start_broker(free_port(), tmp_path / "broker.log")
    pid = broker.process.pid
    broker.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.broker_agnostic
def test_embedded_children_die_with_a_killed_parent(tmp_path: Path) -> None:
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from spendgate.adapters.embedded import free_port, start_broker\n"
        "b = start_broker(free_port(), Path(sys.argv[1]))\n"
        "print(b.process.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "broker.log")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    child = int(done.stdout.split()[0])
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(child).wait(5)  # raises TimeoutExpired if the broker outlived its parent
    assert not psutil.pid_exists(child)


async def test_probe_sees_every_record_of_a_batch_and_follows_new_ones(
    settings_factory: SettingsFactory,
) -> None:
    """The read-your-writes probe agrees with the Fetch high watermark, call after call."""
    settings = await settings_factory(database_url="", partitions=2)
    topic = kafka.topic_name(settings, "config")
    probe = watermarks.HighWatermarkProbe(settings.kafka_bootstrap)
    producer = kafka.producer(settings)
    await producer.start()
    try:
        assert await probe.high_watermarks(topic) == {0: 0, 1: 0}
        batch = producer.create_batch()
        for i in range(5):
            batch.append(key=b"k", value=b'{"n": %d}' % i, timestamp=None)
        await (await producer.send_batch(batch, topic, partition=1))
        assert await probe.high_watermarks(topic) == {0: 0, 1: 5}
        await producer.send_and_wait(topic, b"{}", key=b"k", partition=0)
        assert await probe.high_watermarks(topic) == {0: 1, 1: 5}
        assert await watermarks.fetch_high_watermarks(settings.kafka_bootstrap, topic) == {0: 1, 1: 5}
    finally:
        await producer.stop()
        await probe.close()


async def test_probe_of_a_broker_that_is_not_there_gives_up_within_its_bound() -> None:
    probe = watermarks.HighWatermarkProbe(f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    try:
        with pytest.raises(kafka.KafkaUnavailable):
            await probe.high_watermarks("spend.config", timeout_s=1.0)
    finally:
        await probe.close()
    assert time.monotonic() - started < 3


async def test_follower_reach_waits_for_the_records_below_the_given_ends(
    settings_factory: SettingsFactory,
) -> None:
    settings = await settings_factory(database_url="", partitions=2)
    topic = kafka.topic_name(settings, "config")
    seen: list[str] = []
    follower = TopicFollower(settings.kafka_bootstrap, {topic: lambda key, *_: seen.append(key or "")})
    probe = watermarks.HighWatermarkProbe(settings.kafka_bootstrap)
    producer = kafka.producer(settings)
    await producer.start()
    await follower.start()
    try:
        await follower.wait_ready(30)
        for n in range(3):
            await producer.send_and_wait(topic, b"{}", key=f"r{n}".encode())
        await follower.reach(topic, await probe.high_watermarks(topic), 10)
        assert sorted(seen) == ["r0", "r1", "r2"]  # all applied when reach() returns
        with pytest.raises(TimeoutError):
            await follower.reach(topic, {0: 10_000}, 0.3)  # never written: bounded
    finally:
        await follower.stop()
        await producer.stop()
        await probe.close()


async def test_follower_calls_its_catch_up_hook_after_each_batch_until_ready_only(
    settings_factory: SettingsFactory,
) -> None:
    """The API freezes what it applied after each catch-up batch (``api.app``); never once live."""
    settings = await settings_factory(database_url="", partitions=2)
    topic = kafka.topic_name(settings, "config")
    producer = kafka.producer(settings)
    await producer.start()
    seen: list[str] = []
    calls: list[int] = []
    follower = TopicFollower(
        settings.kafka_bootstrap,
        {topic: lambda key, *_: seen.append(key or "")},
        on_catch_up_batch=lambda: calls.append(len(seen)),
    )
    probe = watermarks.HighWatermarkProbe(settings.kafka_bootstrap)
    try:
        for n in range(5):
            await producer.send_and_wait(topic, b"{}", key=f"a{n}".encode())
        await follower.start()
        await follower.wait_ready(30)
        assert calls and calls[-1] == 5  # after the batch that reached the start-time ends
        before = len(calls)
        await producer.send_and_wait(topic, b"{}", key=b"live")
        await follower.reach(topic, await probe.high_watermarks(topic), 10)
        assert len(seen) == 6 and len(calls) == before
    finally:
        await follower.stop()
        await producer.stop()
        await probe.close()
