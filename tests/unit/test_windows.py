"""domain.windows: fixed windows aligned in the budget's zone, decided by event time."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spendgate.domain.errors import InvalidInput
from spendgate.domain.windows import TOTAL, Unit, WindowSpec, iso, window_bounds, zone

ZONES = [
    "UTC",
    "America/New_York",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Australia/Lord_Howe",
    "Europe/London",
]
# 1972..2100: every zone above has had quarter-hour offsets throughout
instants = st.integers(
    min_value=int(datetime(1972, 1, 1, tzinfo=UTC).timestamp()),
    max_value=int(datetime(2100, 1, 1, tzinfo=UTC).timestamp()),
)
zones = st.sampled_from(ZONES).map(ZoneInfo)
units = st.sampled_from(list(Unit))
specs = st.builds(WindowSpec, st.integers(min_value=1, max_value=1000), units)
small_specs = st.builds(WindowSpec, st.integers(min_value=1, max_value=12), units)
quarter_specs = st.one_of(
    st.builds(
        WindowSpec, st.integers(1, 1000), st.sampled_from([Unit.HOUR, Unit.DAY, Unit.WEEK, Unit.MONTH])
    ),
    st.builds(WindowSpec, st.integers(1, 66).map(lambda k: 15 * k), st.just(Unit.MINUTE)),
)


def _local(instant: int, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(instant, tz)


def _offset(instant: int, tz: ZoneInfo) -> timedelta:
    off = _local(instant, tz).utcoffset()
    assert off is not None
    return off


def _ts(*args: int, tz: str) -> int:
    return int(datetime(*args, tzinfo=ZoneInfo(tz)).timestamp())  # type: ignore[misc, arg-type]


# --- bounds -----------------------------------------------------------------------------


@given(specs, instants, zones)
@settings(max_examples=500)
def test_window_holds_its_instant(spec: WindowSpec, t: int, tz: ZoneInfo) -> None:
    start, resets_at = window_bounds(spec, t, tz)
    assert start <= t < resets_at


@given(specs, instants, zones)
@settings(max_examples=500)
def test_every_instant_of_a_window_maps_to_the_same_window(spec: WindowSpec, t: int, tz: ZoneInfo) -> None:
    start, resets_at = window_bounds(spec, t, tz)
    if spec.unit in (Unit.MINUTE, Unit.HOUR) and _offset(start, tz) != _offset(resets_at - 1, tz):
        return  # documented: a sub-day window across a DST change may overlap its neighbour
    assert window_bounds(spec, start, tz) == (start, resets_at)
    assert window_bounds(spec, resets_at - 1, tz) == (start, resets_at)


@given(specs, instants, zones)
@settings(max_examples=500)
def test_next_window_starts_where_this_one_resets(spec: WindowSpec, t: int, tz: ZoneInfo) -> None:
    start, resets_at = window_bounds(spec, t, tz)
    if spec.unit in (Unit.MINUTE, Unit.HOUR) and _offset(t, tz) != _offset(resets_at, tz):
        return  # documented: the local clock jumped inside this sub-day window
    assert window_bounds(spec, resets_at, tz)[0] == resets_at


@given(
    st.builds(WindowSpec, st.integers(1, 1000), st.sampled_from([Unit.MINUTE, Unit.HOUR])), instants, zones
)
def test_sub_day_window_lasts_exactly_n_units(spec: WindowSpec, t: int, tz: ZoneInfo) -> None:
    start, resets_at = window_bounds(spec, t, tz)
    assert resets_at - start == spec.n * (60 if spec.unit is Unit.MINUTE else 3600)


@given(
    st.builds(WindowSpec, st.integers(1, 1000), st.sampled_from([Unit.DAY, Unit.WEEK, Unit.MONTH])),
    instants,
    zones,
)
@settings(max_examples=500)
def test_day_week_month_windows_start_and_reset_at_local_midnight(
    spec: WindowSpec, t: int, tz: ZoneInfo
) -> None:
    start, resets_at = window_bounds(spec, t, tz)
    for edge in (start, resets_at):
        local = _local(edge, tz)
        # the first instant of a local date: midnight, or just after a midnight a DST jump
        # skipped (Lord Howe went +10:00 -> +10:30 at 1981-03-01 00:00)
        assert _local(edge - 1, tz).date() < local.date(), (spec, tz, local)
        assert local.hour == 0 and local.second == 0, (spec, tz, local)
        if (local.minute, local.second) != (0, 0):
            assert _offset(edge - 1, tz) < _offset(edge, tz)
        if spec.unit is Unit.WEEK:
            assert local.weekday() == 0  # Monday
        if spec.unit is Unit.MONTH:
            assert local.day == 1


@given(
    st.builds(WindowSpec, st.integers(1, 1000), st.sampled_from([Unit.DAY, Unit.WEEK, Unit.MONTH])),
    instants,
    zones,
)
def test_day_week_month_multiples_count_from_the_epoch(spec: WindowSpec, t: int, tz: ZoneInfo) -> None:
    start, _ = window_bounds(spec, t, tz)
    first = _local(start, tz).date()
    if spec.unit is Unit.DAY:
        assert (first - date(1970, 1, 1)).days % spec.n == 0
    elif spec.unit is Unit.WEEK:
        assert (first - date(1969, 12, 29)).days % (7 * spec.n) == 0
    else:
        assert ((first.year - 1970) * 12 + first.month - 1) % spec.n == 0


@given(
    st.builds(WindowSpec, st.integers(1, 1000), st.sampled_from([Unit.MINUTE, Unit.HOUR])), instants, zones
)
def test_sub_day_multiples_count_local_clock_from_the_epoch(spec: WindowSpec, t: int, tz: ZoneInfo) -> None:
    start, _ = window_bounds(spec, t, tz)
    span = spec.n * (60 if spec.unit is Unit.MINUTE else 3600)
    local_seconds = t + int(_offset(t, tz).total_seconds())  # the local wall clock at t, as epoch
    assert (start + (local_seconds - t)) % span == 0


@given(quarter_specs, instants, zones)
@settings(max_examples=1000)
def test_quarter_hour_windows_start_and_reset_on_quarter_hours(
    spec: WindowSpec, t: int, tz: ZoneInfo
) -> None:
    """The ledger sums these windows from quarter-hour buckets: it relies on this."""
    start, resets_at = window_bounds(spec, t, tz)
    assert start % 900 == 0 and resets_at % 900 == 0, (spec, tz.key, t)


@given(small_specs, st.sampled_from(ZONES).map(ZoneInfo), st.integers(2026, 2027))
def test_quarter_alignment_holds_right_at_dst_changes(spec: WindowSpec, tz: ZoneInfo, year: int) -> None:
    """Probe every quarter hour of the days around the changes of the year."""
    if spec.unit is Unit.MINUTE and spec.n % 15:
        return
    day = datetime(year, 1, 1, tzinfo=UTC)
    off = _offset(int(day.timestamp()), tz)
    for hours in range(0, 366 * 24, 24):
        instant = int((day + timedelta(hours=hours)).timestamp())
        new = _offset(instant, tz)
        if new != off:
            for q in range(-4 * 48, 4 * 48):
                s, r = window_bounds(spec, instant + q * 900, tz)
                assert s % 900 == 0 and r % 900 == 0 and s <= instant + q * 900 < r
            off = new


# --- the examples of the contract -------------------------------------------------------


def test_one_day_in_new_york_resets_at_local_midnight_on_spring_forward_day() -> None:
    tz = ZoneInfo("America/New_York")
    start, resets_at = window_bounds(WindowSpec.parse("1d"), _ts(2026, 3, 8, 12, tz="America/New_York"), tz)
    assert start == _ts(2026, 3, 8, tz="America/New_York")
    assert resets_at == _ts(2026, 3, 9, tz="America/New_York")
    assert iso(start) == "2026-03-08T05:00:00Z" and iso(resets_at) == "2026-03-09T04:00:00Z"
    assert resets_at - start == 23 * 3600


def test_one_day_in_new_york_resets_at_local_midnight_on_fall_back_day() -> None:
    tz = ZoneInfo("America/New_York")
    start, resets_at = window_bounds(WindowSpec.parse("1d"), _ts(2026, 11, 1, 23, tz="America/New_York"), tz)
    assert iso(start) == "2026-11-01T04:00:00Z" and iso(resets_at) == "2026-11-02T05:00:00Z"
    assert resets_at - start == 25 * 3600


def test_repeated_hour_of_fall_back_day_is_in_that_day() -> None:
    tz = ZoneInfo("America/New_York")
    second_one_thirty = int(datetime(2026, 11, 1, 6, 30, tzinfo=UTC).timestamp())  # 01:30 EST
    assert iso(window_bounds(WindowSpec.parse("1d"), second_one_thirty, tz)[0]) == "2026-11-01T04:00:00Z"


def test_one_hour_windows_are_contiguous_through_the_new_york_changes() -> None:
    tz = ZoneInfo("America/New_York")
    spec = WindowSpec.parse("1h")
    for day in (datetime(2026, 3, 8, tzinfo=UTC), datetime(2026, 11, 1, tzinfo=UTC)):
        t = int(day.timestamp())
        start, resets_at = window_bounds(spec, t, tz)
        for _ in range(30):
            nxt = window_bounds(spec, resets_at, tz)
            assert nxt[0] == resets_at and nxt[1] - nxt[0] == 3600
            resets_at = nxt[1]


def test_utc_day_example_from_the_contract() -> None:
    t = int(datetime(2026, 11, 23, 10, 0, 0, 123000, tzinfo=UTC).timestamp())
    start, resets_at = window_bounds(WindowSpec.parse("1d"), t, ZoneInfo("UTC"))
    assert (iso(start), iso(resets_at)) == ("2026-11-23T00:00:00Z", "2026-11-24T00:00:00Z")


def test_week_starts_on_monday() -> None:
    t = _ts(2026, 11, 26, 15, tz="UTC")  # a Thursday
    start, resets_at = window_bounds(WindowSpec.parse("1w"), t, ZoneInfo("UTC"))
    assert (iso(start), iso(resets_at)) == ("2026-11-23T00:00:00Z", "2026-11-30T00:00:00Z")


def test_month_in_kolkata_starts_on_the_first_at_local_midnight() -> None:
    tz = ZoneInfo("Asia/Kolkata")
    start, resets_at = window_bounds(WindowSpec.parse("1mo"), _ts(2026, 2, 14, tz="Asia/Kolkata"), tz)
    assert (iso(start), iso(resets_at)) == ("2026-01-31T18:30:00Z", "2026-02-28T18:30:00Z")


def test_hour_in_kathmandu_starts_at_quarter_past_utc() -> None:
    tz = ZoneInfo("Asia/Kathmandu")
    start, resets_at = window_bounds(WindowSpec.parse("1h"), _ts(2026, 5, 1, 12, 10, tz="UTC"), tz)
    assert (iso(start), iso(resets_at)) == ("2026-05-01T11:15:00Z", "2026-05-01T12:15:00Z")


def test_december_month_resets_on_january_first() -> None:
    start, resets_at = window_bounds(
        WindowSpec.parse("1mo"), _ts(2026, 12, 31, 23, tz="UTC"), ZoneInfo("UTC")
    )
    assert (iso(start), iso(resets_at)) == ("2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z")


def test_n_day_windows_count_from_the_epoch() -> None:
    start, resets_at = window_bounds(WindowSpec.parse("2d"), 0, ZoneInfo("UTC"))
    assert (start, resets_at) == (0, 2 * 86400)
    start, resets_at = window_bounds(WindowSpec.parse("3mo"), _ts(2026, 5, 5, tz="UTC"), ZoneInfo("UTC"))
    assert (iso(start), iso(resets_at)) == ("2026-04-01T00:00:00Z", "2026-07-01T00:00:00Z")


def test_total_has_no_bounds() -> None:
    with pytest.raises(ValueError):
        window_bounds(TOTAL, 0, ZoneInfo("UTC"))


# --- specs ------------------------------------------------------------------------------


@given(specs)
def test_spec_text_round_trips(spec: WindowSpec) -> None:
    assert WindowSpec.parse(str(spec)) == spec


def test_total_parses_to_total() -> None:
    assert WindowSpec.parse("total").is_total and str(WindowSpec.parse("total")) == "total"


@pytest.mark.parametrize("text", ["1m", "1h", "30d", "1w", "1mo", "1000mo", "15m"])
def test_valid_specs_parse(text: str) -> None:
    assert str(WindowSpec.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "0h",
        "1001d",
        "1y",
        "total ",
        " total",
        "",
        "h",
        "01h",
        "1.5h",
        "-1h",
        "1H",
        "1 h",
        "1hh",
        "1mos",
        "10000m",
        "1h\n",
        None,
        1,
        ["1h"],
    ],
)
def test_invalid_specs_are_rejected(text: object) -> None:
    with pytest.raises(InvalidInput) as info:
        WindowSpec.parse(text)  # type: ignore[arg-type]
    assert info.value.field == "window"


@pytest.mark.parametrize("name", ["Mars/Olympus", "", "../../etc/passwd", "utc "])
def test_unknown_zone_is_rejected(name: str) -> None:
    with pytest.raises(InvalidInput) as info:
        zone(name)
    assert info.value.field == "tz"
