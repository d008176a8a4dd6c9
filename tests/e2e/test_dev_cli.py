"""`spendgate dev` as a developer runs it: starts, serves /readyz, stops everything on Ctrl-C."""

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
from collections.abc import Iterator
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
