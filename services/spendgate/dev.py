"""``spendgate dev``: the whole stack on one machine, as child processes of one supervisor.

Order of start (each step waits for the previous one to be usable):

1. check that the API, broker and worker web ports are free (else a one-line error, exit 2);
2. Tansu broker (in memory) on 127.0.0.1:SPENDGATE_KAFKA_PORT;
3. Postgres over SPENDGATE_DATA_DIR/pg on a free port (wiped first unless ``keep_db``);
4. topics (:func:`ensure_topics`) and migrations (:func:`apply_migrations`);
5. ``spendgate worker`` and ``spendgate api`` (same interpreter), then wait for /readyz = 200.

Once ready, only SIGINT or SIGTERM stops the stack. A worker, API or Postgres that dies on its
own is started again (logged, with a backoff of 0.5 s doubling to 10 s, back to 0.5 s once it
has stayed up 30 s): the events the API acknowledged are on the broker, and stopping the stack
would throw them away with the in-memory broker. A restarted worker resumes from its committed
offsets and dedupes by ``event_id``; a restarted Postgres reuses its data directory (durable).
The broker itself cannot be restarted without losing everything it held, so its death is
reported loudly and stops the stack (exit code 1).

Stopping goes in reverse order (api and worker, then Postgres and broker): SIGTERM (SIGINT for
Postgres, its "fast" shutdown), SIGKILL after a grace period. Every child runs in its own
session and dies with the supervisor even if it is SIGKILLed, so nothing is ever left behind.
Logs: SPENDGATE_DATA_DIR/logs/{broker,postgres,worker,api}.log; the log of a crashed child is
kept as ``<name>.log.1`` when it is restarted.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

from spendgate.adapters.embedded import (
    EmbeddedError,
    ManagedProcess,
    PortInUse,
    ensure_port_free,
    free_port,
    start_broker,
    start_postgres,
)
from spendgate.adapters.kafka import KafkaUnavailable, ensure_topics
from spendgate.settings import Settings
from spendgate.store.migrate import MigrationError, apply_migrations

READY_TIMEOUT_S = 90.0
CHILD_GRACE_S = 10.0
POLL_S = 0.2
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 10.0
STABLE_AFTER_S = 30.0


class DevError(RuntimeError):
    """The dev stack could not start; ``exit_code`` 2 for operator mistakes, 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Stop(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM: unwinds into the cleanup."""


def _echo(message: str) -> None:
    print(message, flush=True)


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    # Ignore repeats: the cleanup is about to run and must not be interrupted.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Stop(signum)


@dataclass
class Backoff:
    """Delay before restarting a crashed child: doubles per crash, resets after a stable run.

    A child that crashes right after every start is retried ever more slowly (never faster
    than every ``max_s``), while one that ran ``stable_after_s`` before dying is retried fast.
    """

    first_s: float = RESTART_FIRST_S
    max_s: float = RESTART_MAX_S
    stable_after_s: float = STABLE_AFTER_S
    _next_s: float | None = None

    def after_exit(self, uptime_s: float) -> float:
        """The delay before the next start of a child that exited after ``uptime_s``."""
        if self._next_s is None or uptime_s >= self.stable_after_s:
            self._next_s = self.first_s
        delay = self._next_s
        self._next_s = min(self.max_s, delay * 2)
        return delay


@dataclass
class _Service:
    """One child of the stack: its process now, how to start it again (None: it cannot be)."""

    proc: ManagedProcess
    restart: Callable[[], ManagedProcess] | None = None
    started_at: float = field(default_factory=time.monotonic)
    backoff: Backoff = field(default_factory=Backoff)
    restart_at: float | None = None
    restarts: int = 0

    @property
    def name(self) -> str:
        return self.proc.name


def _child_env(settings: Settings, bootstrap: str, database_url: str, token: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SPENDGATE_KAFKA_BOOTSTRAP=bootstrap,
        SPENDGATE_DATABASE_URL=database_url,
        SPENDGATE_ADMIN_TOKEN=token,
        SPENDGATE_DEV="1",
        SPENDGATE_API_HOST=settings.api_host,
        SPENDGATE_API_PORT=str(settings.api_port),
        SPENDGATE_TOPIC_PREFIX=settings.topic_prefix,
        SPENDGATE_PARTITIONS=str(settings.partitions),
        SPENDGATE_DATA_DIR=str(settings.data_dir.resolve()),
        PYTHONUNBUFFERED="1",
    )
    return env


def _wait_ready(url: str, children: list[ManagedProcess], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0) as client:
        while True:
            for child in children:
                if not child.alive():
                    raise DevError(
                        f"{child.name} exited with code {child.popen.returncode} while starting;"
                        f" last lines of {child.log_path}:\n{child.log_tail()}"
                    )
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() >= deadline:
                tails = "\n".join(f"--- {c.name} ({c.log_path}):\n{c.log_tail()}" for c in children)
                raise DevError(f"{url} was not 200 within {timeout_s:.0f}s\n{tails}")
            time.sleep(0.25)


def run_dev(settings: Settings, *, keep_db: bool = False) -> int:
    """Start the stack, serve until SIGINT/SIGTERM, stop everything; return the exit code.

    Returns 0 after a signal, 1 when the broker dies (the other children are restarted).
    Raises :class:`DevError` when the stack cannot start (exit_code 2 for a taken port), after
    stopping what did start.
    """
    data_dir = settings.data_dir.resolve()
    logs = data_dir / "logs"
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    token = token or secrets.token_urlsafe(24)
    started: list[_Service] = []
    host = settings.api_host
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            ensure_port_free(settings.api_port, "SPENDGATE_API_PORT", host)
            ensure_port_free(settings.kafka_port, "SPENDGATE_KAFKA_PORT")
            ensure_port_free(settings.worker_web_port, "SPENDGATE_WORKER_WEB_PORT")
        except PortInUse as exc:
            raise DevError(str(exc), 2) from None
        broker_bootstrap, database_url = _start_backends(settings, data_dir, logs, started, keep_db=keep_db)
        env = _child_env(settings, broker_bootstrap, database_url, token)
        children = _spawn_children(env, logs, started)
        api_url = f"http://{host}:{settings.api_port}"
        _echo("waiting for the worker and the API ...")
        _wait_ready(f"{api_url}/readyz", children, READY_TIMEOUT_S)
        _echo(
            "\nspendgate dev is ready\n"
            f"  API:          {api_url}  (OpenAPI: {api_url}/docs)\n"
            f"  Kafka:        {broker_bootstrap}  (topics {settings.topic_prefix}*)\n"
            f"  Postgres:     {database_url}\n"
            f"  admin token:  {token}\n"
            f"  logs:         {logs}\n"
            "A crashed worker, API or Postgres is restarted; Ctrl-C stops everything."
        )
        return _serve(started)
    except _Stop:
        _echo("stopping ...")
        return 0
    except (EmbeddedError, KafkaUnavailable, MigrationError) as exc:
        raise DevError(str(exc), 2 if isinstance(exc, PortInUse) else 1) from None
    finally:
        # Signals stay ignored while stopping: a second Ctrl-C must not orphan anything.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for service in reversed(started):
            service.proc.stop(CHILD_GRACE_S)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_backends(
    settings: Settings, data_dir: Path, logs: Path, started: list[_Service], *, keep_db: bool
) -> tuple[str, str]:
    """Broker, Postgres (restartable), topics and migrations; (bootstrap, database URL)."""
    logs.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pg"
    if not keep_db and pgdata.exists():
        shutil.rmtree(pgdata)
    _echo(f"starting broker on 127.0.0.1:{settings.kafka_port} ...")
    broker = start_broker(settings.kafka_port, logs / "broker.log")
    started.append(_Service(broker.process))
    _echo(f"starting postgres in {pgdata} ...")
    pg_port = free_port()

    def start_pg() -> ManagedProcess:
        return start_postgres(pgdata, pg_port, logs / "postgres.log").process

    pg = start_postgres(pgdata, pg_port, logs / "postgres.log")
    started.append(_Service(pg.process, start_pg))
    database_url = pg.create_database("spendgate")
    live = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap, "database_url": database_url})
    asyncio.run(ensure_topics(live))
    apply_migrations(database_url)
    return broker.bootstrap, database_url


def _spawn_children(env: dict[str, str], logs: Path, started: list[_Service]) -> list[ManagedProcess]:
    """The worker, the API and the notifier, each restarted by ``_serve`` when it crashes."""
    children = []
    for name in ("worker", "api", "notifier"):

        def spawn(name: str = name) -> ManagedProcess:
            return ManagedProcess.spawn(
                name, [sys.executable, "-m", "spendgate.cli", name], logs / f"{name}.log", env=env
            )

        child = spawn()
        started.append(_Service(child, spawn))
        children.append(child)
    return children


def _serve(services: list[_Service]) -> int:
    """Block until a signal (raises _Stop); restart crashed children; return 1 if the broker dies."""
    while True:
        now = time.monotonic()
        for service in services:
            if service.restart_at is None and not service.proc.alive():
                if service.restart is None:
                    _echo(
                        f"{service.name} exited with code {service.proc.popen.returncode}."
                        " THE EMBEDDED BROKER KEEPS EVERYTHING IN MEMORY: every event it held is"
                        " lost and cannot be recovered, so the stack stops now; run `spendgate dev`"
                        f" again to start from empty topics. Last lines of {service.proc.log_path}:\n"
                        f"{service.proc.log_tail()}"
                    )
                    return 1
                _schedule_restart(service, now)
            if service.restart_at is not None and now >= service.restart_at:
                _restart(service)
        time.sleep(POLL_S)


def _schedule_restart(service: _Service, now: float) -> None:
    proc = service.proc
    delay = service.backoff.after_exit(now - service.started_at)
    service.restart_at = now + delay
    tail = proc.log_tail(20)
    proc.stop(CHILD_GRACE_S)  # closes its log, kills stragglers of its process group
    kept = proc.log_path.with_name(proc.log_path.name + ".1")
    try:
        proc.log_path.replace(kept)
    except OSError:
        kept = proc.log_path
    _echo(
        f"{service.name} exited with code {proc.popen.returncode}; restarting it in {delay:g} s"
        f" (restart #{service.restarts + 1}). Last lines of its log (kept in {kept}):\n{tail}"
    )


def _restart(service: _Service) -> None:
    assert service.restart is not None
    service.restarts += 1
    service.started_at = time.monotonic()
    service.restart_at = None
    try:
        service.proc = service.restart()
    except EmbeddedError as exc:
        # Counts as a crash of a run that lasted no time: the next try waits longer.
        _echo(f"{service.name} did not start again: {exc}")
        service.restart_at = time.monotonic() + service.backoff.after_exit(0.0)
        return
    _echo(f"{service.name} restarted (pid {service.proc.pid}, restart #{service.restarts})")
