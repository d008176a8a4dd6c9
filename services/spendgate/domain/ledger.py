"""Exact spend of one scope, in time buckets, applied idempotently (no transactions needed).

Storage (what the worker persists, one table record each):
- the *hot* record: lifetime ``total``, minute buckets of at least the last
  ``MINUTE_RETENTION`` minutes (about that many buckets at most), and a watermark per source
  partition;
- one *day* record per UTC day: quarter-hour buckets of that day, with its own watermarks.

A delta from source partition ``p`` covering offsets up to ``last`` is applied to a record only
when ``last`` is above that record's watermark for ``p``; each record carries its own
watermark, so a crash between two record writes is repaired by replaying the delta, never
double counted. (Deltas for one scope arrive in offset order per source partition, and no
re-emitted delta straddles an applied one: see the worker's docstring.)

Every current IANA zone's UTC offset is a whole number of quarter hours, so every ``h``, ``d``,
``w``, ``mo`` window boundary in any zone, and every ``m`` window whose ``n`` is a multiple of
15, falls on a quarter-hour: their spend is a sum of quarter buckets, exact for windows that
started within ``DAY_RETENTION`` days. Other ``m`` windows read their first, partial quarter
from minute buckets, exact when the window started within ``MINUTE_RETENTION`` minutes.

Window sums are cached per (window, zone, start) and kept current as deltas apply; the cache
is derived data and never persisted.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from spendgate.domain.windows import WindowSpec, window_bounds

MINUTE = 60
QUARTER = 900
DAY = 86_400
MINUTE_RETENTION = 120  # minutes of minute buckets kept in the hot record
DAY_RETENTION = 400  # days of quarter-hour buckets kept


def _admits(watermarks: dict[int, int], partition: int, last_offset: int) -> bool:
    return last_offset > watermarks.get(partition, -1)


@dataclass
class HotRecord:
    total: int = 0
    minutes: dict[int, int] = field(default_factory=dict)  # epoch minute -> nanos
    watermarks: dict[int, int] = field(default_factory=dict)  # source partition -> last offset

    def to_json(self) -> dict[str, object]:
        return {
            "t": self.total,
            "m": {str(k): v for k, v in self.minutes.items()},
            "w": {str(k): v for k, v in self.watermarks.items()},
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> HotRecord:
        minutes = raw.get("m") or {}
        marks = raw.get("w") or {}
        assert isinstance(minutes, dict) and isinstance(marks, dict)
        total = raw.get("t", 0)
        assert isinstance(total, int)
        return cls(
            total,
            {int(k): int(v) for k, v in minutes.items()},
            {int(k): int(v) for k, v in marks.items()},
        )


@dataclass
class DayRecord:
    quarters: dict[int, int] = field(default_factory=dict)  # quarter index in the UTC day -> nanos
    watermarks: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "q": {str(k): v for k, v in self.quarters.items()},
            "w": {str(k): v for k, v in self.watermarks.items()},
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> DayRecord:
        quarters = raw.get("q") or {}
        marks = raw.get("w") or {}
        assert isinstance(quarters, dict) and isinstance(marks, dict)
        return cls(
            {int(k): int(v) for k, v in quarters.items()},
            {int(k): int(v) for k, v in marks.items()},
        )


@dataclass(frozen=True, slots=True)
class WindowSpend:
    start: int | None
    resets_at: int | None
    nanos: int


@dataclass
class _Counter:
    start: int
    end: int
    nanos: int
    q_start: int  # [q_start, q_end) is summed from quarter buckets, the rest from minute buckets
    q_end: int


def _quarter_span(start: int, end: int) -> tuple[int, int]:
    """The part of ``[start, end)`` read from quarter buckets (empty: ``(start, start)``)."""
    q_start = -(-start // QUARTER) * QUARTER  # first quarter boundary >= start
    q_end = end // QUARTER * QUARTER
    return (q_start, q_end) if q_start <= q_end else (start, start)


HOT = -1
"""The dirty-record id of the hot record; day records are identified by their epoch day."""


class ScopeLedger:
    """All spend of one scope. Pure: the caller loads records, applies deltas, saves dirty ones."""

    __slots__ = ("hot", "days", "_counters")

    def __init__(self, hot: HotRecord | None = None, days: Mapping[int, DayRecord] | None = None):
        self.hot = hot or HotRecord()
        self.days: dict[int, DayRecord] = dict(days or {})
        self._counters: dict[tuple[WindowSpec, str], _Counter] = {}

    @property
    def total(self) -> int:
        return self.hot.total

    def apply(self, partition: int, last_offset: int, minutes: Mapping[int, int]) -> list[int]:
        """Apply a delta (epoch minute -> nanos) from ``partition`` up to ``last_offset``.

        Idempotent per record. Returns the ids of the records it changed (``HOT`` or an epoch
        day) so the caller persists exactly those.
        """
        dirty: list[int] = []
        hot = self.hot
        if _admits(hot.watermarks, partition, last_offset):
            for minute, nanos in minutes.items():
                hot.total += nanos
                hot.minutes[minute] = hot.minutes.get(minute, 0) + nanos
                self._count(minute * MINUTE, nanos, from_quarters=False)
            hot.watermarks[partition] = last_offset
            if len(hot.minutes) > MINUTE_RETENTION:  # prune only when there may be old buckets
                horizon = max(hot.minutes) - MINUTE_RETENTION
                for minute in [m for m in hot.minutes if m <= horizon]:
                    del hot.minutes[minute]
            dirty.append(HOT)
        by_day: dict[int, list[tuple[int, int]]] = {}
        for minute, nanos in minutes.items():
            by_day.setdefault(minute * MINUTE // DAY, []).append((minute, nanos))
        for day, charges in by_day.items():
            record = self.days.setdefault(day, DayRecord())
            if not _admits(record.watermarks, partition, last_offset):
                continue
            for minute, nanos in charges:
                quarter = (minute * MINUTE - day * DAY) // QUARTER
                record.quarters[quarter] = record.quarters.get(quarter, 0) + nanos
                self._count(minute * MINUTE, nanos, from_quarters=True)
            record.watermarks[partition] = last_offset
            dirty.append(day)
        return dirty

    def _count(self, instant: int, nanos: int, *, from_quarters: bool) -> None:
        # A cached sum reads each part of its window from one kind of record (as sum_between
        # does), so a delta admitted by the hot record but not a day record (or the reverse,
        # after a crash between their writes) moves the cache exactly as a recomputation would.
        for c in self._counters.values():
            if c.start <= instant < c.end and (c.q_start <= instant < c.q_end) == from_quarters:
                c.nanos += nanos

    def spend(self, spec: WindowSpec, tz: ZoneInfo, now: int) -> WindowSpend:
        """Spend in the window of ``spec`` (in ``tz``) that holds ``now``."""
        if spec.is_total:
            return WindowSpend(None, None, self.hot.total)
        cache_key = (spec, tz.key)
        counter = self._counters.get(cache_key)
        if counter is None or not counter.start <= now < counter.end:
            start, end = window_bounds(spec, now, tz)
            counter = _Counter(start, end, self.sum_between(start, end), *_quarter_span(start, end))
            self._counters[cache_key] = counter
        return WindowSpend(counter.start, counter.end, counter.nanos)

    def sum_between(self, start: int, end: int) -> int:
        """Exact spend with ``start <= occurred_at < end`` from the buckets (see module doc)."""
        q_start, q_end = _quarter_span(start, end)
        if q_start == q_end:  # no whole quarter inside: all from minutes
            return self._sum_minutes(start, end)
        total = self._sum_minutes(start, q_start) + self._sum_minutes(q_end, end)
        for day in range(q_start // DAY, (q_end - 1) // DAY + 1):
            record = self.days.get(day)
            if record is None:
                continue
            base = day * DAY
            lo = max(0, (q_start - base) // QUARTER)
            hi = min(96, (q_end - base) // QUARTER)
            total += sum(n for q, n in record.quarters.items() if lo <= q < hi)
        return total

    def _sum_minutes(self, start: int, end: int) -> int:
        if start >= end:
            return 0
        return sum(n for m, n in self.hot.minutes.items() if start <= m * MINUTE < end)

    def expire(self, now: int) -> list[int]:
        """Drop day records older than ``DAY_RETENTION`` days; returns the epoch days dropped."""
        cutoff = now // DAY - DAY_RETENTION
        old = [day for day in self.days if day < cutoff]
        for day in old:
            del self.days[day]
        return old


def minute_charges(charges: Iterable[tuple[int, int]]) -> dict[int, int]:
    """Aggregate ``(occurred_at epoch seconds, nanos)`` pairs into epoch-minute buckets."""
    out: dict[int, int] = {}
    for instant, nanos in charges:
        minute = instant // MINUTE
        out[minute] = out.get(minute, 0) + nanos
    return out
