"""`spendgate dev` as a developer runs it: starts, serves, survives crashed children, stops on Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import psutil
import pytest

from spendgate.adapters.embedded import free_port

START_TIMEOUT_S = 150.0
SETTLE_S = 5.0


def _dev_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")}
    env.update(
        SPENDGATE_API_PORT=str(free_port()),
        SPENDGATE_KAFKA_PORT=str(free_port()),
        SPENDGATE_WORKER_WEB_PORT=str(free_port()),
        SPENDGATE_DATA_DIR=str(data_dir),
        SPENDGATE_PARTITIONS="2",
    )
    env.update(extra)
    return env


class DevProcess:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "spendgate.cli", "dev"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.append(line.rstrip("\n"))
            if "spendgate dev is ready" in line:
                self.ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.5):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"spendgate dev did not become ready:\n{self.output}")

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.popen.pid).children(recursive=True)

    def kill(self) -> None:
        for proc in [*self.descendants(), psutil.Process(self.popen.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """Outside pytest's basetemp, which other pytest runs chmod to 0700 (see tests/conftest.py)."""
    path = Path(tempfile.mkdtemp(prefix="spendgate-e2e-"))
    try:
        yield path / "data"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dev(data_dir: Path) -> Iterator[DevProcess]:
    process = DevProcess(_dev_env(data_dir))
    try:
        yield process
    finally:
        if process.popen.poll() is None:
            process.kill()
            process.popen.wait(10)


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_dev_serves_readyz_and_stops_every_child_on_signal(
    dev: DevProcess, sig: signal.Signals
) -> None:
    dev.wait_ready(START_TIMEOUT_S)
    time.sleep(SETTLE_S)  # a child that dies right after start must fail this test
    assert dev.popen.poll() is None, dev.output
    port = dev.env["SPENDGATE_API_PORT"]
    assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200
    for needle in (f"http://127.0.0.1:{port}", "Kafka:", "Postgres:", "admin token:"):
        assert needle in dev.output
    children = dev.descendants()
    assert len(children) >= 4  # broker, postgres (+ backends), worker, api

    dev.popen.send_signal(sig)
    assert dev.popen.wait(60) == 0, dev.output
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(p) for p in children):
        time.sleep(0.2)
    left = [p.pid for p in children if not _gone(p)]
    assert left == [], f"still running after stop: {left}"
    assert "Traceback" not in dev.output


def test_dev_on_a_taken_port_fails_in_one_line(data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _dev_env(data_dir, SPENDGATE_KAFKA_PORT=str(port))
        done = subprocess.run(
            [sys.executable, "-m", "spendgate.cli", "dev"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert f"{port}" in done.stderr and "SPENDGATE_KAFKA_PORT" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


# ------------------------------------------------------------------ crashes under load

ADMIN_TOKEN = "e2e-dev-admin-token"
BATCH = 10
BATCH_EVERY_S = 0.06  # ~160 events/s while the API is up
RECOVERY_TIMEOUT_S = 60.0


def _child(dev: DevProcess, match: Callable[[psutil.Process], bool], what: str) -> psutil.Process:
    """The one live child of the dev process that ``match`` picks (waits a little for it)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = []
        for proc in psutil.Process(dev.popen.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if not _gone(proc) and match(proc):
                    found.append(proc)
        if len(found) == 1:
            return found[0]
        time.sleep(0.2)
    pytest.fail(f"no single {what} child of spendgate dev:\n{dev.output}")


def _service(name: str) -> Callable[[psutil.Process], bool]:
    return lambda p: p.cmdline()[-2:] == ["spendgate.cli", name]


def _postmaster(proc: psutil.Process) -> bool:
    return proc.name() == "postgres"


class Load:
    """A gateway posting usage events; a batch that is not answered 202 is resent as it was."""

    def __init__(self, port: str) -> None:
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=5.0,
        )
        self.acked: dict[str, Decimal] = {}
        self.pending: list[list[dict[str, str]]] = []
        self.failures = 0
        self.sent = 0

    def new_batch(self) -> None:
        batch = []
        for _ in range(BATCH):
            self.sent += 1
            cost = Decimal(self.sent % 97 + 1) / 1000  # distinct sums: a double count shows
            batch.append(
                {
                    "event_id": uuid.uuid4().hex,
                    "occurred_at": datetime.now(UTC).isoformat(),
                    "key_id": "k-crash",
                    "team_id": "t-crash",
                    "cost_usd": str(cost),
                }
            )
        self.pending.append(batch)

    def flush(self) -> None:
        """Send every pending batch once; keep those that were not acknowledged."""
        left = []
        for batch in self.pending:
            try:
                answer = self.client.post("/v1/events", json=batch)
            except httpx.HTTPError:
                answer = None
            if answer is not None and answer.status_code == 202:
                for event in batch:
                    self.acked[event["event_id"]] = Decimal(event["cost_usd"])
                continue
            if answer is not None:
                assert answer.status_code in (502, 503, 504), answer.text
            self.failures += 1
            left.append(batch)
        self.pending = left

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.new_batch()
            self.flush()
            time.sleep(BATCH_EVERY_S if not self.pending else 0.2)

    def spend(self, scope: str) -> Decimal | None:
        try:
            answer = self.client.get(f"/v1/spend/{scope}")
        except httpx.HTTPError:
            return None
        if answer.status_code != 200:
            return None
        totals = [w["spend_usd"] for w in answer.json()["windows"] if w["window"] == "total"]
        return Decimal(totals[0]) if totals else None


def _wait_for_line(dev: DevProcess, needle: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while needle not in dev.output:
        if time.monotonic() > deadline or dev.popen.poll() is not None:
            pytest.fail(f"spendgate dev never logged {needle!r}:\n{dev.output}")
        time.sleep(0.2)


def test_dev_restarts_crashed_children_and_loses_no_acknowledged_event(data_dir: Path) -> None:
    process = DevProcess(_dev_env(data_dir, SPENDGATE_ADMIN_TOKEN=ADMIN_TOKEN))
    try:
        _crash_children_under_load(process)
    finally:
        if process.popen.poll() is None:
            process.kill()
            process.popen.wait(10)


def _crash_children_under_load(dev: DevProcess) -> None:
    dev.wait_ready(START_TIMEOUT_S)
    load = Load(dev.env["SPENDGATE_API_PORT"])
    load.run(3)
    assert load.acked and not load.pending

    for name, match in (("worker", _service("worker")), ("api", _service("api")), ("postgres", _postmaster)):
        victim = _child(dev, match, name)
        victim.kill()
        load.run(1)
        _wait_for_line(dev, f"{name} exited with code -9; restarting it", 10)
        _wait_for_line(dev, f"{name} restarted (pid", 30)
        load.run(3)

    deadline = time.monotonic() + RECOVERY_TIMEOUT_S
    while load.pending and time.monotonic() < deadline:
        load.flush()
        time.sleep(0.2)
    assert not load.pending, f"{len(load.pending)} batches never acknowledged:\n{dev.output}"
    assert load.failures > 0  # the API was down for a while: the retries were exercised
    expected = sum(load.acked.values(), Decimal(0))
    assert len(load.acked) == load.sent

    seen: dict[str, Decimal | None] = {}
    while time.monotonic() < deadline:
        seen = {scope: load.spend(scope) for scope in ("key:k-crash", "team:t-crash")}
        if all(v is not None and v >= expected for v in seen.values()):
            break
        time.sleep(0.5)
    time.sleep(2)  # a late duplicate would show now
    seen = {scope: load.spend(scope) for scope in ("key:k-crash", "team:t-crash")}
    assert seen == {"key:k-crash": expected, "team:t-crash": expected}, (
        f"{len(load.acked)} events acknowledged, {load.failures} failed posts\n{dev.output}"
    )

    assert dev.popen.poll() is None, dev.output
    assert "stopping the stack" not in dev.output
    children = dev.descendants()
    dev.popen.send_signal(signal.SIGINT)
    assert dev.popen.wait(60) == 0, dev.output
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(p) for p in children):
        time.sleep(0.2)
    assert [p.pid for p in children if not _gone(p)] == []


def test_dev_stops_loudly_when_the_in_memory_broker_dies(dev: DevProcess) -> None:
    dev.wait_ready(START_TIMEOUT_S)
    children = dev.descendants()
    _child(dev, lambda p: "tansu" in p.name() or "broker" in p.cmdline()[1:2], "broker").kill()
    assert dev.popen.wait(60) == 1, dev.output
    assert "broker (tansu) exited with code -9" in dev.output
    assert "every event it held is lost" in dev.output
    assert "restarting" not in dev.output
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(p) for p in children):
        time.sleep(0.2)
    assert [p.pid for p in children if not _gone(p)] == []
