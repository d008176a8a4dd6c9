"""SeenIds (the in-memory index of counted event ids, its records, expiry) and the worker's GC setup."""

from __future__ import annotations

from pathlib import Path

from spendgate.accounting.seen import SeenIds
from spendgate.settings import Settings

HOUR = 3600.0


def test_remembered_ids_are_found_with_their_partition_and_offset() -> None:
    seen = SeenIds(24 * HOUR)
    key, record = seen.remember(2, {"a": 7, "b": 9}, now=100.0)
    assert key == "2/7" and record == {"t": 100.0, "ids": [["a", 7], ["b", 9]]}
    assert seen.where("a") == (2, 7) and seen.where("b") == (2, 9) and seen.where("c") is None
    assert seen.remember(2, {"a": 7}, now=101.0) is None  # nothing new: no record to write


def test_a_reload_from_the_table_restores_only_that_partitions_records() -> None:
    items = [("1/5", {"t": 10.0, "ids": [["x", 5]]}), ("2/3", {"t": 11.0, "ids": [["y", 3]]})]
    seen = SeenIds(24 * HOUR)
    seen.load(1, items)
    assert seen.is_loaded(1) and not seen.is_loaded(2)
    assert seen.where("x") == (1, 5) and seen.where("y") is None


def test_records_older_than_the_horizon_expire_with_their_ids() -> None:
    seen = SeenIds(HOUR)
    seen.remember(0, {"old": 1}, now=0.0)
    seen.remember(0, {"new": 2}, now=HOUR)
    assert seen.expire(0, now=HOUR + 1) == ["0/1"]
    assert seen.where("old") is None and seen.where("new") == (0, 2)


def test_the_worker_starts_a_new_index_after_every_rebalance(tmp_path: Path) -> None:
    """A partition that comes back after another worker owned it must be reloaded from the table."""
    from spendgate.worker.app import Worker
    from spendgate.worker.faust_app import make_app

    settings = Settings(kafka_bootstrap="127.0.0.1:1", data_dir=tmp_path, worker_web_port=0)
    app = make_app(settings)  # touches no network
    worker = Worker(settings, app)
    app.consumer_generation_id = 1
    worker._forget_seen_ids_after_a_rebalance()
    worker.seen_ids.remember(0, {"e1": 4}, now=0.0)
    worker._forget_seen_ids_after_a_rebalance()  # same generation: kept
    assert worker.seen_ids.where("e1") == (0, 4)
    app.consumer_generation_id = 2
    worker._forget_seen_ids_after_a_rebalance()
    assert worker.seen_ids.where("e1") is None and not worker.seen_ids.is_loaded(0)


def test_tune_gc_freezes_the_start_up_heap_and_raises_the_thresholds() -> None:
    import gc

    from spendgate.worker.main import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
