"""``spendgate dev`` as a user runs it, on free ports with a known admin token, for e2e tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from spendgate.adapters.embedded import free_port


@dataclass
class DevStack:
    port: int
    token: str
    lines: list[str]  # what `spendgate dev` printed so far

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.contextmanager
def dev_stack(prefix: str, start_timeout_s: float) -> Iterator[DevStack]:
    """Start it, wait (bounded) for "spendgate dev is ready", stop it with SIGINT (SIGKILL of its
    process group if it lingers) and remove its data."""
    token = f"{prefix}-{uuid.uuid4().hex}"
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix=f"spendgate-{prefix}-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPENDGATE_")}
    env.update(
        SPENDGATE_API_PORT=str(port),
        SPENDGATE_KAFKA_PORT=str(free_port()),
        SPENDGATE_WORKER_WEB_PORT=str(free_port()),
        SPENDGATE_DATA_DIR=str(root / "data"),
        SPENDGATE_PARTITIONS="2",
        SPENDGATE_ADMIN_TOKEN=token,
    )
    dev = subprocess.Popen(
        [sys.executable, "-m", "spendgate.cli", "dev"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert dev.stdout is not None
        for line in dev.stdout:
            lines.append(line)
            if "spendgate dev is ready" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(start_timeout_s):
            pytest.fail("spendgate dev did not become ready:\n" + "".join(lines))
        yield DevStack(port, token, lines)
    finally:
        dev.send_signal(signal.SIGINT)  # stops every child it started
        try:
            dev.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            dev.wait(10)
        shutil.rmtree(root, ignore_errors=True)
