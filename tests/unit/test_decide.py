"""domain.decide: blocked while, in some window, spend >= limit; which window binds; when it ends."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from factories import budget
from spendgate.domain.budgets import NO_BUDGET, parse_budget
from spendgate.domain.decide import decide
from spendgate.domain.ledger import ScopeLedger, WindowSpend, minute_charges
from spendgate.domain.money import NANOS_PER_USD, parse_usd
from spendgate.domain.windows import WindowSpec, window_bounds

USD = NANOS_PER_USD


def ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())  # type: ignore[misc, arg-type]


def ledger_with(*charges: tuple[int, str]) -> ScopeLedger:
    ledger = ScopeLedger()
    ledger.apply(0, 0, minute_charges((t, parse_usd(usd)) for t, usd in charges))
    return ledger


class FixedSpend:
    """A spend source that reports the same amount for every window."""

    def __init__(self, nanos: int) -> None:
        self.nanos = nanos

    def spend(self, spec: WindowSpec, tz: ZoneInfo, now: int) -> WindowSpend:
        if spec.is_total:
            return WindowSpend(None, None, self.nanos)
        return WindowSpend(*window_bounds(spec, now, tz), self.nanos)


NOW = ts(2026, 11, 23, 10, 30)


def test_spend_equal_to_the_limit_blocks() -> None:
    status = decide(budget(("1d", "100")), FixedSpend(100 * USD), NOW)
    assert status.blocked
    assert [w.window for w in status.binding] == ["1d"]


def test_spend_one_nano_below_the_limit_does_not_block() -> None:
    assert not decide(budget(("1d", "100")), FixedSpend(100 * USD - 1), NOW).blocked


def test_limit_zero_blocks_before_any_spend() -> None:
    status = decide(budget(("1h", "0")), FixedSpend(0), NOW)
    assert status.blocked and status.binding[0].limit == 0


def test_no_budget_never_blocks_and_reports_total() -> None:
    status = decide(NO_BUDGET, FixedSpend(10**18), NOW)
    assert not status.blocked
    assert [(w.window, w.spend, w.limit) for w in status.windows] == [("total", 10**18, None)]


def test_multi_window_budget_blocks_on_the_hour_and_names_its_reset() -> None:
    b = budget(("1h", "10"), ("1mo", "500"), ("total", "5000"))
    ledger = ledger_with(
        (ts(2026, 11, 1, 3), "400"), (ts(2026, 11, 23, 10, 5), "6"), (ts(2026, 11, 23, 10, 20), "4")
    )
    status = decide(b, ledger, NOW)
    assert status.blocked
    assert [(w.window, w.spend, w.limit, w.resets_at) for w in status.binding] == [
        ("1h", 10 * USD, 10 * USD, ts(2026, 11, 23, 11))
    ]
    assert [w.window for w in status.windows] == ["1h", "1mo", "total"]
    assert {w.window: w.spend for w in status.windows} == {
        "1h": 10 * USD,
        "1mo": 410 * USD,
        "total": 410 * USD,
    }
    assert status.next_change_at == ts(2026, 11, 23, 11)
    assert not decide(b, ledger, ts(2026, 11, 23, 11)).blocked  # the hour reset


def test_multi_window_budget_blocks_on_the_month_when_the_month_is_crossed_first() -> None:
    b = budget(("1h", "10"), ("1mo", "500"), ("total", "5000"))
    ledger = ledger_with((ts(2026, 11, 2), "495"), (ts(2026, 11, 23, 10, 5), "5"))
    status = decide(b, ledger, NOW)
    assert [(w.window, w.resets_at) for w in status.binding] == [("1mo", ts(2026, 12, 1))]
    assert decide(b, ledger, ts(2026, 12, 1)).blocked is False


def test_total_limit_binds_with_no_reset() -> None:
    status = decide(budget(("total", "5")), ledger_with((ts(2020, 1, 1), "5")), NOW)
    assert status.blocked
    assert [(w.window, w.resets_at) for w in status.binding] == [("total", None)]
    assert status.next_change_at is None


def test_window_resets_follow_the_budget_time_zone() -> None:
    b = budget(("1d", "1"), tz="America/New_York")
    assert not decide(b, ledger_with((ts(2026, 11, 23, 4, 30), "1")), NOW).blocked  # 23:30 the day before
    status = decide(b, ledger_with((ts(2026, 11, 23, 5, 30), "1")), NOW)
    assert status.blocked and status.binding[0].resets_at == ts(2026, 11, 24, 5)


windows = ["1h", "1d", "1w", "1mo", "total", "15m"]


@given(st.lists(st.sampled_from(windows), unique=True, min_size=1), st.data())
def test_reordering_removing_and_readding_windows_never_changes_their_spend(
    chosen: list[str], data: st.DataObject
) -> None:
    """Seed 003: spend is kept per scope and window, never per list position of a limit."""
    ledger = ledger_with(
        (ts(2026, 11, 23, 10, 30), "1"),
        (ts(2026, 11, 23, 2), "2"),
        (ts(2026, 11, 24), "4"),
        (ts(2026, 11, 2), "8"),
        (ts(2026, 10, 1), "16"),
    )
    expected = {"15m": 1, "1h": 1, "1d": 3, "1w": 7, "1mo": 15, "total": 31}

    def spends(texts: list[str]) -> dict[str, int]:
        b = parse_budget({"limits": [{"window": w, "max_usd": "1000"} for w in texts]})
        return {w.window: w.spend for w in decide(b, ledger, NOW).windows}

    first = spends(chosen)
    assert all(first[w] == expected[w] * USD for w in chosen)
    shuffled = data.draw(st.permutations(chosen))
    assert spends(shuffled) == first
    removed = data.draw(st.sampled_from(chosen))
    without = [w for w in shuffled if w != removed]
    assert all(spends(without)[w] == first[w] for w in without)
    assert spends([*without, removed]) == first


def test_soft_limit_crossed_without_blocking() -> None:
    status = decide(budget(("1mo", "500", "400")), FixedSpend(400 * USD), NOW)
    assert not status.blocked
    (window,) = [w for w in status.windows if w.window == "1mo"]
    assert window.soft_crossed and not window.binding
    assert status.next_change_at == ts(2026, 12, 1)


def test_soft_limit_not_crossed_below_it() -> None:
    status = decide(budget(("1mo", "500", "400")), FixedSpend(400 * USD - 1), NOW)
    assert not any(w.soft_crossed for w in status.windows)
    assert status.next_change_at is None


def test_next_change_is_the_earliest_reset_of_a_binding_window() -> None:
    b = budget(("1h", "1"), ("1d", "1"), ("1w", "100"))
    status = decide(b, FixedSpend(2 * USD), NOW)
    assert [w.window for w in status.binding] == ["1d", "1h"]
    assert status.next_change_at == ts(2026, 11, 23, 11)


def test_decision_key_changes_when_the_window_rolls_over_or_the_limit_changes() -> None:
    spend = FixedSpend(5 * USD)
    a = decide(budget(("1h", "1")), spend, NOW).decision_key()
    assert a == (("1h", ts(2026, 11, 23, 11), USD),)
    assert decide(budget(("1h", "1")), spend, NOW + 60).decision_key() == a
    assert decide(budget(("1h", "1")), spend, ts(2026, 11, 23, 11, 30)).decision_key() != a
    assert decide(budget(("1h", "2")), spend, NOW).decision_key() != a
    assert decide(budget(("1h", "10")), spend, NOW).decision_key() == ()


def test_raising_the_limit_unblocks_at_once() -> None:
    ledger = ledger_with((NOW - 60, "10"))
    assert decide(budget(("1d", "10")), ledger, NOW).blocked
    assert not decide(budget(("1d", "10.000000001")), ledger, NOW).blocked


def test_budget_set_mid_window_sees_spend_already_made() -> None:
    ledger = ledger_with((ts(2026, 11, 23, 1), "60"))
    assert decide(NO_BUDGET, ledger, NOW).blocked is False
    assert decide(budget(("1d", "50")), ledger, NOW).blocked
