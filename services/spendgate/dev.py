"""``spendgate dev``: the whole stack on one machine, as child processes of one supervisor.

Order of start (each step waits for the previous one to be usable):

1. check that the API, broker and worker web ports are free (else a one-line error, exit 2);
2. Tansu broker (in memory) on 127.0.0.1:SPENDGATE_KAFKA_PORT;
3. Postgres over SPENDGATE_DATA_DIR/pg on a free port (wiped first unless ``keep_db``);
4. topics (:func:`ensure_topics`) and migrations (:func:`apply_migrations`);
5. ``spendgate worker`` and ``spendgate api`` (same interpreter), then wait for /readyz = 200.

SIGINT or SIGTERM stops the children in reverse order (api and worker, then broker and
Postgres): SIGTERM (SIGINT for Postgres, its "fast" shutdown), SIGKILL after a grace period.
Every child runs in its own session and dies with the supervisor even if it is SIGKILLed, so
nothing is ever left behind. Logs: SPENDGATE_DATA_DIR/logs/{broker,postgres,worker,api}.log.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import sys
import time
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
                tails = "\n".join(
                    f"--- {c.name} ({c.log_path}):\n{c.log_tail()}" for c in children
                )
                raise DevError(f"{url} was not 200 within {timeout_s:.0f}s\n{tails}")
            time.sleep(0.25)


def run_dev(settings: Settings, *, keep_db: bool = False) -> int:
    """Start the stack, serve until SIGINT/SIGTERM, stop everything; return the exit code.

    Returns 0 after a signal, 1 when a child dies on its own. Raises :class:`DevError` when
    the stack cannot start (exit_code 2 for a taken port), after stopping what did start.
    """
    data_dir = settings.data_dir.resolve()
    logs = data_dir / "logs"
    token = settings.admin_token.get_secret_value() if settings.admin_token else ""
    token = token or secrets.token_urlsafe(24)
    started: list[ManagedProcess] = []
    host = settings.api_host
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            ensure_port_free(settings.api_port, "SPENDGATE_API_PORT", host)
            ensure_port_free(settings.kafka_port, "SPENDGATE_KAFKA_PORT")
            ensure_port_free(settings.worker_web_port, "SPENDGATE_WORKER_WEB_PORT")
        except PortInUse as exc:
            raise DevError(str(exc), 2) from None
        logs.mkdir(parents=True, exist_ok=True)
        pgdata = data_dir / "pg"
        if not keep_db and pgdata.exists():
            shutil.rmtree(pgdata)

        _echo(f"starting broker on 127.0.0.1:{settings.kafka_port} ...")
        broker = start_broker(settings.kafka_port, logs / "broker.log")
        started.append(broker.process)
        _echo(f"starting postgres in {pgdata} ...")
        pg = start_postgres(pgdata, free_port(), logs / "postgres.log")
        started.append(pg.process)
        database_url = pg.create_database("spendgate")

        live = settings.model_copy(
            update={"kafka_bootstrap": broker.bootstrap, "database_url": database_url}
        )
        asyncio.run(ensure_topics(live))
        apply_migrations(database_url)

        env = _child_env(settings, broker.bootstrap, database_url, token)
        children = []
        for name in ("worker", "api"):
            child = ManagedProcess.spawn(
                name,
                [sys.executable, "-m", "spendgate.cli", name],
                logs / f"{name}.log",
                env=env,
            )
            started.append(child)
            children.append(child)

        api_url = f"http://{host}:{settings.api_port}"
        _echo("waiting for the worker and the API ...")
        _wait_ready(f"{api_url}/readyz", children, READY_TIMEOUT_S)
        _echo(
            "\nspendgate dev is ready\n"
            f"  API:          {api_url}  (OpenAPI: {api_url}/docs)\n"
            f"  Kafka:        {broker.bootstrap}  (topics {settings.topic_prefix}*)\n"
            f"  Postgres:     {database_url}\n"
            f"  admin token:  {token}\n"
            f"  logs:         {logs}\n"
            "Ctrl-C stops everything."
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
        for proc in reversed(started):
            proc.stop(CHILD_GRACE_S)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve(started: list[ManagedProcess]) -> int:
    """Block until a signal (raises _Stop) or until a child exits on its own (returns 1)."""
    while True:
        for proc in started:
            if not proc.alive():
                _echo(
                    f"{proc.name} exited with code {proc.popen.returncode}; stopping the stack."
                    f" Last lines of {proc.log_path}:\n{proc.log_tail()}"
                )
                return 1
        time.sleep(0.5)
