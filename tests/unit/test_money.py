"""domain.money: exact nano-dollars inside, shortest exact decimal strings outside."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate.domain.errors import InvalidInput
from spendgate.domain.money import (
    MAX_COST_NANOS,
    MAX_LIMIT_NANOS,
    NANOS_PER_USD,
    format_usd,
    parse_cost,
    parse_usd,
    to_decimal,
)

nanos = st.integers(min_value=0, max_value=MAX_LIMIT_NANOS)
cost_nanos = st.integers(min_value=0, max_value=MAX_COST_NANOS)


@given(nanos)
def test_format_then_parse_returns_the_same_nanos(n: int) -> None:
    assert parse_usd(format_usd(n)) == n


@given(cost_nanos)
def test_cost_round_trips_through_its_decimal_string(n: int) -> None:
    assert parse_cost(format_usd(n)) == n


@given(st.decimals(min_value=0, max_value=1_000_000, places=9, allow_nan=False, allow_infinity=False))
def test_decimal_string_with_nine_places_parses_exactly(amount: Decimal) -> None:
    text = format(amount, "f")  # plain notation; str() may give "1E-7", which is refused
    assert parse_cost(text) == int(amount * NANOS_PER_USD)
    assert to_decimal(parse_cost(text)) == amount


@given(nanos)
def test_format_is_the_shortest_exact_text(n: int) -> None:
    text = format_usd(n)
    assert Decimal(text) == to_decimal(n)
    assert not (("." in text) and text.endswith("0")), text
    assert not text.endswith(".")
    assert "e" not in text.lower()


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0"),
        (12_500_000_000, "12.5"),
        (1, "0.000000001"),
        (100_000_000, "0.1"),
        (10 * NANOS_PER_USD, "10"),
    ],
)
def test_format_examples(n: int, text: str) -> None:
    assert format_usd(n) == text


def test_json_number_point_one_is_exactly_ten_cents() -> None:
    assert parse_cost(json.loads("0.1")) == 100_000_000


def test_json_number_point_one_plus_point_two_sums_exactly() -> None:
    assert parse_cost(json.loads("0.1")) + parse_cost(json.loads("0.2")) == parse_cost("0.3")


def test_json_integer_is_whole_dollars() -> None:
    assert parse_cost(json.loads("12")) == 12 * NANOS_PER_USD


def test_surrounding_whitespace_is_tolerated_in_strings() -> None:
    assert parse_cost(" 1.5 ") == 1_500_000_000


def test_trailing_zeros_beyond_nine_places_do_not_count_as_decimals() -> None:
    assert parse_cost("1.0000000000") == NANOS_PER_USD


def test_json_number_in_exponent_form_is_still_accepted() -> None:
    assert parse_cost(1e-05) == 10_000 and parse_cost(2e3) == 2_000 * NANOS_PER_USD


def test_negative_zero_is_zero() -> None:
    assert parse_cost("-0") == 0


@pytest.mark.parametrize(
    "bad",
    [
        "NaN",
        "nan",
        "sNaN",
        "Infinity",
        "-inf",
        float("nan"),
        float("inf"),
        float("-inf"),
        "-0.01",
        -1,
        -0.5,
        "1000000.000000001",
        "1000001",
        1_000_001,
        1e7,
        "0.1234567891",
        "1.0000000001",
        1e-10,
        "",
        "abc",
        "1,5",
        "0x10",
        "1_000",
        "1e3",
        "1E-3",
        ".5",
        "5.",
        "+1",
        "\u0661\u0662",  # Arabic-Indic digits: Decimal() reads them as 12
        "\uff11",  # fullwidth 1
        "1 000",
        None,
        True,
        False,
        [],
        {},
        object(),
    ],
)
def test_invalid_cost_is_rejected_with_invalid_input(bad: object) -> None:
    with pytest.raises(InvalidInput) as info:
        parse_cost(bad)
    assert info.value.field == "cost_usd"


@pytest.mark.parametrize(
    "huge",
    ["1e999999", "9" * 30 + ".1234567891", "99999999999999999999.1234567891", "1E+400000", 10**40],
)
def test_huge_amounts_are_rejected_not_crashing(huge: object) -> None:
    """Regression: quantize/scaleb raised decimal.InvalidOperation/Overflow on these."""
    with pytest.raises(InvalidInput):
        parse_cost(huge)
    with pytest.raises(InvalidInput):
        parse_usd(huge)


def test_cost_of_exactly_one_million_is_accepted() -> None:
    assert parse_cost("1000000") == MAX_COST_NANOS


def test_limits_may_exceed_the_cost_maximum() -> None:
    assert parse_usd("5000000") == 5_000_000 * NANOS_PER_USD


def test_field_name_is_reported() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_usd("-1", field="limits[0].max_usd")
    assert info.value.field == "limits[0].max_usd"


@given(st.floats(min_value=0, max_value=1_000_000, allow_nan=False))
def test_float_input_is_read_through_its_shortest_repr(value: float) -> None:
    expected = Decimal(repr(value))
    if expected != expected.quantize(Decimal("1e-9")):
        with pytest.raises(InvalidInput):
            parse_cost(value)
    else:
        assert to_decimal(parse_cost(value)) == expected


@given(
    whole=st.integers(0, 10**13),
    frac=st.one_of(st.none(), st.text("0123456789", min_size=1, max_size=12)),
    pad=st.integers(0, 3),
)
def test_the_plain_text_fast_path_parses_like_decimal(whole: int, frac: str | None, pad: int) -> None:
    from spendgate.domain.money import MAX_COST_NANOS, parse_usd

    text = "0" * pad + str(whole) + ("" if frac is None else "." + frac)
    for maximum in (MAX_COST_NANOS, 10**21):
        try:
            got: object = parse_usd(text, maximum=maximum)
        except InvalidInput as exc:
            got = type(exc)
        amount = Decimal(text)
        if amount > Decimal(maximum).scaleb(-9) or amount != amount.quantize(Decimal("1e-9")):
            assert got is InvalidInput, text
        else:
            assert got == int(amount.scaleb(9)), text
