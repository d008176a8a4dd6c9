"""The stack the benchmarks run against: Tansu (or, with ``--kafka real``, a 3-broker Apache Kafka
cluster) + Postgres, and spendgate services as children.

Everything started here is stopped by pid (process groups of our own children only).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from spendgate.adapters.embedded import free_port, port_in_use, start_broker, start_postgres
from spendgate.adapters.kafka import ensure_topics
from spendgate.settings import Settings
from spendgate.store.migrate import apply_migrations

ADMIN_TOKEN = "bench-admin-token-0123456789"
REDIS_PORT = 6379  # where bench/baselines.py looks for the Redis baseline
PYTHON = sys.executable


@dataclass
class Stack:
    workdir: Path
    #: "embedded" (Tansu, one in-memory broker) or "real" (3 KRaft Apache Kafka brokers,
    #: ``spendgate.adapters.kafka_cluster``: RF 3, min ISR 2 on every topic incl. changelogs)
    kafka: str = "embedded"
    broker: object = None
    pg: object = None
    bootstrap: str = ""
    database_url: str = ""
    children: list[subprocess.Popen] = field(default_factory=list)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        if self.kafka == "real":
            if self.broker is None:  # started by start_kafka_cluster(), outside the event loop
                raise RuntimeError("--kafka real: call Stack.start_kafka_cluster() before the event loop")
        else:
            self.broker = start_broker(free_port(), logs / "broker.log")
        self.bootstrap = self.broker.bootstrap  # type: ignore[attr-defined]
        pgdata = self.workdir / "pg"
        if pgdata.exists():
            shutil.rmtree(pgdata)
        self.pg = start_postgres(pgdata, free_port(), logs / "postgres.log", durable=False)
        self.database_url = self.pg.create_database("spendgate")  # type: ignore[attr-defined]
        apply_migrations(self.database_url)

    def start_kafka_cluster(self) -> None:
        """Start the 3-broker cluster (``--kafka real``). Call from the main thread, outside an
        event loop: it waits with ``asyncio.run``, and its JVMs die with the thread that started
        them (so not from a worker thread)."""
        from spendgate.adapters.kafka_cluster import KafkaCluster

        kafka_dir = self.workdir / "kafka"
        if kafka_dir.exists():
            shutil.rmtree(kafka_dir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.broker = KafkaCluster(kafka_dir).start()

    def start_redis(self) -> None:
        """The Redis baseline's server on 127.0.0.1:6379 (Debian's ``redis-server``), unless one answers.

        Started by the gate phase only: no other phase needs it."""
        if port_in_use(REDIS_PORT):
            return
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("the gate baseline needs redis-server: apt-get install redis-server")
        argv = [server, "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        proc = self.spawn(argv, "redis.log")
        deadline = time.monotonic() + 10
        while not port_in_use(REDIS_PORT):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {self.workdir / 'logs' / 'redis.log'})")
            time.sleep(0.05)

    def settings(self, prefix: str) -> Settings:
        return Settings(
            kafka_bootstrap=self.bootstrap,
            database_url=self.database_url,
            topic_prefix=prefix,
            partitions=8,
            data_dir=self.workdir / "data",
            admin_token=ADMIN_TOKEN,
            dev=True,
            replication_factor=self.replication_factor,
        )

    @property
    def replication_factor(self) -> int:
        """Of the worker's changelogs: 3 on the real cluster (its topics get 3 from the broker count)."""
        return 3 if self.kafka == "real" else 1

    async def topics(self, prefix: str) -> Settings:
        s = self.settings(prefix)
        await ensure_topics(s)
        return s

    def env(self, prefix: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")}
        env.update(
            SPENDGATE_KAFKA_BOOTSTRAP=self.bootstrap,
            SPENDGATE_TOPIC_PREFIX=prefix,
            SPENDGATE_PARTITIONS="8",
            SPENDGATE_REPLICATION_FACTOR=str(self.replication_factor),
            SPENDGATE_DATABASE_URL=self.database_url,
            SPENDGATE_DATA_DIR=str(self.workdir / "data"),
            SPENDGATE_DEV="true",
            SPENDGATE_WORKER_WEB_PORT="0",
            SPENDGATE_WORKER_ID=f"w-{prefix.strip('.')}",
            SPENDGATE_ADMIN_TOKEN=ADMIN_TOKEN,
            SPENDGATE_LOG_LEVEL="WARNING",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def spawn(self, argv: list[str], log_name: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.workdir / "logs" / log_name, "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.children.append(proc)
        return proc

    def service(self, command: str, prefix: str, log_name: str, **extra: str) -> subprocess.Popen:
        return self.spawn([PYTHON, "-m", "spendgate.cli", command], log_name, self.env(prefix, **extra))

    def stop_child(self, proc: subprocess.Popen, grace_s: float = 10.0) -> None:
        if proc.poll() is None:
            with _suppress():
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with _suppress():
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        with _suppress():
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.children:
            self.children.remove(proc)

    def stop(self) -> None:
        for proc in list(reversed(self.children)):
            self.stop_child(proc, 5)
        if self.pg is not None:
            self.pg.stop()  # type: ignore[attr-defined]
        if self.broker is not None:
            self.broker.stop()  # type: ignore[attr-defined]


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError))  # type: ignore[arg-type]


def wait_http(url: str, proc: subprocess.Popen | None, timeout_s: float, interval_s: float = 0.05) -> float:
    """Seconds until ``url`` answers 200 (raises on timeout or if ``proc`` dies)."""
    started = time.monotonic()
    deadline = started + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process {proc.args} exited with {proc.returncode} while waiting for {url}")
            try:
                if client.get(url).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not 200 within {timeout_s}s")
            time.sleep(interval_s)


def rss_mib(pid: int) -> float:
    try:
        return psutil.Process(pid).memory_info().rss / 2**20
    except psutil.Error:
        return float("nan")


def run_async(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)
