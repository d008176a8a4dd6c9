"""domain.budgets: validated limits keyed by window, never by list position (CONTRACT §3)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from factories import budget
from spendgate.domain.budgets import MAX_LIMITS, NO_BUDGET, Budget, Limit, parse_budget
from spendgate.domain.errors import InvalidInput
from spendgate.domain.money import NANOS_PER_USD
from spendgate.domain.windows import TOTAL, WindowSpec


def _reject(raw: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        parse_budget(raw)
    return info.value


def test_contract_example_parses() -> None:
    b = parse_budget(
        {
            "limits": [
                {"window": "1h", "max_usd": "10"},
                {"window": "1mo", "max_usd": "500", "soft_usd": "400"},
                {"window": "total", "max_usd": "5000"},
            ],
            "tz": "UTC",
        }
    )
    assert b.limit_for(WindowSpec.parse("1mo")) == Limit(
        WindowSpec.parse("1mo"), 500 * NANOS_PER_USD, 400 * NANOS_PER_USD
    )
    assert b.limit_for(TOTAL) == Limit(TOTAL, 5000 * NANOS_PER_USD)
    assert b.limit_for(WindowSpec.parse("1d")) is None


def test_two_limits_with_the_same_window_are_rejected_naming_the_second() -> None:
    err = _reject(
        {
            "limits": [
                {"window": "1h", "max_usd": "1"},
                {"window": "1d", "max_usd": "2"},
                {"window": "1h", "max_usd": "3"},
            ]
        }
    )
    assert err.field == "limits[2].window"
    assert "1h" in err.reason


def test_soft_above_max_is_rejected() -> None:
    err = _reject({"limits": [{"window": "1d", "max_usd": "10", "soft_usd": "10.000000001"}]})
    assert err.field == "limits[0].soft_usd"


def test_soft_equal_to_max_is_accepted() -> None:
    assert budget(("1d", "10", "10")).limits[0].soft_nanos == 10 * NANOS_PER_USD


@pytest.mark.parametrize(
    "amount", ["-1", "-0.000000001", "ten", "NaN", "Infinity", None, True, "1.0000000001"]
)
def test_negative_or_non_numeric_max_is_rejected_naming_the_field(amount: object) -> None:
    err = _reject({"limits": [{"window": "1d", "max_usd": "1"}, {"window": "1h", "max_usd": amount}]})
    assert err.field == "limits[1].max_usd"


def test_negative_soft_is_rejected() -> None:
    assert (
        _reject({"limits": [{"window": "1d", "max_usd": "1", "soft_usd": "-1"}]}).field
        == "limits[0].soft_usd"
    )


def test_invalid_window_names_its_limit() -> None:
    assert _reject({"limits": [{"window": "1y", "max_usd": "1"}]}).field == "limits[0].window"


@pytest.mark.parametrize("tz", ["Mars/Olympus", "America/NewYork", 5, ["UTC"], {"a": 1}])
def test_unknown_time_zone_is_rejected(tz: object) -> None:
    """Regression for ["UTC"]: the lru-cached zone() raised TypeError (a 500) on a list."""
    assert _reject({"limits": [], "tz": tz}).field == "tz"


@pytest.mark.parametrize(
    "raw", [None, {"limits": None}, {"limits": []}, {}, {"limits": None, "tz": "Asia/Kolkata"}]
)
def test_null_or_empty_limits_mean_unlimited(raw: Any) -> None:
    assert parse_budget(raw).is_unlimited


def test_null_budget_is_the_no_budget_constant() -> None:
    assert parse_budget(None) == NO_BUDGET and NO_BUDGET.tz == "UTC"


def test_missing_tz_defaults_to_utc() -> None:
    assert budget(("1d", "1")).tz == "UTC" and parse_budget({"limits": []}).tz == "UTC"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("limits", "body"),
        ({"limits": [], "extra": 1}, "body"),
        ({"limits": "1h"}, "limits"),
        ({"limits": [{"window": "1h"}]}, "limits[0]"),
        ({"limits": [{"max_usd": "1"}]}, "limits[0]"),
        ({"limits": [{"window": "1h", "max_usd": "1", "hard_usd": "2"}]}, "limits[0]"),
        ({"limits": ["1h"]}, "limits[0]"),
        ({"limits": [{"window": f"{i + 1}h", "max_usd": "1"} for i in range(MAX_LIMITS + 1)]}, "limits"),
    ],
)
def test_malformed_budget_bodies_are_rejected_with_a_field_path(raw: Any, field: str) -> None:
    assert _reject(raw).field == field


def test_limit_of_zero_is_valid() -> None:
    assert budget(("1d", "0")).limits[0].max_nanos == 0


windows = st.lists(
    st.sampled_from(["1m", "15m", "1h", "6h", "1d", "2d", "1w", "1mo", "3mo", "total"]),
    unique=True,
    min_size=1,
)


@given(windows, st.data())
def test_order_of_limits_never_matters(texts: list[str], data: st.DataObject) -> None:
    limits = [{"window": w, "max_usd": str(i + 1)} for i, w in enumerate(texts)]
    shuffled = data.draw(st.permutations(limits))
    a, b = parse_budget({"limits": limits}), parse_budget({"limits": shuffled})
    assert a == b
    assert a.to_json() == b.to_json()


@given(windows)
def test_budget_json_round_trips(texts: list[str]) -> None:
    b = parse_budget(
        {"limits": [{"window": w, "max_usd": "1.5", "soft_usd": "1"} for w in texts], "tz": "Europe/London"}
    )
    assert parse_budget(b.to_json()) == b


def test_budget_is_a_value() -> None:
    assert budget(("1h", "10")) == Budget((Limit(WindowSpec.parse("1h"), 10 * NANOS_PER_USD),), "UTC")
    assert hash(budget(("1h", "10"))) == hash(budget(("1h", "10.0")))


def test_a_limit_parsed_before_is_reused_and_never_lets_a_bad_one_through() -> None:
    """parse_limit remembers all-string limits (cold starts parse one template 100,000 times)."""
    first = parse_budget({"limits": [{"window": "1d", "max_usd": "5", "soft_usd": "4"}]})
    again = parse_budget({"limits": [{"window": "1d", "max_usd": "5", "soft_usd": "4"}]})
    assert again.limits[0] is first.limits[0]
    assert parse_budget({"limits": [{"window": "1d", "max_usd": "5"}]}).limits[0].soft_nanos is None
    for bad in (
        {"window": "1d", "max_usd": True},  # hashes like 1
        {"window": "1d", "max_usd": "5", "soft_usd": "4", "extra": 1},
        {"window": "1d", "max_usd": "5", "soft_usd": "6"},
    ):
        with pytest.raises(InvalidInput):
            parse_budget({"limits": [bad]})
    assert parse_budget({"limits": [{"window": "1d", "max_usd": 5}]}).limits[0].max_nanos == 5 * NANOS_PER_USD


@given(
    st.dictionaries(
        st.sampled_from(["window", "max_usd", "soft_usd", "x"]),
        st.one_of(
            st.none(), st.booleans(), st.integers(-2, 10), st.sampled_from(["1d", "1h", "2", ".5", "-1"])
        ),
    )
)
def test_a_remembered_limit_is_what_a_fresh_parse_gives(raw: dict[str, Any]) -> None:
    from spendgate.domain import budgets

    def outcome() -> object:  # a one-limit budget: remembered by its text when valid
        try:
            return budgets.parse_budget_fields([raw], "UTC")
        except InvalidInput as exc:
            return ("refused", exc.reason, exc.field)

    remembered = outcome()
    budgets._BUDGETS.clear()
    assert outcome() == remembered


def test_a_budget_parsed_before_is_shared_and_never_lets_a_bad_one_through() -> None:
    """parse_budget remembers valid budgets by their text (100,000 keys on one template)."""
    limits = [{"window": "1d", "max_usd": "100"}, {"window": "total", "max_usd": "100000"}]
    first = parse_budget({"limits": limits, "tz": "UTC"})
    assert parse_budget({"limits": [dict(lim) for lim in limits], "tz": "UTC"}) is first
    assert parse_budget({"limits": limits, "tz": "Europe/Paris"}).tz == "Europe/Paris"
    assert parse_budget({"limits": limits[:1]}).limits == first.limits[:1]
    for bad in (
        [*limits, {"window": "1d", "max_usd": "5"}],  # a duplicate window after a known pair
        [{"window": "1d", "max_usd": "100", "extra": "1"}],
        [{"window": "1d", "max_usd": True}],
    ):
        with pytest.raises(InvalidInput):
            parse_budget({"limits": bad, "tz": "UTC"})
    with pytest.raises(InvalidInput):
        parse_budget({"limits": limits, "tz": "Mars/Olympus"})


limit_bodies = st.lists(
    st.dictionaries(
        st.sampled_from(["window", "max_usd", "soft_usd", "x"]),
        st.one_of(
            st.none(), st.booleans(), st.integers(0, 3), st.sampled_from(["1d", "1h", "total", "2", "1"])
        ),
    ),
    max_size=3,
)


@given(limit_bodies, st.sampled_from(["UTC", "Europe/Paris"]))
def test_a_remembered_budget_is_what_a_fresh_parse_gives(limits: list[dict[str, Any]], tz: str) -> None:
    from spendgate.domain import budgets

    def outcome() -> object:
        try:
            return parse_budget({"limits": limits, "tz": tz})
        except InvalidInput as exc:
            return ("refused", exc.reason, exc.field)

    remembered = outcome()
    assert outcome() == remembered
    budgets._BUDGETS.clear()
    assert outcome() == remembered


@given(limit_bodies, st.sampled_from([None, "UTC", "Europe/Paris", "", "Mars/Olympus", 5]))
def test_parse_budget_fields_is_parse_budget_of_the_body(limits: list[dict[str, Any]], tz: object) -> None:
    from spendgate.domain.budgets import parse_budget_fields

    def outcome(parse: Any, *args: object) -> object:
        try:
            return parse(*args)
        except InvalidInput as exc:
            return ("refused", exc.reason, exc.field)

    assert outcome(parse_budget_fields, limits, tz) == outcome(parse_budget, {"limits": limits, "tz": tz})
