"""Stage A planning: dedupe by event id, crash replay as per-event deltas, dead letters."""

from __future__ import annotations

import orjson

from spendgate.accounting.deltas import Delta, decode_bundle, encode_bundle
from spendgate.accounting.ingest import RawRecord, plan_batch
from spendgate.domain.ledger import ScopeLedger
from spendgate.domain.registry import RegistryView

TOPIC = "spend.usage"


def raw(
    partition: int, offset: int, event_id: str, cost: str = "1", key: str = "k1", **fields: object
) -> RawRecord:
    body = {
        "event_id": event_id,
        "occurred_at": "2026-11-23T10:00:00Z",
        "key_id": key,
        "cost_usd": cost,
        **fields,
    }
    return RawRecord(partition, offset, orjson.dumps(body), key.encode())


def plan(records, seen=None, progress=None, registry=None):
    seen = seen or {}
    return plan_batch(
        records,
        seen=lambda event_id: seen.get(event_id),  # event id -> (partition, offset)
        progress=progress or {},
        registry=registry or RegistryView(),
        topic=TOPIC,
    )


def key_total(deltas: list[Delta], scope: str = "key:k1") -> int:
    ledger = ScopeLedger()
    for d in deltas:
        if d.scope == scope:
            ledger.apply(d.partition, d.last, d.minutes)
    return ledger.total


def test_a_retried_event_id_at_another_offset_is_dropped_as_duplicate() -> None:
    result = plan([raw(0, 0, "e1"), raw(0, 1, "e1"), raw(0, 2, "e2")])
    assert result.duplicates == 1 and result.events == 2
    assert key_total(result.deltas) == 2_000_000_000


def test_an_event_seen_in_an_earlier_batch_is_a_duplicate() -> None:
    result = plan([raw(0, 5, "e1")], seen={"e1": (0, 3)})
    assert result.duplicates == 1 and result.deltas == []


def test_an_id_seen_at_the_same_offset_of_another_partition_is_a_duplicate() -> None:
    result = plan([raw(1, 3, "e1")], seen={"e1": (0, 3)}, progress={1: 3})
    assert result.duplicates == 1 and result.deltas == []


def test_the_same_event_at_the_same_offset_is_a_replay_not_a_duplicate() -> None:
    result = plan([raw(0, 3, "e1")], seen={"e1": (0, 3)}, progress={0: 3})
    assert result.duplicates == 0 and key_total(result.deltas) == 1_000_000_000


def test_a_record_delivered_twice_in_one_batch_is_planned_once() -> None:
    # Faust can hand the same (partition, offset) over again around a rebalance.
    garbage = RawRecord(0, 5, b"garbage")
    result = plan([raw(0, 3, "e1"), raw(0, 4, "e2"), raw(0, 3, "e1"), garbage, garbage])
    assert result.events == 2 and result.duplicates == 0 and len(result.dead_letters) == 1
    assert key_total(result.deltas) == 2_000_000_000
    assert result.progress == {0: 5}


def test_fresh_events_make_one_delta_per_scope_ending_at_the_batch_end() -> None:
    result = plan([raw(0, 10, "a"), raw(0, 11, "b"), raw(1, 4, "c")])
    key_deltas = sorted((d.partition, d.first, d.last) for d in result.deltas if d.scope == "key:k1")
    assert key_deltas == [(0, 10, 11), (1, 4, 4)]
    assert result.progress == {0: 11, 1: 4}


def test_events_at_or_below_progress_become_one_delta_each() -> None:
    result = plan([raw(0, 10, "a"), raw(0, 11, "b"), raw(0, 12, "c")], progress={0: 11})
    key_deltas = sorted((d.first, d.last) for d in result.deltas if d.scope == "key:k1")
    assert key_deltas == [(10, 10), (11, 11), (12, 12)]
    assert result.progress == {0: 12}


def test_a_crash_after_some_deltas_were_emitted_is_repaired_exactly_by_the_replay() -> None:
    batch = [raw(0, 0, "a", "1", model="m"), raw(0, 1, "b", "2", model="m"), raw(0, 2, "c", "4", model="m")]
    first = plan(batch)
    ledgers = {"key:k1": ScopeLedger(), "model:m": ScopeLedger()}
    landed = next(d for d in first.deltas if d.scope == "key:k1")  # the model delta was lost
    ledgers["key:k1"].apply(landed.partition, landed.last, landed.minutes)
    seen = dict(first.seen_new)
    replay = plan([*batch, raw(0, 3, "d", "8", model="m")], seen=seen, progress=first.progress)
    for d in replay.deltas:
        if d.scope in ledgers:
            ledgers[d.scope].apply(d.partition, d.last, d.minutes)
    assert ledgers["key:k1"].total == ledgers["model:m"].total == 15_000_000_000


def test_invalid_records_are_dead_lettered_with_reasons_and_neighbours_still_count() -> None:
    records = [
        RawRecord(0, 0, b"{not json", b"k1"),
        raw(0, 1, "neg", "-1"),
        RawRecord(0, 2, None, b"k1"),
        raw(0, 3, "ok", "2"),
    ]
    result = plan(records)
    reasons = [letter.error for _, letter in result.dead_letters]
    assert len(reasons) == 3
    assert reasons[0].startswith("invalid JSON") and "negative" in reasons[1] and "empty" in reasons[2]
    assert [letter.offset for _, letter in result.dead_letters] == [0, 1, 2]
    assert key_total(result.deltas) == 2_000_000_000


def test_request_events_are_remembered_but_charge_nothing() -> None:
    result = plan([raw(0, 0, "r1", kind="request", cost_usd=None)])
    assert result.events == 1 and result.deltas == [] and "r1" in result.seen_new


def test_delta_bundle_round_trip() -> None:
    deltas = [
        Delta("model:openai%2Fgpt-4o", 3, 10, 12, {29_000_000: 5, 29_000_001: 7}),
        Delta("k", 0, 1, 1),
        Delta("key:one-bucket", 1, 4, 9, {29_000_002: 11}),  # the decoder's common shape
        Delta("key:one-bucket-and-a-hold", 1, 4, 9, {29_000_002: 11}, [["h1", 5, 1_000]]),
        Delta("key:a-hold-only", 2, 4, 4, {}, [["h1"]]),
    ]
    decoded = decode_bundle(encode_bundle(deltas))
    assert decoded == deltas
    decoded[2].add(29_000_003, 1)  # a decoded delta owns its buckets
    assert deltas[2].minutes == {29_000_002: 11}
