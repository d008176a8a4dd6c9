"""A batch whose processing fails is read again, never committed past (worker.app.run_batch).

Faust's ``take_events`` acknowledges a batch when its generator is closed, which happens when
the agent body raises: stock Faust restarts the agent and commits the failed batch's offsets,
so its events are lost. The worker's guard ends the process instead, without an ack or a
commit; a restarted worker then reads the batch again.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from spendgate.worker.app import EXIT_BATCH_FAILED

FAILAPP = Path(__file__).parent / "faust_apps" / "failapp.py"
RECORDS = 5
REAL_KAFKA = os.environ.get("SPENDGATE_TEST_KAFKA_REAL") == "1"


async def _topic_with_records(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await asyncio.wait_for(admin.start(), 15)
    try:
        await asyncio.wait_for(admin.create_topics([NewTopic(topic, 1, 3 if REAL_KAFKA else 1)]), 15)
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await asyncio.wait_for(producer.start(), 15)
    try:
        for i in range(RECORDS):
            await asyncio.wait_for(producer.send_and_wait(topic, b"v%d" % i), 15)
    finally:
        await producer.stop()


async def _committed(bootstrap: str, group: str, topic: str) -> int | None:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await asyncio.wait_for(consumer.start(), 15)
    try:
        return await asyncio.wait_for(consumer.committed(TopicPartition(topic, 0)), 15)
    finally:
        await consumer.stop()


def _start(bootstrap: str, topic: str, group: str, tmp: Path, name: str, **extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPENDGATE_", "FAILAPP_"))}
    env.update(
        FAILAPP_TOPIC=topic,
        SPENDGATE_KAFKA_BOOTSTRAP=bootstrap,
        SPENDGATE_PARTITIONS="1",
        SPENDGATE_WORKER_ID=group,
        SPENDGATE_WORKER_WEB_PORT="0",
        SPENDGATE_DATA_DIR=str(tmp / "data"),
        SPENDGATE_DATABASE_URL="",
        **extra,
    )
    with (tmp / f"{name}.log").open("wb") as out:
        return subprocess.Popen([sys.executable, str(FAILAPP)], stdout=out, stderr=subprocess.STDOUT, env=env)


def _processed(log: Path) -> set[int]:
    text = log.read_text(errors="replace") if log.exists() else ""
    return {
        int(item.split(":")[1])
        for line in text.splitlines()
        if "PROCESSED " in line
        for item in line.split("PROCESSED ", 1)[1].split()
    }


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def _wait(check, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        await asyncio.sleep(0.2)


async def test_a_failed_batch_is_read_again_not_committed(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic, group = f"failed-batch-{uuid.uuid4().hex[:8]}", f"failapp-{uuid.uuid4().hex[:8]}"
    await _topic_with_records(kafka_bootstrap, topic)
    first = _start(kafka_bootstrap, topic, group, tmp_path, "first", FAILAPP_FAIL="1")
    try:
        # start-up takes seconds on a loaded box; the failure itself is immediate
        await _wait(lambda: first.poll() is not None, 120, "the worker exits after its batch failed")
    finally:
        _stop(first)
    log = (tmp_path / "first.log").read_text(errors="replace")
    assert first.returncode == EXIT_BATCH_FAILED, log[-3000:]
    assert "a batch failed" in log
    assert not (await _committed(kafka_bootstrap, group, topic) or 0), "the failed batch was committed"

    again = _start(kafka_bootstrap, topic, group, tmp_path, "again")
    try:
        await _wait(
            lambda: _processed(tmp_path / "again.log") >= set(range(RECORDS)), 120, "the batch read again"
        )
    finally:
        _stop(again)


async def test_stock_faust_commits_a_batch_that_raised(kafka_bootstrap: str, tmp_path: Path) -> None:
    """Why the guard exists: without it the batch that raised is committed, never processed."""
    topic, group = f"failed-batch-{uuid.uuid4().hex[:8]}", f"failapp-{uuid.uuid4().hex[:8]}"
    await _topic_with_records(kafka_bootstrap, topic)
    worker = _start(kafka_bootstrap, topic, group, tmp_path, "stock", FAILAPP_FAIL="1", FAILAPP_NO_GUARD="1")
    try:
        await _wait(
            lambda: "Restarting dead" in (tmp_path / "stock.log").read_text(errors="replace"),
            120,
            "Faust restarts the agent that raised",
        )
        committed: int | None = None
        for _ in range(60):  # <= 30 s; Faust commits every second
            committed = await _committed(kafka_bootstrap, group, topic)
            if committed == RECORDS:
                break
            await asyncio.sleep(0.5)
    finally:
        _stop(worker)
    assert committed == RECORDS, committed
    assert _processed(tmp_path / "stock.log") == set(), "the failed batch was never processed"
