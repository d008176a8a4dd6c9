"""Stage B's apply (accounting.ledgers.apply_deltas), shared by the worker and replay."""

from __future__ import annotations

from spendgate.accounting.deltas import Delta
from spendgate.accounting.ledgers import Applied, apply_deltas, day_key
from spendgate.domain.ledger import HOT, ScopeLedger

MINUTE = 29_000_000  # an epoch minute
DAY = MINUTE * 60 // 86_400


def test_each_delta_counts_once_and_reports_what_to_write() -> None:
    ledgers: dict[str, ScopeLedger] = {}
    deltas = [Delta("key:k1", 0, 0, 4, {MINUTE: 5}), Delta("team:t1", 0, 0, 4, {MINUTE: 5})]
    first = apply_deltas(ledgers, deltas)
    assert first.applied == 2 and first.touched == {"key:k1": (0, 4), "team:t1": (0, 4)}
    assert set(first.dirty) == {("key:k1", HOT), ("team:t1", HOT)}
    assert [key for key, _ in first.writes()] == ["key:k1", "team:t1"]
    again = apply_deltas(ledgers, [Delta("key:k1", 0, 0, 4, {MINUTE: 5})])  # redelivered
    assert ledgers["key:k1"].total == 5 and again.dirty == {} and again.applied == 1


def test_a_missing_ledger_comes_from_load_and_results_accumulate() -> None:
    loaded = ScopeLedger()
    loaded.apply(0, 9, {MINUTE: 100})
    ledgers: dict[str, ScopeLedger] = {}
    out = Applied()
    apply_deltas(ledgers, [Delta("key:k1", 0, 5, 9, {MINUTE: 1})], lambda scope: loaded, into=out)
    apply_deltas(ledgers, [Delta("key:k1", 0, 10, 10, {MINUTE: 1})], lambda scope: loaded, into=out)
    assert ledgers["key:k1"] is loaded and loaded.total == 101  # offset 9 was already in the record
    assert out.applied == 2 and out.touched == {"key:k1": (0, 10)}


def test_an_old_day_is_written_as_its_own_record() -> None:
    ledgers: dict[str, ScopeLedger] = {}
    later = MINUTE + 3 * 24 * 60  # three days on: the first day leaves the hot record
    out = apply_deltas(ledgers, [Delta("key:k1", 0, 0, 0, {MINUTE: 1}), Delta("key:k1", 0, 1, 1, {later: 1})])
    keys = [key for key, _ in out.writes()]
    assert "key:k1" in keys and day_key("key:k1", DAY) in keys and out.exported
