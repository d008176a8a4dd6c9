"""Exact money: integer nano-dollars inside, decimal strings on the wire.

A JSON number is accepted on input but converted through its shortest decimal text, so
``0.1`` means exactly ten cents; binary floats never take part in a sum.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from spendgate.domain.errors import InvalidInput

NANOS_PER_USD = 1_000_000_000
MAX_COST_NANOS = 1_000_000 * NANOS_PER_USD
MAX_LIMIT_NANOS = 1_000_000_000_000 * NANOS_PER_USD
MAX_DECIMALS = 9

Nanos = int

# What a string amount may look like: ASCII digits, an optional fraction. Decimal() alone would
# also take "1_000", "1e3", ".5", "NaN" and non-ASCII digits such as "١٢", which the
# contract's decimal strings (and the JSON Schema pattern) do not allow. A leading "-" is
# matched only so that negatives get their own clear reason.
_DECIMAL_TEXT = re.compile(r"-?[0-9]+(?:\.[0-9]+)?", re.ASCII)
# The usual amount ("0.01", "12"): read as integers without Decimal. Every text it matches
# parses to the same nanos through the general path (non-negative, at most nine decimals).
_PLAIN = re.compile(r"([0-9]{1,16})(?:\.([0-9]{1,9}))?", re.ASCII)


def parse_usd(value: object, *, field: str = "usd", maximum: Nanos = MAX_LIMIT_NANOS) -> Nanos:
    """Parse a dollar amount into nano-dollars, exactly.

    Raises ``InvalidInput`` for non-numbers, NaN, infinities, negatives, more than nine
    decimal places or amounts above ``maximum``.
    """
    if type(value) is str:
        plain = _PLAIN.fullmatch(value)
        if plain is not None:  # the fast path: a check's estimate is parsed on every request
            whole, frac = plain.groups()
            nanos = int(whole) * NANOS_PER_USD + (int(frac.ljust(MAX_DECIMALS, "0")) if frac else 0)
            if nanos > maximum:
                raise InvalidInput(f"must be at most {format_usd(maximum)}", field=field)
            return nanos
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise InvalidInput("must be a decimal string or number", field=field)
    if isinstance(value, str) and not _DECIMAL_TEXT.fullmatch(value.strip()):
        raise InvalidInput(f"not a decimal amount: {value[:40]!r}", field=field)
    try:
        amount = Decimal(repr(value) if isinstance(value, float) else str(value).strip())
    except InvalidOperation:  # pragma: no cover - strings are checked above, numbers always parse
        raise InvalidInput(f"not a decimal amount: {str(value)[:40]!r}", field=field) from None
    if not amount.is_finite():
        raise InvalidInput("must be finite (no NaN or infinity)", field=field)
    if amount < 0:
        raise InvalidInput("must not be negative", field=field)
    # Bound the magnitude before any arithmetic: quantize/scaleb raise (not InvalidInput) on
    # huge inputs such as "1e999999" or 30-digit amounts with ten decimals.
    if amount > to_decimal(maximum):
        raise InvalidInput(f"must be at most {format_usd(maximum)}", field=field)
    exponent = amount.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent < -MAX_DECIMALS and amount != amount.quantize(Decimal(1).scaleb(-MAX_DECIMALS)):
        raise InvalidInput(f"at most {MAX_DECIMALS} decimal places", field=field)
    return int(amount.scaleb(MAX_DECIMALS))


def parse_cost(value: object, *, field: str = "cost_usd") -> Nanos:
    """A usage cost: ``0 <= cost <= 1000000`` with at most nine decimal places."""
    return parse_usd(value, field=field, maximum=MAX_COST_NANOS)


def format_usd(nanos: Nanos) -> str:
    """Nano-dollars as the shortest exact decimal string (``12500000000`` -> ``"12.5"``)."""
    sign = "-" if nanos < 0 else ""
    whole, frac = divmod(abs(nanos), NANOS_PER_USD)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")


def to_decimal(nanos: Nanos) -> Decimal:
    return Decimal(nanos).scaleb(-MAX_DECIMALS)
