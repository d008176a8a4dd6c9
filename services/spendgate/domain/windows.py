"""Budget windows: fixed, aligned in the budget's time zone, decided by event time (CONTRACT §1).

``total`` is lifetime. ``<n><unit>`` with ``1 <= n <= 1000`` and unit ``m h d w mo``:
- ``d``, ``w`` (Monday), ``mo`` (the 1st) start at local midnight; ``n``-multiples count from
  the Unix epoch in local dates (1970-01-01, the Monday 1969-12-29, 1970-01).
- ``m``, ``h`` count ``n``-multiples of local wall-clock minutes/hours since 1970-01-01 00:00
  local; a window lasts exactly ``n`` units of elapsed time. Around a DST change the local
  clock jumps, so one sub-day window there may be shorter or overlap its neighbour by the
  size of the jump.

All instants are integer epoch seconds (UTC); the functions are pure and cached by the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from spendgate.domain.errors import InvalidInput

MAX_N = 1000
_EPOCH_DATE = date(1970, 1, 1)
_EPOCH_MONDAY = date(1969, 12, 29)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_SPEC = re.compile(r"^([1-9][0-9]{0,3})(mo|m|h|d|w)$")


class Unit(StrEnum):
    MINUTE = "m"
    HOUR = "h"
    DAY = "d"
    WEEK = "w"
    MONTH = "mo"


_SECONDS = {Unit.MINUTE: 60, Unit.HOUR: 3600}


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """A window as written in a budget; ``unit is None`` means ``total``."""

    n: int = 0
    unit: Unit | None = None

    @property
    def is_total(self) -> bool:
        return self.unit is None

    def __str__(self) -> str:
        return "total" if self.unit is None else f"{self.n}{self.unit}"

    @classmethod
    def parse(cls, text: str) -> WindowSpec:
        if not isinstance(text, str):
            raise InvalidInput("window must be a string like '1h', '30d', '1mo' or 'total'", field="window")
        if text == "total":
            return TOTAL
        match = _SPEC.fullmatch(text)  # not match(): "$" would accept a trailing newline
        if not match or int(match.group(1)) > MAX_N:
            raise InvalidInput(
                f"invalid window {text[:20]!r}: 'total' or <n><unit>, 1 <= n <= {MAX_N}, unit m|h|d|w|mo",
                field="window",
            )
        return cls(int(match.group(1)), Unit(match.group(2)))


TOTAL = WindowSpec()


@lru_cache(maxsize=1024)
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``; raises ``InvalidInput`` for an unknown one."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError, OSError):  # OSError: "Europe", 10k chars
        raise InvalidInput(f"unknown time zone {str(name)[:64]!r}", field="tz") from None


def _local_midnight(day: date, tz: ZoneInfo) -> int:
    return int(datetime.combine(day, time(0), tzinfo=tz).timestamp())


def _add_months(year: int, month0: int, months: int) -> date:
    total = year * 12 + month0 + months
    return date(total // 12, total % 12 + 1, 1)


def window_bounds(spec: WindowSpec, instant: int, tz: ZoneInfo) -> tuple[int, int]:
    """``(start, resets_at)`` in epoch seconds of the window of ``spec`` holding ``instant``.

    ``start <= instant < resets_at``. ``total`` has no bounds: it raises ``ValueError``.
    """
    unit, n = spec.unit, spec.n
    if unit is None:
        raise ValueError("total has no window bounds")
    local = datetime.fromtimestamp(instant, tz)
    if unit in _SECONDS:
        span = n * _SECONDS[unit]
        local_seconds = int((local.replace(tzinfo=None) - _EPOCH_NAIVE).total_seconds())
        start = instant - (local_seconds % span)
        return start, start + span
    today = local.date()
    if unit is Unit.DAY:
        k = (today - _EPOCH_DATE).days // n * n
        first = _EPOCH_DATE + timedelta(days=k)
        after = first + timedelta(days=n)
    elif unit is Unit.WEEK:
        k = (today - _EPOCH_MONDAY).days // (7 * n) * (7 * n)
        first = _EPOCH_MONDAY + timedelta(days=k)
        after = first + timedelta(days=7 * n)
    else:
        months = (today.year - 1970) * 12 + today.month - 1
        k = months // n * n
        first = _add_months(1970, 0, k)
        after = _add_months(1970, 0, k + n)
    start, end = _local_midnight(first, tz), _local_midnight(after, tz)
    if not start <= instant < end:  # midnight skipped by a DST jump: trust the local date
        start = min(start, instant)
        end = max(end, instant + 1)
    return start, end


def rfc3339(moment: datetime | float | None = None, *, timespec: str = "milliseconds") -> str:
    """RFC 3339 in UTC with a ``Z`` (CONTRACT §1), from a datetime, epoch seconds, or now.

    A naive datetime is local time (as Python's and LiteLLM's are)."""
    if moment is None:
        moment = datetime.now(UTC)
    elif not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(float(moment), UTC)
    return moment.astimezone(UTC).isoformat(timespec=timespec).replace("+00:00", "Z")


def iso(instant: int | None) -> str | None:
    """Epoch seconds as RFC 3339 UTC (``2026-11-24T00:00:00Z``)."""
    if instant is None:
        return None
    return datetime.fromtimestamp(instant, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
