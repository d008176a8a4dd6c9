"""worker.memory_store: a kept changelog partition resumes recovery; one that left starts over."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from faust.types import TP

from spendgate.settings import Settings
from spendgate.worker.faust_app import make_app
from spendgate.worker.memory_store import Store

CHANGELOG = "w-ledger-changelog"


def store(tmp_path: Path) -> Store:
    settings = Settings(kafka_bootstrap="127.0.0.1:1", database_url="", data_dir=tmp_path, worker_web_port=0)
    table = make_app(settings).Table("ledger", partitions=4, key_type=str)
    assert isinstance(table.data, Store)  # make_app maps memory:// to this store
    return table.data


def record(partition: int, offset: int, key: str, value: object) -> SimpleNamespace:
    tp = TP(CHANGELOG, partition)
    return SimpleNamespace(
        key=key, value=value, message=SimpleNamespace(tp=tp, partition=partition, offset=offset, value=b"x")
    )


async def test_kept_partitions_resume_after_what_they_hold_and_lost_ones_start_over(tmp_path: Path) -> None:
    s = store(tmp_path)
    p0, p1 = TP(CHANGELOG, 0), TP(CHANGELOG, 1)
    assert s.persisted_offset(p0) is None  # never recovered: from the start, as Faust's store
    s.apply_changelog_batch(
        [record(0, 5, "a", 1), record(0, 9, "b", 2), record(1, 3, "c", 3)], str, lambda v: v
    )
    assert (s.persisted_offset(p0), s.persisted_offset(p1)) == (9, 3)
    s.set_persisted_offset(p0, 12)  # an acknowledged write of this process
    s.set_persisted_offset(p0, 11)  # acks may complete out of order: never moves back
    assert s.persisted_offset(p0) == 12 and s.data["b"] == 2

    await s.on_rebalance(assigned={p0}, revoked={p1}, newly_assigned=set())
    assert s.persisted_offset(p0) == 12  # kept: recovery reads only what others wrote since
    assert s.persisted_offset(p1) is None  # left

    s.set_persisted_offset(p1, 7)  # stale bookkeeping must not survive coming back
    await s.on_rebalance(assigned={p0, p1}, revoked=set(), newly_assigned={p1})
    assert s.persisted_offset(p1) is None and s.persisted_offset(p0) == 12
