"""domain.ledger.ScopeLedger: exact window sums, idempotent per record, crash-safe, cached right."""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.domain.ledger import (
    DAY,
    DAY_RETENTION,
    HOT,
    MINUTE_RETENTION,
    DayRecord,
    HotRecord,
    ScopeLedger,
    minute_charges,
)
from spendgate.domain.money import MAX_COST_NANOS, NANOS_PER_USD, to_decimal
from spendgate.domain.windows import TOTAL, Unit, WindowSpec, window_bounds

ZONES = ["UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu", "Australia/Lord_Howe", "Europe/London"]
BASE = int(datetime(2026, 1, 1, tzinfo=UTC).timestamp())
SPAN = 400 * DAY  # covers both New York changes of 2026 and Lord Howe's

Event = tuple[int, int]  # (occurred_at epoch seconds, nanos)
Delta = tuple[int, int, dict[int, int]]  # (partition, last offset, minute -> nanos)


def brute(events: Iterable[Event], start: int | None = None, end: int | None = None) -> Decimal:
    """The reference: an exact Decimal sum of the events in [start, end)."""
    return sum(
        (
            Decimal(n) / NANOS_PER_USD
            for t, n in events
            if (start is None or start <= t) and (end is None or t < end)
        ),
        Decimal(0),
    )


def ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc, arg-type]


def snapshot(ledger: ScopeLedger) -> tuple[str, dict[int, str]]:
    """What the worker persists, as it persists it (JSON text per record)."""
    return json.dumps(ledger.hot.to_json()), {d: json.dumps(r.to_json()) for d, r in ledger.days.items()}


def restore(hot: str, days: dict[int, str]) -> ScopeLedger:
    return ScopeLedger(
        HotRecord.from_json(json.loads(hot)), {d: DayRecord.from_json(json.loads(r)) for d, r in days.items()}
    )


@st.composite
def histories(draw: st.DrawFn, span: int = SPAN, max_events: int = 40) -> tuple[list[Event], list[Delta]]:
    """Random events, spread over source partitions, cut into deltas, interleaved across partitions.

    Offsets grow per partition with gaps (stage A drops duplicates); within a partition the
    deltas are in offset order, as stage B receives them.
    """
    base = draw(st.integers(BASE, BASE + 30 * DAY))
    events = draw(
        st.lists(
            st.tuples(st.integers(base, base + span), st.integers(0, MAX_COST_NANOS // 1000)),
            max_size=max_events,
        )
    )
    partitions = draw(st.integers(1, 3))
    by_partition: dict[int, list[Event]] = {p: [] for p in range(partitions)}
    for event in events:
        by_partition[draw(st.integers(0, partitions - 1))].append(event)
    chunks: dict[int, list[Delta]] = {}
    for p, evs in by_partition.items():
        offset = draw(st.integers(0, 10))
        chunks[p] = []
        i = 0
        while i < len(evs):
            size = draw(st.integers(1, len(evs) - i))
            offset += size + draw(st.integers(0, 3))
            chunks[p].append((p, offset - 1, minute_charges(evs[i : i + size])))
            i += size
    order = draw(st.permutations([p for p, ch in chunks.items() for _ in ch]))
    cursors = {p: iter(ch) for p, ch in chunks.items()}
    return events, [next(cursors[p]) for p in order]


quarter_specs = st.one_of(
    st.builds(WindowSpec, st.integers(1, 48), st.just(Unit.HOUR)),
    st.builds(WindowSpec, st.integers(1, 14), st.sampled_from([Unit.DAY, Unit.WEEK])),
    st.builds(WindowSpec, st.integers(1, 3), st.just(Unit.MONTH)),
    st.builds(WindowSpec, st.integers(1, 8).map(lambda k: 15 * k), st.just(Unit.MINUTE)),
)
zones = st.sampled_from(ZONES).map(ZoneInfo)


# --- exact sums ---------------------------------------------------------------------------


@given(
    histories(),
    st.lists(st.tuples(quarter_specs, zones, st.integers(BASE, BASE + SPAN + 30 * DAY)), max_size=8),
)
@settings(max_examples=300, deadline=None)
def test_spend_in_any_window_equals_the_exact_sum_of_its_events(
    history: tuple[list[Event], list[Delta]], queries: list[tuple[WindowSpec, ZoneInfo, int]]
) -> None:
    events, deltas = history
    ledger = ScopeLedger()
    for p, last, minutes in deltas:
        ledger.apply(p, last, minutes)
    assert to_decimal(ledger.total) == brute(events)
    assert to_decimal(ledger.spend(TOTAL, ZoneInfo("UTC"), BASE).nanos) == brute(events)
    for spec, tz, now in queries:
        start, end = window_bounds(spec, now, tz)
        got = ledger.spend(spec, tz, now)
        assert (got.start, got.resets_at) == (start, end)
        assert to_decimal(got.nanos) == brute(events, start, end), (spec, tz.key, now)


@given(histories(), st.tuples(quarter_specs, zones), st.data())
@settings(max_examples=200, deadline=None)
def test_cached_window_spend_stays_exact_as_deltas_arrive(
    history: tuple[list[Event], list[Delta]], window: tuple[WindowSpec, ZoneInfo], data: st.DataObject
) -> None:
    """Query between deltas (filling the cache), at moving clocks that roll windows over."""
    events, deltas = history
    spec, tz = window
    ledger = ScopeLedger()
    applied: list[Event] = []
    clock = BASE
    for p, last, minutes in deltas:
        ledger.apply(p, last, minutes)
        applied.extend((m * 60, n) for m, n in minutes.items())
        clock = data.draw(st.sampled_from([clock, clock + 3600, *[m * 60 for m in minutes]]))
        start, end = window_bounds(spec, clock, tz)
        assert to_decimal(ledger.spend(spec, tz, clock).nanos) == brute(applied, start, end)


@given(histories(span=MINUTE_RETENTION * 60 - 60), st.integers(1, 60), zones, st.data())
@settings(max_examples=200, deadline=None)
def test_minute_windows_are_exact_within_the_minute_retention(
    history: tuple[list[Event], list[Delta]], n: int, tz: ZoneInfo, data: st.DataObject
) -> None:
    events, deltas = history
    ledger = ScopeLedger()
    for p, last, minutes in deltas:
        ledger.apply(p, last, minutes)
    if not events:
        return
    now = data.draw(st.integers(min(t for t, _ in events), max(t for t, _ in events)))
    spec = WindowSpec(n, Unit.MINUTE)
    start, end = window_bounds(spec, now, tz)
    assert to_decimal(ledger.spend(spec, tz, now).nanos) == brute(events, start, end)
    assert to_decimal(ledger.sum_between(start, end)) == brute(events, start, end)


@given(histories(span=3 * DAY), st.data())
@settings(max_examples=200, deadline=None)
def test_sum_between_quarter_hours_is_exact(
    history: tuple[list[Event], list[Delta]], data: st.DataObject
) -> None:
    events, deltas = history
    ledger = ScopeLedger()
    for p, last, minutes in deltas:
        ledger.apply(p, last, minutes)
    lo = data.draw(st.integers((BASE - DAY) // 900, (BASE + 35 * DAY) // 900)) * 900
    hi = lo + data.draw(st.integers(0, 4 * 96 * 10)) * 900
    assert to_decimal(ledger.sum_between(lo, hi)) == brute(events, lo, hi)


# --- idempotence and crashes ----------------------------------------------------------------


@given(histories(), st.data())
@settings(max_examples=200, deadline=None)
def test_reapplying_any_already_applied_delta_changes_nothing(
    history: tuple[list[Event], list[Delta]], data: st.DataObject
) -> None:
    events, deltas = history
    ledger = ScopeLedger()
    for i, (p, last, minutes) in enumerate(deltas):
        ledger.apply(p, last, minutes)
        before = snapshot(ledger)
        same_partition = [d for d in deltas[: i + 1] if d[0] == p]
        for again in data.draw(st.lists(st.sampled_from(same_partition), max_size=3)):
            assert ledger.apply(*again) == []
            assert snapshot(ledger) == before
    assert to_decimal(ledger.total) == brute(events)


def test_redelivered_delta_with_lower_last_offset_is_ignored() -> None:
    ledger = ScopeLedger()
    ledger.apply(0, 10, {ts(2026, 5, 1) // 60: 5})
    assert ledger.apply(0, 7, {ts(2026, 5, 1) // 60: 5}) == []
    assert ledger.total == 5


def test_same_offsets_from_another_partition_are_counted() -> None:
    ledger = ScopeLedger()
    ledger.apply(0, 10, {ts(2026, 5, 1) // 60: 5})
    ledger.apply(1, 10, {ts(2026, 5, 1) // 60: 7})
    assert ledger.total == 12


def test_apply_reports_the_records_it_changed() -> None:
    ledger = ScopeLedger()
    day1, day2 = ts(2026, 5, 1, 23, 59), ts(2026, 5, 2, 0, 1)
    assert ledger.apply(0, 1, minute_charges([(day1, 1), (day2, 2)])) == [HOT]  # both days are hot
    day4 = ts(2026, 5, 4, 12)
    assert sorted(ledger.apply(0, 2, minute_charges([(day4, 4)]))) == [HOT, day1 // DAY, day2 // DAY]
    assert ledger.apply(0, 3, minute_charges([(day1, 8)])) == [HOT, day1 // DAY]  # late: day record
    assert ledger.quarters(day1 // DAY) == {95: 9} and ledger.quarters(day4 // DAY) == {48: 4}


def test_a_delta_of_the_current_day_changes_only_the_hot_record() -> None:
    ledger = ScopeLedger()
    t = ts(2026, 5, 1, 10)
    for i in range(5):
        assert ledger.apply(0, i, {t // 60 + i: 1}) == [HOT]
    assert ledger.days == {} and ledger.quarters(t // DAY) == {40: 5}


def test_exported_day_keeps_its_hot_copy_until_settled() -> None:
    """Day record written, hot record not (or the reverse): the day is counted exactly once."""
    t = ts(2026, 5, 1, 10)
    ledger = ScopeLedger()
    ledger.apply(0, 1, {t // 60: 100})
    hot0, days0 = snapshot(ledger)
    delta = (0, 2, {(t + 2 * DAY) // 60: 10})
    assert sorted(ledger.apply(*delta)) == [HOT, t // DAY]
    hot1, days1 = snapshot(ledger)
    assert json.loads(hot1)["d"].keys() == {str(t // DAY), str(t // DAY + 2)}  # hot copy kept
    for hot, days in ((hot1, days0), (hot0, days1), (hot1, days1)):
        recovered = restore(hot, days)
        recovered.apply(*delta)
        assert recovered.sum_between(t - DAY, t + 3 * DAY) == 110 == recovered.total
        assert recovered.quarters(t // DAY) == {40: 100}
    ledger.settle()
    assert json.loads(snapshot(ledger)[0])["d"].keys() == {str(t // DAY + 2)}
    assert ledger.sum_between(t - DAY, t + 3 * DAY) == 110


@given(histories(span=5 * DAY, max_events=25), st.data())
@settings(max_examples=300, deadline=None)
def test_crash_between_record_writes_is_repaired_by_replaying_the_delta(
    history: tuple[list[Event], list[Delta]], data: st.DataObject
) -> None:
    """Apply a delta, persist only some of the records it changed, reload, replay it: exact."""
    events, deltas = history
    if not deltas:
        return
    crash_at = data.draw(st.integers(0, len(deltas) - 1))
    ledger = ScopeLedger()
    for d in deltas[:crash_at]:
        ledger.apply(*d)
        if data.draw(st.booleans()):  # the worker settles once a batch's writes are durable
            ledger.settle()
    hot0, days0 = snapshot(ledger)
    dirty = ledger.apply(*deltas[crash_at])
    hot1, days1 = snapshot(ledger)
    written = set(data.draw(st.lists(st.sampled_from(dirty), unique=True))) if dirty else set()
    days = dict(days0)
    for rid in written - {HOT}:
        days[rid] = days1[rid]
    recovered = restore(hot1 if HOT in written else hot0, days)
    for d in deltas[crash_at:]:  # the stage B consumer restarts from its committed offset
        recovered.apply(*d)
    assert to_decimal(recovered.total) == brute(events)
    reference = ScopeLedger()
    for d in deltas:
        reference.apply(*d)
    for day in {t // DAY for t, _ in events}:
        assert recovered.quarters(day) == reference.quarters(day)
    for spec in ("1h", "1d", "1w", "1mo", "15m"):
        for t, _ in events[:5]:
            s, e = window_bounds(WindowSpec.parse(spec), t, ZoneInfo("America/New_York"))
            assert recovered.sum_between(s, e) == reference.sum_between(s, e)


def test_crash_that_lost_the_day_record_is_repaired_and_cached_sums_stay_exact() -> None:
    """The hot record was written, the day record was not; a 7m window was read meanwhile."""
    t = ts(2026, 5, 1, 10, 3)  # inside the 10:00 quarter, in the 7m window starting 10:03
    spec, tz = WindowSpec.parse("7m"), ZoneInfo("UTC")
    ledger = ScopeLedger()
    ledger.apply(0, 1, {t // 60: 100})
    hot0, days0 = snapshot(ledger)
    delta = (0, 2, {t // 60: 10, (t + 7 * 60) // 60: 1})
    ledger.apply(*delta)
    hot1, _ = snapshot(ledger)
    recovered = restore(hot1, days0)  # day record update lost
    recovered.spend(spec, tz, t)  # the gate/worker reads the window before the replay
    recovered.apply(*delta)
    assert recovered.spend(spec, tz, t).nanos == 110
    assert recovered.spend(WindowSpec.parse("1h"), tz, t).nanos == 111
    assert recovered.total == 111


def test_crash_that_lost_the_hot_record_is_repaired_and_cached_sums_stay_exact() -> None:
    t = ts(2026, 5, 1, 10, 3)
    spec, tz = WindowSpec.parse("7m"), ZoneInfo("UTC")
    ledger = ScopeLedger()
    ledger.apply(0, 1, {t // 60: 100})
    hot0, _ = snapshot(ledger)
    delta = (0, 2, {t // 60: 10})
    ledger.apply(*delta)
    _, days1 = snapshot(ledger)
    recovered = restore(hot0, days1)  # hot record update lost
    recovered.spend(spec, tz, t)
    recovered.apply(*delta)
    assert recovered.spend(spec, tz, t).nanos == 110
    assert recovered.total == 110


# --- persistence, expiry, window roll-over ---------------------------------------------------


@given(histories())
@settings(max_examples=100, deadline=None)
def test_records_round_trip_through_json(history: tuple[list[Event], list[Delta]]) -> None:
    _, deltas = history
    ledger = ScopeLedger()
    for d in deltas:
        ledger.apply(*d)
    hot, days = snapshot(ledger)
    again = restore(hot, days)
    assert again.hot == ledger.hot and again.days == ledger.days
    assert snapshot(again) == (hot, days)


def test_empty_records_load_from_empty_json() -> None:
    assert HotRecord.from_json({}) == HotRecord() and DayRecord.from_json({}) == DayRecord()


def test_expire_drops_only_days_older_than_the_retention() -> None:
    now = ts(2026, 5, 1, 12)
    today = now // DAY
    ledger = ScopeLedger()
    for i, day in enumerate(
        [today - DAY_RETENTION - 5, today - DAY_RETENTION - 1, today - DAY_RETENTION, today]
    ):
        ledger.apply(0, i, {day * DAY // 60: 1})
    dropped = ledger.expire(now)
    assert sorted(dropped) == [today - DAY_RETENTION - 5, today - DAY_RETENTION - 1]
    assert sorted(ledger.days) == [today - DAY_RETENTION]  # today is in the hot record
    assert ledger.quarters(today) == {0: 1}
    assert ledger.sum_between((today - DAY_RETENTION - 10) * DAY, (today + 1) * DAY) == 2
    assert ledger.total == 4  # lifetime spend is never expired
    assert ledger.expire(now) == []


def test_minute_buckets_older_than_the_retention_are_pruned() -> None:
    ledger = ScopeLedger()
    t = ts(2026, 5, 1, 12)
    for i in range(MINUTE_RETENTION + 5):  # more buckets than the retention holds
        ledger.apply(0, i + 1, {t // 60 + i: 1})
    newest = t // 60 + MINUTE_RETENTION + 4
    assert min(ledger.hot.minutes) > newest - MINUTE_RETENTION - 1
    assert len(ledger.hot.minutes) <= MINUTE_RETENTION + 1
    assert ledger.sum_between(t - 3600, t + 6 * 3600) == MINUTE_RETENTION + 5  # quarters still hold it


def test_spend_in_the_new_window_starts_from_what_was_charged_in_it() -> None:
    spec, tz = WindowSpec.parse("1h"), ZoneInfo("UTC")
    ledger = ScopeLedger()
    ledger.apply(0, 1, {ts(2026, 5, 1, 10, 10) // 60: 5})
    assert ledger.spend(spec, tz, ts(2026, 5, 1, 10, 30)).nanos == 5
    ledger.apply(0, 2, {ts(2026, 5, 1, 11, 5) // 60: 3})  # charged in the next hour, cache on 10:00
    assert ledger.spend(spec, tz, ts(2026, 5, 1, 10, 59)).nanos == 5
    new = ledger.spend(spec, tz, ts(2026, 5, 1, 11, 10))
    assert (new.start, new.resets_at, new.nanos) == (ts(2026, 5, 1, 11), ts(2026, 5, 1, 12), 3)
    ledger.apply(0, 3, {ts(2026, 5, 1, 10, 50) // 60: 7})  # a late event for the previous hour
    assert ledger.spend(spec, tz, ts(2026, 5, 1, 11, 20)).nanos == 3
    assert ledger.spend(spec, tz, ts(2026, 5, 1, 10, 55)).nanos == 12
    assert ledger.spend(spec, tz, ts(2026, 5, 1, 12, 0)).nanos == 0


def test_windows_of_different_zones_are_cached_apart() -> None:
    spec = WindowSpec.parse("1d")
    ledger = ScopeLedger()
    ledger.apply(0, 1, {ts(2026, 5, 1, 2) // 60: 1})  # 22:00 the day before in New York
    now = ts(2026, 5, 1, 12)
    assert ledger.spend(spec, ZoneInfo("UTC"), now).nanos == 1
    assert ledger.spend(spec, ZoneInfo("America/New_York"), now).nanos == 0
    assert ledger.spend(spec, ZoneInfo("Asia/Kolkata"), now).nanos == 1


def test_minute_charges_aggregate_by_epoch_minute() -> None:
    assert minute_charges([(120, 1), (179, 2), (180, 4), (-1, 8)]) == {2: 3, 3: 4, -1: 8}


@pytest.mark.parametrize("tz", ZONES)
def test_month_spend_in_every_zone_counts_the_first_quarter_hour_of_the_month(tz: str) -> None:
    zone = ZoneInfo(tz)
    start, _ = window_bounds(WindowSpec.parse("1mo"), ts(2026, 7, 15), zone)
    ledger = ScopeLedger()
    ledger.apply(0, 1, minute_charges([(start - 1, 1), (start, 10), (start + 899, 100)]))
    assert ledger.spend(WindowSpec.parse("1mo"), zone, start).nanos == 110
