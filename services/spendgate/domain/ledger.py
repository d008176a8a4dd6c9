"""Exact spend of one scope, in time buckets, applied idempotently (no transactions needed).

Storage (what the worker persists, one table record each):
- the *hot* record: lifetime ``total``, minute buckets of at least the last
  ``MINUTE_RETENTION`` minutes (about that many buckets at most), a watermark per source
  partition, and the quarter-hour buckets of the ``HOT_DAYS`` newest UTC days, so a delta of
  the current day changes one record, not two;
- one *day* record per older UTC day: quarter-hour buckets of that day, with its own watermarks.

Each day's quarters have one authoritative record: its day record when one exists, else the
hot record. When a newer day pushes a day out of the hot record it is *exported*: a day record
is made from the hot copy with the hot watermarks (same content, same deltas), and the hot copy
stays in the hot record until :meth:`ScopeLedger.settle` says the day record is durable. A crash
in between leaves either the hot copy alone (the day record was lost) or both (the day record
wins), never neither. A delta for a day older than the hot ones and without a day record starts
a new day record.

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

Holds (``domain.holds``): the hot record also keeps the scope's outstanding holds (hold id ->
``[nanos, expires_at_ms]``), changed by the hold ops of a delta when the hot record admits it,
so they are exactly as idempotent as the charges. :meth:`ScopeLedger.reserved` is what they
hold at an instant (expired ones count nothing, whether pruned yet or not).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from spendgate.domain import holds as hold_ops
from spendgate.domain.windows import WindowSpec, window_bounds

MINUTE = 60
QUARTER = 900
DAY = 86_400
MINUTE_RETENTION = 120  # minutes of minute buckets kept in the hot record
DAY_RETENTION = 400  # days of quarter-hour buckets kept
HOT_DAYS = 2  # newest UTC days whose quarters live in the hot record (today and yesterday)


def _admits(watermarks: dict[int, int], partition: int, last_offset: int) -> bool:
    return last_offset > watermarks.get(partition, -1)


@dataclass
class HotRecord:
    total: int = 0
    minutes: dict[int, int] = field(default_factory=dict)  # epoch minute -> nanos
    watermarks: dict[int, int] = field(default_factory=dict)  # source partition -> last offset
    days: dict[int, dict[int, int]] = field(default_factory=dict)  # epoch day -> quarter -> nanos
    holds: dict[str, list[int]] = field(default_factory=dict)  # hold id -> [nanos, expires_at_ms]

    def to_json(self) -> dict[str, object]:
        """A JSON-ready copy, but with integer keys: dump it with ``orjson.OPT_NON_STR_KEYS``
        (or ``json``), which writes them as strings. Copying dicts beats re-keying them."""
        out: dict[str, object] = {"t": self.total, "m": dict(self.minutes), "w": dict(self.watermarks)}
        if self.days:  # absent in records written before days lived here: same format then
            out["d"] = {d: dict(qs) for d, qs in self.days.items()}
        if self.holds:  # likewise absent without holds
            out["h"] = {hid: list(h) for hid, h in self.holds.items()}
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> HotRecord:
        minutes = raw.get("m") or {}
        marks = raw.get("w") or {}
        days = raw.get("d") or {}
        holds = raw.get("h") or {}
        assert isinstance(minutes, dict) and isinstance(marks, dict) and isinstance(days, dict)
        assert isinstance(holds, dict)
        total = raw.get("t", 0)
        assert isinstance(total, int)
        return cls(
            total,
            {int(k): int(v) for k, v in minutes.items()},
            {int(k): int(v) for k, v in marks.items()},
            {int(d): {int(q): int(n) for q, n in qs.items()} for d, qs in days.items()},
            {str(k): [int(h[0]), int(h[1])] for k, h in holds.items()},
        )


@dataclass
class DayRecord:
    quarters: dict[int, int] = field(default_factory=dict)  # quarter index in the UTC day -> nanos
    watermarks: dict[int, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        """Like :meth:`HotRecord.to_json`: integer keys."""
        return {"q": dict(self.quarters), "w": dict(self.watermarks)}

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

    def apply(
        self,
        partition: int,
        last_offset: int,
        minutes: Mapping[int, int],
        holds: Iterable[hold_ops.HoldOp] = (),
    ) -> list[int]:
        """Apply a delta (epoch minute -> nanos, and hold ops) from ``partition`` up to
        ``last_offset``.

        Idempotent per record (hold ops go with the hot record). Returns the ids of the records
        it changed (``HOT`` or an epoch day, also for a day exported from the hot record) so the
        caller persists exactly those; after they are durable, call :meth:`settle`.
        """
        dirty: list[int] = []
        hot = self.hot
        hot_days = hot.days
        records = self.days
        counting = bool(self._counters)
        hot_admits = last_offset > hot.watermarks.get(partition, -1)
        if hot_admits:
            hot_minutes = hot.minutes
            for minute, nanos in minutes.items():
                hot.total += nanos
                hot_minutes[minute] = hot_minutes.get(minute, 0) + nanos
                if counting:
                    self._count(minute * MINUTE, nanos, from_quarters=False)
            if holds:
                hold_ops.apply_ops(hot.holds, holds)
            hot.watermarks[partition] = last_offset
            if len(hot_minutes) > MINUTE_RETENTION:  # prune only when there may be old buckets
                horizon = max(hot_minutes) - MINUTE_RETENTION
                for minute in [m for m in hot_minutes if m <= horizon]:
                    del hot_minutes[minute]
            dirty.append(HOT)
        floor = max(hot_days) - (HOT_DAYS - 1) if hot_days else None
        admitted: dict[int, bool] = {}  # day record -> admits this delta
        for minute, nanos in minutes.items():
            instant = minute * MINUTE
            day = instant // DAY
            quarter = (instant - day * DAY) // QUARTER
            record = records.get(day)
            if record is None and (floor is None or day >= floor or day in hot_days):
                if hot_admits:
                    quarters = hot_days.get(day)
                    if quarters is None:
                        quarters = hot_days[day] = {}
                    quarters[quarter] = quarters.get(quarter, 0) + nanos
                    if counting:
                        self._count(instant, nanos, from_quarters=True)
                continue
            if record is None:
                record = records[day] = DayRecord()
            admits = admitted.get(day)
            if admits is None:
                admits = admitted[day] = _admits(record.watermarks, partition, last_offset)
                if admits:
                    dirty.append(day)
            if admits:
                record.quarters[quarter] = record.quarters.get(quarter, 0) + nanos
                if counting:
                    self._count(instant, nanos, from_quarters=True)
        for day in admitted:
            if admitted[day]:
                records[day].watermarks[partition] = last_offset
        if hot_admits and len(hot_days) > 1:
            dirty += self._export()
        return dirty

    def _export(self) -> list[int]:
        """Turn hot days older than the ``HOT_DAYS`` newest into day records (see module doc)."""
        hot = self.hot
        floor = max(hot.days) - (HOT_DAYS - 1)
        exported = [day for day in hot.days if day < floor and day not in self.days]
        for day in exported:
            self.days[day] = DayRecord(dict(hot.days[day]), dict(hot.watermarks))
        return exported

    def settle(self) -> None:
        """Drop the hot copies of exported days: call once their day records are durable."""
        for day in [day for day in self.hot.days if day in self.days]:
            del self.hot.days[day]

    def reserved(self, now_ms: int) -> int:
        """Nano-dollars held by this scope's outstanding holds at ``now_ms`` (epoch ms)."""
        return hold_ops.reserved(self.hot.holds, now_ms) if self.hot.holds else 0

    def quarters(self, day: int) -> dict[int, int]:
        """Quarter-hour buckets of an epoch day, from its authoritative record."""
        record = self.days.get(day)
        return record.quarters if record is not None else self.hot.days.get(day, {})

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
            quarters = self.quarters(day)
            if not quarters:
                continue
            base = day * DAY
            lo = max(0, (q_start - base) // QUARTER)
            hi = min(96, (q_end - base) // QUARTER)
            total += sum(n for q, n in quarters.items() if lo <= q < hi)
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
            self.hot.days.pop(day, None)  # an unsettled hot copy must not count again
        return old


def minute_charges(charges: Iterable[tuple[int, int]]) -> dict[int, int]:
    """Aggregate ``(occurred_at epoch seconds, nanos)`` pairs into epoch-minute buckets."""
    out: dict[int, int] = {}
    for instant, nanos in charges:
        minute = instant // MINUTE
        out[minute] = out.get(minute, 0) + nanos
    return out
