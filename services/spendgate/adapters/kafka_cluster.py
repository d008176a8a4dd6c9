"""A real Apache Kafka cluster (3 KRaft nodes, broker+controller each) for tests and ``make kafka``.

The broker comes from Maven Central, pinned in ``deploy/kafka/pom.xml``; ``mvn
dependency:copy-dependencies`` puts the jars in ``deploy/kafka/target/lib`` once (a second run
finds them and downloads nothing). Each node runs ``java ... kafka.Kafka node.properties`` as a
direct child of the caller (own session, dies with the caller on Linux, stopped by pid), so a
test can SIGKILL, stop and restart single brokers: :meth:`KafkaCluster.kill`,
:meth:`KafkaCluster.start_node`, :meth:`KafkaCluster.restart_node`.

Settings are those spendgate's tests prove (RF 3, ``min.insync.replicas=2``) plus test-sized
timings: a dead broker is fenced after 3 s, not 9, and group sessions may be as short as 1 s
(Faust's dev session is 2 s; Kafka's default floor is 6 s).

CLI: ``python -m spendgate.adapters.kafka_cluster up`` (runs until Ctrl-C) or ``check``
(start, wait for 3 brokers, stop).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from spendgate.adapters.embedded import EmbeddedError, ManagedProcess, free_port

#: deploy/kafka of this checkout (services/spendgate/adapters -> repo root).
DEPLOY_DIR = Path(__file__).resolve().parents[3] / "deploy" / "kafka"
HOST = "127.0.0.1"

#: Broker settings of the test cluster. RF 3 / min ISR 2 are what production should use too.
BROKER_CONFIG: dict[str, str] = {
    "default.replication.factor": "3",
    "min.insync.replicas": "2",
    "offsets.topic.replication.factor": "3",
    "offsets.topic.num.partitions": "8",
    "transaction.state.log.replication.factor": "3",
    "transaction.state.log.min.isr": "2",
    "transaction.state.log.num.partitions": "4",
    "auto.create.topics.enable": "false",
    # Faust's dev/test session is 2 s; Kafka refuses sessions below this floor (default 6 s).
    "group.min.session.timeout.ms": "1000",
    "group.initial.rebalance.delay.ms": "0",
    # A SIGKILLed broker is fenced (and leaves every ISR) after 3 s instead of 9 s.
    "broker.session.timeout.ms": "3000",
    "broker.heartbeat.interval.ms": "500",
    "replica.lag.time.max.ms": "5000",
    # Small machine: few threads, a small cleaner buffer, the cleaner checks every second.
    "num.network.threads": "2",
    "num.io.threads": "2",
    "num.replica.fetchers": "1",
    "background.threads": "2",
    "log.cleaner.threads": "1",
    "log.cleaner.dedupe.buffer.size": str(8 * 1024 * 1024),
    "log.cleaner.backoff.ms": "1000",
    "log.segment.bytes": str(16 * 1024 * 1024),
    "log.index.size.max.bytes": str(1024 * 1024),
    "log.flush.interval.messages": str(2**62),
    "share.coordinator.state.topic.replication.factor": "3",
    "share.coordinator.state.topic.min.isr": "2",
}

LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.out.ref = OUT
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


class KafkaClusterError(EmbeddedError):
    """The Kafka cluster could not be fetched or started; the message says why and where to look."""


def require_tools() -> tuple[str, str]:
    """Paths of ``java`` and ``mvn``; a clear error naming what to install when one is missing."""
    java, mvn = shutil.which("java"), shutil.which("mvn")
    missing = [name for name, path in (("java (JDK 17+)", java), ("mvn (Maven 3)", mvn)) if not path]
    if missing:
        raise KafkaClusterError(
            f"the real-Kafka test cluster needs {' and '.join(missing)} on PATH; "
            "e.g. `apt-get install openjdk-17-jre-headless maven`"
        )
    assert java and mvn
    return java, mvn


def fetch_jars(deploy_dir: Path = DEPLOY_DIR, *, timeout_s: float = 600.0) -> Path:
    """The directory of the broker's jars; runs Maven once when it is missing or incomplete."""
    lib = deploy_dir / "target" / "lib"
    stamp = lib / ".complete"
    pom = deploy_dir / "pom.xml"
    if stamp.exists() and stamp.stat().st_mtime >= pom.stat().st_mtime:
        return lib
    _, mvn = require_tools()
    shutil.rmtree(lib, ignore_errors=True)  # a changed pom must not leave old jars beside new ones
    result = subprocess.run(
        [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if result.returncode != 0 or not any(lib.glob("kafka_2.13-*.jar")):
        raise KafkaClusterError(
            f"mvn could not fetch Apache Kafka ({pom}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    stamp.touch()
    return lib


def _cluster_id() -> str:
    """A random KRaft cluster id (22 url-safe base64 characters) that does not start with '-':
    ``kafka-storage format -t -abc...`` reads such an id as an option and fails (1 start in 64),
    which is why Kafka's own ``Uuid.randomUuid()`` never makes one."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


@dataclass
class KafkaNode:
    """One combined broker+controller: fixed ports and directory across restarts."""

    node_id: int
    port: int
    controller_port: int
    directory: Path
    process: ManagedProcess | None = None
    restarts: int = 0
    wanted: bool = False  # started by us and not stopped or killed since

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "node.properties"

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()


@dataclass
class KafkaCluster:
    """``size`` KRaft nodes under ``root``. Use as a context manager or call start()/stop()."""

    root: Path
    size: int = 3
    heap: str = "384m"
    overrides: Mapping[str, str] = field(default_factory=dict)
    log_level: str = "INFO"
    nodes: list[KafkaNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        if not self.nodes:
            self.nodes = [
                KafkaNode(i, free_port(), free_port(), self.root / f"node{i}")
                for i in range(1, self.size + 1)
            ]

    @property
    def bootstrap(self) -> str:
        return ",".join(node.address for node in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout_s: float = 120.0) -> KafkaCluster:
        """Fetch the jars if needed, format storage, start every node, wait for all brokers."""
        lib = fetch_jars()
        java, _ = require_tools()
        self._classpath = f"{lib}/*"
        self._java = java
        self._write_configs()
        self._format()
        try:
            for node in self.nodes:
                self._spawn(node)
            self.wait_ready(self.size, timeout_s=timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 15.0) -> None:
        """Stop every node (SIGTERM, SIGKILL after ``grace_s``). Idempotent."""
        for node in self.nodes:
            node.wanted = False
            if node.process is not None and node.process.alive():
                os.kill(node.process.pid, signal.SIGTERM)  # all at once, then wait for each
        for node in self.nodes:
            if node.process is not None:
                node.process.stop(grace_s)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (a crash: no controlled shutdown, no leadership hand-over)."""
        node = self.node(node_id)
        node.wanted = False
        if node.process is not None:
            node.process.stop_signal = signal.SIGKILL
            node.process.stop(5)

    def stop_node(self, node_id: int, grace_s: float = 30.0) -> None:
        """Controlled shutdown of one node (SIGTERM: leadership moves away first)."""
        node = self.node(node_id)
        node.wanted = False
        if node.process is not None:
            node.process.stop(grace_s)

    def start_node(self, node_id: int, *, timeout_s: float = 90.0) -> None:
        """Start a stopped node again over its old data; wait until the cluster has every broker."""
        node = self.node(node_id)
        if node.alive():
            return
        node.restarts += 1
        self._spawn(node)
        self.wait_ready(self.size, timeout_s=timeout_s)

    def restart_node(self, node_id: int, *, timeout_s: float = 90.0) -> None:
        self.stop_node(node_id)
        self.start_node(node_id, timeout_s=timeout_s)

    # ---------------------------------------------------------------- readiness

    def wait_ready(self, brokers: int, *, timeout_s: float = 90.0) -> None:
        """Block until metadata lists ``brokers`` live brokers; raise with the logs otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            for node in self.nodes:
                if node.wanted and node.process is not None and not node.process.alive():
                    raise KafkaClusterError(
                        f"kafka node {node.node_id} exited with {node.process.popen.returncode}; "
                        f"log {node.process.log_path}:\n{node.process.log_tail()}"
                    )
            if self.live_brokers() >= brokers:
                return
            if time.monotonic() >= deadline:
                tails = "\n".join(
                    f"--- node {n.node_id} ({n.process.log_path}):\n{n.process.log_tail(15)}"
                    for n in self.nodes
                    if n.process is not None
                )
                raise KafkaClusterError(
                    f"kafka cluster: fewer than {brokers} brokers after {timeout_s:.0f}s\n{tails}"
                )
            time.sleep(0.5)

    def live_brokers(self) -> int:
        """How many brokers the metadata of a live node lists (0 when none answers)."""
        brokers = asyncio.run(_describe(self._live_bootstrap())).get("brokers", [])
        return len(brokers) if isinstance(brokers, list) else 0

    def _live_bootstrap(self) -> str:
        live = [n.address for n in self.nodes if n.alive()]
        return ",".join(live) or self.bootstrap

    # ---------------------------------------------------------------- internals

    def _properties(self, node: KafkaNode) -> dict[str, str]:
        voters = ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in self.nodes)
        props = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{HOST}:{node.port},CONTROLLER://{HOST}:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(node.directory / "data"),
            **BROKER_CONFIG,
        }
        if self.size < 3:
            for key in ("default.replication.factor", "offsets.topic.replication.factor",
                        "transaction.state.log.replication.factor",
                        "share.coordinator.state.topic.replication.factor"):
                props[key] = str(self.size)
            for key in ("min.insync.replicas", "transaction.state.log.min.isr",
                        "share.coordinator.state.topic.min.isr"):
                props[key] = "1"
        props.update(self.overrides)
        return props

    def _write_configs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "log4j2.properties").write_text(LOG4J2.format(level=self.log_level))
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            lines = [f"{k}={v}" for k, v in self._properties(node).items()]
            node.config_path.write_text("\n".join(lines) + "\n")

    def _java_argv(self, main: str, *args: str) -> list[str]:
        return [
            self._java,
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
            "-cp",
            self._classpath,
            main,
            *args,
        ]

    def _format(self) -> None:
        unformatted = [n for n in self.nodes if not (n.directory / "data" / "meta.properties").exists()]
        if not unformatted:
            return
        cluster_id = _cluster_id()
        procs = [
            subprocess.Popen(
                [
                    self._java,
                    "-Xmx128m",
                    "-XX:TieredStopAtLevel=1",
                    f"-Dlog4j2.configurationFile={self.root / 'log4j2.properties'}",
                    "-cp",
                    self._classpath,
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(node.config_path),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for node in unformatted
        ]
        for node, proc in zip(unformatted, procs, strict=True):
            out, _ = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise KafkaClusterError(f"formatting kafka node {node.node_id} failed:\n{out}")

    def _spawn(self, node: KafkaNode) -> None:
        log = node.directory / f"kafka-{node.restarts}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "JAVA_TOOL"))}
        node.process = ManagedProcess.spawn(
            f"kafka node {node.node_id}",
            self._java_argv("kafka.Kafka", str(node.config_path)),
            log,
            env=env,
        )
        node.wanted = True


async def _describe(bootstrap: str) -> dict[str, object]:
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.errors import KafkaError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
    quiet = logging.getLogger("aiokafka")
    level, quiet.level = quiet.level, logging.CRITICAL  # "Unable connect" while nodes boot
    try:
        await asyncio.wait_for(admin.start(), 5)
        return dict(await asyncio.wait_for(admin.describe_cluster(), 5))
    except (KafkaError, TimeoutError, OSError):
        return {}
    finally:
        await admin.close()
        quiet.level = level


def run_tests(cluster: KafkaCluster, pytest_args: list[str]) -> int:
    """Run pytest against ``cluster``: RF 3 for Faust's changelogs, the real-Kafka-only tests on."""
    env = {
        **os.environ,
        "SPENDGATE_TEST_KAFKA_BOOTSTRAP": cluster.bootstrap,
        "SPENDGATE_TEST_KAFKA_REAL": "1",
        "SPENDGATE_REPLICATION_FACTOR": "3",
    }
    started = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "pytest", *pytest_args], env=env)
    print(f"kafka: pytest exited {code} after {time.monotonic() - started:.0f}s", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spendgate.adapters.kafka_cluster")
    parser.add_argument("command", choices=["up", "check", "fetch", "test"])
    parser.add_argument("--dir", type=Path, default=None, help="cluster data (default: a temp dir)")
    parser.add_argument("pytest_args", nargs="*", help="test: arguments for pytest (after --)")
    args = parser.parse_args(argv)
    try:
        if args.command == "fetch":
            print(fetch_jars())
            return 0
        root = args.dir or Path(tempfile.mkdtemp(prefix="spendgate-kafka-"))
        started = time.monotonic()
        cluster = KafkaCluster(root).start()
    except KafkaClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        pids = " ".join(str(n.process.pid) for n in cluster.nodes if n.process)
        print(f"kafka: 3 brokers ready in {time.monotonic() - started:.1f}s (pids {pids}), data {root}")
        print(f"SPENDGATE_KAFKA_BOOTSTRAP={cluster.bootstrap}", flush=True)
        if args.command == "test":
            return run_tests(cluster, args.pytest_args)
        if args.command == "up":
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            while all(n.alive() for n in cluster.nodes):
                time.sleep(1)
            print("kafka: a node exited; stopping the others", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        print("kafka: stopped", flush=True)
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
