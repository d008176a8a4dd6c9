"""worker.bulk_recovery: changelog records are applied a fetch at a time, Faust's start offsets
move with them, and whatever the bulk read leaves is left to Faust's own recovery."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from faust.types import TP

from spendgate.worker import bulk_recovery

CHANGELOG = "w-ledger-changelog"


class FakeConsumer:
    """Serves each partition's records from its sought position, ``per_fetch`` at a time."""

    def __init__(
        self, logs: dict[int, list[tuple[int, bytes]]], per_fetch: int, on_fetch: Any = None
    ) -> None:
        self.logs, self.per_fetch, self.on_fetch = logs, per_fetch, on_fetch
        self.position: dict[TopicPartition, int] = {}
        self.stopped = False

    async def start(self) -> None: ...

    async def stop(self) -> None:
        self.stopped = True

    def assign(self, tps: list[TopicPartition]) -> None:
        self.position = dict.fromkeys(tps, 0)

    async def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.position[tp] = 0

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position[tp] = offset

    async def getmany(self, *tps: TopicPartition, timeout_ms: int, max_records: int) -> dict:
        if self.on_fetch is not None:
            self.on_fetch()
        out = {}
        for tp in tps:
            records = [
                SimpleNamespace(offset=o, value=v)
                for o, v in self.logs[tp.partition]
                if o >= self.position[tp]
            ][: self.per_fetch]
            if records:
                out[tp] = records
                self.position[tp] = records[-1].offset + 1
        return out


class FakeTable:
    def __init__(self, on_changelog_event: Any = None) -> None:
        self._on_changelog_event = on_changelog_event
        self.applied: list[tuple[int, int, bytes]] = []
        self.changelog_topic = SimpleNamespace(decode=self._decode)

    async def _decode(self, message: Any, *, propagate: bool) -> Any:
        assert propagate
        return SimpleNamespace(key=None, value=message.value, message=message)

    def apply_changelog_batch(self, events: list[Any]) -> None:
        self.applied += [(e.message.tp.partition, e.message.offset, e.value) for e in events]


def recovery(tables: dict[TP, FakeTable], offsets: dict[TP, int | None], highwaters: dict[TP, int]) -> Any:
    app = SimpleNamespace(
        consumer_generation_id=3,
        in_transaction=False,
        conf=SimpleNamespace(broker_request_timeout=30.0),
        consumer=SimpleNamespace(
            _to_message=lambda tp, r: SimpleNamespace(tp=tp, offset=r.offset, value=r.value)
        ),
    )
    return SimpleNamespace(
        app=app, tp_to_table=tables, active_offsets=Counter(offsets), active_highwaters=Counter(highwaters)
    )


@pytest.fixture
def logs() -> dict[int, list[tuple[int, bytes]]]:
    return {0: [(o, b"a%d" % o) for o in range(10)], 1: [(o, b"b%d" % o) for o in range(4)]}


async def test_records_up_to_the_high_watermark_are_applied_and_faust_starts_after_them(
    monkeypatch: pytest.MonkeyPatch, logs: dict[int, list[tuple[int, bytes]]]
) -> None:
    consumer = FakeConsumer(logs, per_fetch=3)
    monkeypatch.setattr(bulk_recovery, "_consumer", lambda app: consumer)
    p0, p1 = TP(CHANGELOG, 0), TP(CHANGELOG, 1)
    table = FakeTable()
    # p0: never recovered (from its first record); p1: holds up to offset 1 already
    r = recovery({p0: table, p1: table}, {p0: None, p1: 1}, {p0: 9, p1: 3})
    assert await bulk_recovery.read_in_bulk(r, {p0, p1}) == 12
    assert [(p, o) for p, o, _ in table.applied if p == 0] == [(0, o) for o in range(10)]
    assert [(p, o) for p, o, _ in table.applied if p == 1] == [(1, 2), (1, 3)]
    assert dict(r.active_offsets) == {p0: 9, p1: 3}  # Faust's recovery: nothing left to read
    assert consumer.stopped


async def test_a_rebalance_stops_it_with_the_offsets_matching_what_was_applied(
    monkeypatch: pytest.MonkeyPatch, logs: dict[int, list[tuple[int, bytes]]]
) -> None:
    p0 = TP(CHANGELOG, 0)
    table = FakeTable()
    r = recovery({p0: table}, {p0: None}, {p0: 9})
    fetches = 0

    def on_fetch() -> None:
        nonlocal fetches
        fetches += 1
        if fetches == 2:  # a new generation starts while the second fetch is under way
            r.app.consumer_generation_id = 4

    consumer = FakeConsumer(logs, per_fetch=3, on_fetch=on_fetch)
    monkeypatch.setattr(bulk_recovery, "_consumer", lambda app: consumer)
    assert await bulk_recovery.read_in_bulk(r, {p0}) == 3
    assert [o for _, o, _ in table.applied] == [0, 1, 2] and r.active_offsets[p0] == 2
    assert consumer.stopped


async def test_partitions_at_their_end_and_tables_with_a_changelog_callback_are_left_to_faust(
    monkeypatch: pytest.MonkeyPatch, logs: dict[int, list[tuple[int, bytes]]]
) -> None:
    def no_consumer(app: Any) -> Any:
        raise AssertionError("nothing to read in bulk")

    monkeypatch.setattr(bulk_recovery, "_consumer", no_consumer)
    p0, p1 = TP(CHANGELOG, 0), TP(CHANGELOG, 1)
    r = recovery(
        {p0: FakeTable(), p1: FakeTable(on_changelog_event=print)}, {p0: 9, p1: None}, {p0: 9, p1: 3}
    )
    assert await bulk_recovery.read_in_bulk(r, {p0, p1}) == 0
    assert dict(r.active_offsets) == {p0: 9, p1: None}


class HangingConsumer(FakeConsumer):
    """Serves one fetch, then waits forever (a broker that stopped answering)."""

    async def getmany(self, *tps: TopicPartition, timeout_ms: int, max_records: int) -> dict:
        if self.served:
            await asyncio.Event().wait()
        self.served = True
        return await super().getmany(*tps, timeout_ms=timeout_ms, max_records=max_records)

    served = False


async def test_a_broker_that_stops_answering_leaves_the_rest_to_faust_within_the_budget(
    monkeypatch: pytest.MonkeyPatch, logs: dict[int, list[tuple[int, bytes]]]
) -> None:
    """Faust times its recovery step out after ``broker_request_timeout``: the bulk read gives
    up well before, keeping what it applied."""
    consumer = HangingConsumer(logs, per_fetch=4)
    monkeypatch.setattr(bulk_recovery, "_consumer", lambda app: consumer)
    p0 = TP(CHANGELOG, 0)
    table = FakeTable()
    r = recovery({p0: table}, {p0: None}, {p0: 9})
    r.app.conf.broker_request_timeout = 0.2
    assert await bulk_recovery.read_in_bulk(r, {p0}) == 4
    assert r.active_offsets[p0] == 3 and consumer.stopped


async def test_a_kafka_error_leaves_the_rest_to_faust(
    monkeypatch: pytest.MonkeyPatch, logs: dict[int, list[tuple[int, bytes]]]
) -> None:
    consumer = FakeConsumer(logs, per_fetch=4)

    async def refuse() -> None:
        raise KafkaConnectionError("no broker")

    consumer.start = refuse  # type: ignore[method-assign]
    monkeypatch.setattr(bulk_recovery, "_consumer", lambda app: consumer)
    p0 = TP(CHANGELOG, 0)
    r = recovery({p0: FakeTable()}, {p0: None}, {p0: 9})
    assert await bulk_recovery.read_in_bulk(r, {p0}) == 0
    assert r.active_offsets[p0] is None and consumer.stopped
