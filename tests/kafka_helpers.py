"""Small test helpers to produce to and read back from the real broker, and to run services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from spendgate.adapters.watermarks import fetch_high_watermarks
from spendgate.settings import Settings

T = TypeVar("T")


async def produce(settings: Settings, short_topic: str, records: Iterable[tuple[str | None, Any]]) -> None:
    """Produce ``(key, value)`` records (dict values as JSON, bytes as they are), acks=all."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = []
        for key, value in records:
            raw = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
            futures.append(
                await producer.send(settings.topic(short_topic), raw, key=key.encode() if key else None)
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def read_all(settings: Settings, short_topic: str) -> list[tuple[str | None, Any]]:
    """Every record of a topic up to its current end (true high watermark), decoded."""
    topic = settings.topic(short_topic)
    ends = await fetch_high_watermarks(settings.kafka_bootstrap, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await consumer.start()
    out: list[tuple[str | None, Any]] = []
    try:
        tps = [TopicPartition(topic, p) for p in ends]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while any([await consumer.position(tp) < ends[tp.partition] for tp in tps]):
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                for m in messages:
                    value = None if m.value is None else orjson.loads(m.value)
                    out.append((m.key.decode() if m.key else None, value))
    finally:
        await consumer.stop()
    return out


async def latest(settings: Settings, short_topic: str) -> dict[str, Any]:
    """Latest value per key of a (compacted) topic."""
    result: dict[str, Any] = {}
    for key, value in await read_all(settings, short_topic):
        if key is not None:
            result[key] = value
    return result


async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float = 30.0, interval: float = 0.3) -> T:
    """Await ``check()`` until it returns without AssertionError; re-raise the last one at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(interval)


async def group_offsets(settings: Settings, short_topics: Iterable[str] = ("usage", "worker.deltas")) -> str:
    """The worker group's committed offset beside each partition's high watermark, one line per
    topic (``p0 120/120``; ``!`` marks a partition committed short of its end). For failure
    messages: tells "events never consumed" from "consumed but not counted"."""
    group = f"w-{settings.topic_prefix.strip('.')}"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, group_id=group, enable_auto_commit=False
    )
    lines = []
    try:
        await asyncio.wait_for(consumer.start(), 15)
        for short in short_topics:
            topic = settings.topic(short)
            ends = await asyncio.wait_for(fetch_high_watermarks(settings.kafka_bootstrap, topic), 15)
            parts = []
            for p, end in sorted(ends.items()):
                committed = await asyncio.wait_for(consumer.committed(TopicPartition(topic, p)), 15)
                parts.append(f"p{p} {committed}/{end}{'!' if (committed or 0) < end else ''}")
            lines.append(f"{short}: committed/end {' '.join(parts)}")
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not hide the failure it explains
        lines.append(f"(no offsets: {exc!r})")
    finally:
        await consumer.stop()
    return "; ".join(lines)


async def assert_consumed(
    settings: Settings, short_topics: Iterable[str] = ("usage", "worker.deltas")
) -> None:
    """The worker group committed every offset of ``short_topics`` (raises AssertionError)."""
    report = await group_offsets(settings, short_topics)
    assert "!" not in report and "no offsets" not in report, report


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")}
    env.update(
        SPENDGATE_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        SPENDGATE_TOPIC_PREFIX=settings.topic_prefix,
        SPENDGATE_PARTITIONS=str(settings.partitions),
        SPENDGATE_REPLICATION_FACTOR=str(settings.replication_factor),
        SPENDGATE_DATABASE_URL=settings.database_url,
        SPENDGATE_DATA_DIR=str(settings.data_dir),
        SPENDGATE_DEV="true",
        SPENDGATE_WORKER_WEB_PORT=str(settings.worker_web_port),
        SPENDGATE_WORKER_ID=f"w-{settings.topic_prefix.strip('.')}",
    )
    env.update(extra)
    return env


class ServiceProcess:
    """A ``spendgate <command>`` child process; stopped (or SIGKILLed) by pid."""

    def __init__(self, command: str, settings: Settings, log_path: Path, **env: str) -> None:
        self.command = command
        self.env = service_env(settings, **env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spendgate.cli", self.command], env=self.env, stdout=log, stderr=log
        )
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextlib.contextmanager
def running_services(log_dir: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """``start(command, settings, name, **env)`` starts a service; all are stopped on exit.

    Their log tails are printed when they stop, which pytest shows for a failed test.
    """
    started: list[ServiceProcess] = []

    def start(command: str, settings: Settings, name: str, **env: str) -> ServiceProcess:
        proc = ServiceProcess(command, settings, log_dir / f"{name}.log", **env).start()
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()
            print(f"--- {proc.log_path.name} (tail) ---\n{proc.log()}")
