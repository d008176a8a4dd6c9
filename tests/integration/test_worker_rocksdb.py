"""The worker with ``SPENDGATE_WORKER_STORE=rocksdict://`` against the real broker.

Same checks as ``test_worker.py`` (exact totals, SIGKILL/restart, duplicates, two workers),
with the tables in RocksDB: every worker process has its own ``data_dir`` (RocksDB locks its
databases), and a restarted worker reuses its directory, so it resumes from the offsets it
persisted instead of replaying the changelogs.
"""

from __future__ import annotations

import asyncio
import random
import re
from pathlib import Path

import pytest
from tests.integration.test_worker import (
    KEYS,
    TEAM_ORG,
    expected_totals,
    make_events,
    register,
    totals_from_state,
)
from tests.kafka_helpers import ServiceProcess, eventually, group_offsets, latest, produce, running_services

from spendgate.settings import Settings

pytest.importorskip("rocksdict")


@pytest.fixture
def rocks_worker(tmp_path: Path):
    """``rocks_worker(settings, name, data="a")``: a worker on the rocksdict store.

    ``data`` names its data_dir (``tmp_path/data-<data>``): reuse it to restart "the same" worker.
    """
    with running_services(tmp_path) as start:

        def make(settings: Settings, name: str, data: str = "a") -> ServiceProcess:
            data_dir = str(tmp_path / f"data-{data}")
            store = "rocksdict://"
            return start("worker", settings, name, SPENDGATE_WORKER_STORE=store, SPENDGATE_DATA_DIR=data_dir)

        yield make


def tables_dir(tmp_path: Path, data: str) -> Path:
    return tmp_path / f"data-{data}" / "faust" / "v1" / "tables"


def mark_dirty(path: Path) -> None:
    import rocksdict

    from spendgate.worker.rocks_store import DIRTY_KEY

    db = rocksdict.Rdict(str(path), options=rocksdict.Options(raw_mode=True))
    db.put(DIRTY_KEY, b"1")
    db.close()


async def assert_exact(settings: Settings, expected: dict, worker: ServiceProcess) -> None:
    totals = totals_from_state(await latest(settings, "state"))
    wrong = {s: (totals.get(s), v) for s, v in expected.items() if totals.get(s) != v}
    if wrong:
        offsets = await group_offsets(settings)
        raise AssertionError(
            f"{len(wrong)} scopes differ, e.g. {list(wrong.items())[:3]}\n{offsets}\n{worker.log()}"
        )


async def test_rocksdb_events_fan_out_with_exact_sums(settings_factory, rocks_worker, tmp_path: Path) -> None:
    settings = await settings_factory(database_url="")
    await register(settings, KEYS, TEAM_ORG)
    events = make_events(random.Random(7), 3000)
    worker = rocks_worker(settings, "worker")
    await produce(settings, "usage", [(str(e["key_id"]), e) for e in events])
    expected = expected_totals(events)
    await eventually(lambda: assert_exact(settings, expected, worker), timeout=60)
    names = {p.name for p in tables_dir(tmp_path, "a").iterdir()}
    assert {f"{t}-{p}.db" for t in ("seen", "progress", "ledger") for p in range(4)} <= names


async def test_rocksdb_sigkill_restarts_keep_exact_totals_and_dedupe(
    settings_factory, rocks_worker, tmp_path: Path
) -> None:
    settings = await settings_factory(database_url="")
    await register(settings, KEYS, TEAM_ORG)
    events = make_events(random.Random(11), 4000)
    expected = expected_totals(events)
    worker = rocks_worker(settings, "w1")
    chunks = [events[i : i + 500] for i in range(0, len(events), 500)]
    for i, chunk in enumerate(chunks):
        await produce(settings, "usage", [(str(e["key_id"]), e) for e in chunk])
        if i % 3 == 1:  # SIGKILL mid-stream; the restart reuses the same data_dir
            await eventually(lambda: _any_state(settings), timeout=30)
            worker.kill()
            worker = rocks_worker(settings, f"w{i}")
    await eventually(lambda: assert_exact(settings, expected, worker), timeout=90)
    # Every event again, from the gateway's retries, after the restarts: nothing may change.
    await produce(settings, "usage", [(str(e["key_id"]), e) for e in events])
    worker.kill()  # ... and once more with these in flight
    # As if it had died between a local write and the changelog's ack: the worker must drop
    # these databases and recover them from the changelog (rocks_store's dirty mark).
    for name in ("ledger-0.db", "seen-1.db", "progress-1.db"):
        mark_dirty(tables_dir(tmp_path, "a") / name)
    worker = rocks_worker(settings, "last")
    await produce(settings, "usage", [(str(e["key_id"]), e) for e in events[:500]])
    await eventually(lambda: assert_exact(settings, expected, worker), timeout=90)
    # the duplicates were processed (not just not yet read) before this check passes
    await eventually(lambda: _consumed_all(settings, worker), timeout=60)
    await asyncio.sleep(2)  # time for stage B and the state timer to show a wrong count
    await assert_exact(settings, expected, worker)
    # The three marked databases were rebuilt; others may be too, when the SIGKILL above caught
    # their writes in flight (that is the guard working, so the count is not fixed).
    rebuilt = set(re.findall(r"(\w+): partition (\d+) has writes", worker.log_path.read_text()))
    assert {("ledger", "0"), ("seen", "1"), ("progress", "1")} <= rebuilt, rebuilt


async def test_rocksdb_two_workers_and_a_restarted_one_give_the_same_totals(
    settings_factory, rocks_worker
) -> None:
    settings = await settings_factory(database_url="")
    await register(settings, KEYS, TEAM_ORG)
    events = make_events(random.Random(3), 3000)
    expected = expected_totals(events)
    rocks_worker(settings, "a", data="a")
    b = rocks_worker(settings, "b", data="b")
    await produce(settings, "usage", [(str(e["key_id"]), e) for e in events[:1500]])
    await eventually(lambda: _any_state(settings), timeout=30)
    b.kill()  # a takes every partition over, then b (same data_dir) takes its share back
    await produce(settings, "usage", [(str(e["key_id"]), e) for e in events[1500:]])
    b = rocks_worker(settings, "b2", data="b")
    await produce(settings, "usage", [(str(e["key_id"]), e) for e in events[:1000]])  # duplicates
    await eventually(lambda: assert_exact(settings, expected, b), timeout=120)
    await eventually(lambda: _consumed_all(settings, b), timeout=60)
    await asyncio.sleep(2)
    await assert_exact(settings, expected, b)


async def _any_state(settings: Settings) -> None:
    assert await latest(settings, "state")


async def _consumed_all(settings: Settings, worker: ServiceProcess) -> None:
    """The worker group committed every usage offset (so every duplicate was planned)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from spendgate.adapters.watermarks import fetch_high_watermarks

    topic = settings.topic("usage")
    ends = await fetch_high_watermarks(settings.kafka_bootstrap, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"w-{settings.topic_prefix.strip('.')}",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        committed = {p: await consumer.committed(TopicPartition(topic, p)) for p in ends}
    finally:
        await consumer.stop()
    assert all((committed[p] or 0) >= end for p, end in ends.items()), (committed, ends)
