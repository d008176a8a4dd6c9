"""The dashboard's pure parts (domain.series): bucketing, blocked periods, top-N, the overview, paging."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate.domain.gate_state import GateState
from spendgate.domain.money import NANOS_PER_USD
from spendgate.domain.series import (
    DAY,
    HOUR,
    SpendHistory,
    merge_sorted,
    overview_rows,
    page,
    percent,
    window_bounds_of,
)

T0 = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())  # a UTC midnight
USD = NANOS_PER_USD


def iso(instant: float) -> str:
    return datetime.fromtimestamp(instant, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_total_increase_is_charged_to_the_hour_and_day_of_the_record() -> None:
    h = SpendHistory()
    h.apply_state("key:k1", T0 + 10, 2 * USD)  # first record: its whole total
    h.apply_state("key:k1", T0 + HOUR + 5, 5 * USD)
    hourly = h.series("key:k1", "1h", T0, T0 + 3 * HOUR)
    assert hourly == [(T0, 2 * USD), (T0 + HOUR, 3 * USD), (T0 + 2 * HOUR, 0)]
    assert h.series("key:k1", "1d", T0, T0 + DAY) == [(T0, 5 * USD)]


def test_a_repeated_or_lower_total_charges_nothing() -> None:
    h = SpendHistory()
    h.apply_state("key:k1", T0, 3 * USD)
    h.apply_state("key:k1", T0 + 1, 3 * USD)  # same record again
    h.apply_state("key:k1", T0 + 2, 1 * USD)  # never in a correct log: a new baseline
    h.apply_state("key:k1", T0 + 3, 2 * USD)
    assert h.spend_between("key:k1", T0, T0 + HOUR) == 4 * USD


def test_series_aligns_its_range_to_the_bucket_and_fills_zeros() -> None:
    h = SpendHistory()
    points = h.series("key:nobody", "1h", T0 + 30, T0 + HOUR + 1)
    assert points == [(T0, 0), (T0 + HOUR, 0)]


def test_old_buckets_are_dropped_counting_back_from_the_newest_record_not_the_clock() -> None:
    h = SpendHistory(hours_kept=2, days_kept=1)
    h.apply_state("key:k1", T0, 1 * USD)
    h.apply_state("key:k2", T0 + 3 * HOUR, 1 * USD)
    h.apply_state("key:k1", T0 + 3 * HOUR, 2 * USD)  # a new hour of k1: k1's old hours go
    assert h.scopes["key:k1"].hours == {(T0 + 3 * HOUR) // HOUR: USD}
    h.apply_state("key:k1", T0 + 2 * DAY, 3 * USD)
    assert h.scopes["key:k1"].days == {(T0 + 2 * DAY) // DAY: USD}


@given(st.lists(st.tuples(st.integers(0, 5 * DAY), st.integers(0, 10**12)), max_size=40))
def test_buckets_add_up_to_the_increase_of_the_total(records: list[tuple[int, int]]) -> None:
    h = SpendHistory(hours_kept=10_000, days_kept=10_000)
    total = 0
    for at, add in sorted(records):
        total += add
        h.apply_state("key:k", T0 + at, total)
    assert sum(n for _, n in h.series("key:k", "1h", T0, T0 + 6 * DAY)) == total
    assert sum(n for _, n in h.series("key:k", "1d", T0, T0 + 6 * DAY)) == total
    assert h.scopes.get("key:k") is None or h.scopes["key:k"].total == total


def test_blocked_periods_open_and_close_with_decisions() -> None:
    h = SpendHistory(periods_kept=2)
    h.apply_decision("team:t", T0 + 10, False)  # unblocked and never seen: nothing kept
    assert "team:t" not in h.scopes
    h.apply_decision("team:t", T0 + 100, True)
    h.apply_decision("team:t", T0 + 150, True)  # still blocked: same period
    h.apply_decision("team:t", T0 + 200, False)
    h.apply_decision("team:t", T0 + 300, True)
    assert h.blocked_periods("team:t", T0, T0 + DAY) == [(T0 + 100, T0 + 200), (T0 + 300, None)]
    assert h.blocked_periods("team:t", T0 + 250, T0 + DAY) == [(T0 + 300, None)]
    h.apply_decision("team:t", T0 + 400, False)
    h.apply_decision("team:t", T0 + 500, True)
    assert len(h.scopes["team:t"].periods) == 2  # bounded


def test_top_ranks_by_spend_in_the_window_with_ties_by_name_and_no_zero_spenders() -> None:
    h = SpendHistory()
    now = T0 + 5 * HOUR
    h.apply_state("key:a", T0 - DAY, 9 * USD)  # yesterday only
    h.apply_state("key:b", now, 2 * USD)
    h.apply_state("key:c", now, 2 * USD)
    h.apply_state("key:d", now, 3 * USD)
    h.apply_state("team:t", now, 50 * USD)  # another kind
    assert h.top("key", "1d", now, 10) == (T0, [("key:d", 3 * USD), ("key:b", 2 * USD), ("key:c", 2 * USD)])
    assert h.top("key", "7d", now, 2)[1] == [("key:a", 9 * USD), ("key:d", 3 * USD)]
    assert h.top("key", "total", now, 1) == (None, [("key:a", 9 * USD)])
    assert h.top("key", "1d", now, 10, visible=lambda s: s != "key:d")[1][0] == ("key:b", 2 * USD)
    assert h.top("user", "1d", now, 10) == (T0, [])


def test_top_windows_are_utc_hours_and_days() -> None:
    now = T0 + 5 * HOUR + 7
    assert window_bounds_of("1h", now) == (T0 + 5 * HOUR, T0 + 6 * HOUR)
    assert window_bounds_of("1d", now) == (T0, T0 + DAY)
    assert window_bounds_of("7d", now) == (T0 - 6 * DAY, T0 + DAY)
    assert window_bounds_of("total", now) is None
    with pytest.raises(ValueError):
        window_bounds_of("2h", now)


# --- the overview -------------------------------------------------------------------------------


def budget(state: GateState, scope: str, max_usd: str, soft_usd: str | None = None, version: int = 1) -> None:
    limit: dict[str, Any] = {"window": "1d", "max_usd": max_usd}
    if soft_usd is not None:
        limit["soft_usd"] = soft_usd
    state.apply_config(
        f"budget/{scope}", {"v": 1, "type": "budget", "version": version, "scope": scope, "limits": [limit]}
    )


def spend(state: GateState, scope: str, usd: str, now: float) -> None:
    start = now // DAY * DAY
    state.apply_state(
        {
            "v": 1,
            "scope": scope,
            "as_of": iso(now),
            "windows": [
                {"window": "1d", "start": iso(start), "resets_at": iso(start + DAY), "spend_usd": usd},
                {"window": "total", "start": None, "resets_at": None, "spend_usd": usd},
            ],
        }
    )


def block(state: GateState, scope: str, resets_at: float, seq: int = 1) -> None:
    state.apply_decision(
        {
            "v": 1,
            "scope": scope,
            "blocked": True,
            "seq": seq,
            "as_of": iso(resets_at - 10),
            "windows": [{"window": "1d", "spend_usd": "2", "limit_usd": "1", "resets_at": iso(resets_at)}],
        }
    )


def test_overview_puts_blocked_scopes_first_soonest_unblock_first_then_by_share_used() -> None:
    state = GateState()
    now = T0 + HOUR
    for i, (scope, used) in enumerate([("key:a", "1"), ("key:b", "9"), ("key:c", "5"), ("key:d", "0")]):
        budget(state, scope, "10", soft_usd="5", version=i + 1)
        spend(state, scope, used, now)
    budget(state, "team:late", "1", version=10)
    budget(state, "team:soon", "1", version=11)
    block(state, "team:late", T0 + DAY)
    block(state, "team:soon", T0 + 2 * HOUR)
    rows = overview_rows(state, now)
    assert [r.scope for r in rows] == ["team:soon", "team:late", "key:b", "key:c", "key:a", "key:d"]
    assert rows[0].blocked and rows[0].resets_at == iso(T0 + 2 * HOUR)
    assert [percent(r.ratio_ppm) for r in rows[2:]] == ["90", "50", "10", "0"]
    assert [r.soft_crossed for r in rows[2:]] == [True, True, False, False]


def test_holds_count_in_the_overview_as_a_check_counts_them() -> None:
    """A key whose holds fill its limit is denied by every check: the overview says blocked too."""
    state = GateState()
    now = T0 + HOUR
    budget(state, "key:h", "1")
    start = now // DAY * DAY
    state.apply_state(
        {
            "v": 1,
            "scope": "key:h",
            "as_of": iso(now),
            "holds_expire_at": iso(now + 600),
            "windows": [
                {
                    "window": "1d",
                    "start": iso(start),
                    "resets_at": iso(start + DAY),
                    "spend_usd": "0.25",
                    "reserved_usd": "0.75",
                },
            ],
        }
    )
    (row,) = overview_rows(state, now)
    assert row.blocked and percent(row.ratio_ppm) == "100" and row.spend == USD // 4
    (after,) = overview_rows(state, now + 600)  # the holds expired
    assert not after.blocked and percent(after.ratio_ppm) == "25"


def test_a_block_whose_resets_at_passed_is_over_in_the_overview() -> None:
    state = GateState()
    budget(state, "team:t", "1")
    block(state, "team:t", T0 + HOUR)
    assert overview_rows(state, T0 + HOUR - 1)[0].blocked
    assert not overview_rows(state, T0 + HOUR)[0].blocked


def test_spend_of_a_window_that_reset_counts_zero() -> None:
    state = GateState()
    budget(state, "key:k", "10")
    spend(state, "key:k", "7", T0 - HOUR)  # yesterday's window
    assert overview_rows(state, T0 + 1)[0].spend == 0


def test_paging_and_percent() -> None:
    state = GateState()
    for i in range(7):
        budget(state, f"key:k{i}", "10", version=i + 1)
    rows = overview_rows(state, T0)
    assert [r.scope for r in page(rows, 5, 5)] == ["key:k5", "key:k6"]
    assert page(rows, 50, 5) == []
    assert percent(875_000) == "87.5" and percent(1_000_000) == "100" and percent(1) == "0.0001"


def test_the_overview_computed_in_slices_and_merged_is_the_same_order() -> None:
    state = GateState()
    now = T0 + HOUR
    for i in range(40):
        scope = f"key:k{i:02d}"
        budget(state, scope, "10", version=i + 1)
        spend(state, scope, str((i * 7) % 13), now)
        if i % 9 == 0:
            block(state, scope, T0 + DAY - i)
    items = list(state.budgets.items())
    parts = [overview_rows(state, now, items[i : i + 7]) for i in range(0, len(items), 7)]
    assert list(merge_sorted(parts)) == overview_rows(state, now)


def test_top_over_slices_of_scopes_agrees_with_top_over_all() -> None:
    h = SpendHistory()
    for i in range(30):
        h.apply_state(f"key:k{i:02d}", T0, ((i * 11) % 7 + 1) * USD)
    whole = h.top("key", "1d", T0, 5)[1]
    scopes = sorted(h.by_kind["key"])
    pieces = [p for i in range(0, 30, 4) for p in h.top("key", "1d", T0, 5, among=scopes[i : i + 4])[1]]
    assert sorted(pieces, key=lambda p: (-p[1], p[0]))[:5] == whole
