"""``spendgate replay``'s options (declared in the typer CLI) and how their text is read."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

import orjson

from spendgate.analysis import parse_budget_file
from spendgate.domain.budgets import Budget

_OFFSETS = re.compile(r"^\s*\d+\s*:\s*\d+\s*(,\s*\d+\s*:\s*\d+\s*)*$")


class UsageError(ValueError):
    """A bad option: the message says which and why (exit 2)."""


class ReportFormat(StrEnum):
    TABLE = "table"
    CSV = "csv"
    JSON = "json"


@dataclass(frozen=True)
class ReplayOptions:
    """What ``spendgate replay`` was asked (``spendgate replay --help`` describes each)."""

    from_: str = "earliest"
    to: str | None = None
    scope: str | None = None
    budgets: Path | None = None
    format: ReportFormat = ReportFormat.TABLE
    out: Path | None = None
    diff_live: bool = False
    as_of: str | None = None
    quiet: bool = False


def parse_time(text: str, option: str) -> float:
    """RFC 3339 (``2026-11-23T10:00:00Z``; a date or a time without offset is taken as UTC)."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise UsageError(f"{option}: {text!r} is not an RFC 3339 time (e.g. 2026-11-23T10:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True)
class AsOf:
    offsets: dict[int, int] | None = None
    time: float | None = None


def parse_as_of(text: str) -> AsOf:
    if _OFFSETS.match(text):
        offsets: dict[int, int] = {}
        for part in text.split(","):
            p, o = part.split(":")
            offsets[int(p)] = int(o)
        return AsOf(offsets=offsets)
    return AsOf(time=parse_time(text, "--as-of"))


def load_budgets(path: Path) -> dict[str, Budget]:
    """A YAML or JSON file ``{scope: {limits: [...], tz: ...}}``."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--budgets: cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix.lower() == ".json":
            raw = orjson.loads(text)
        else:
            import yaml  # JSON is YAML too

            raw = yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise UsageError(f"--budgets: {path} is not valid YAML/JSON: {exc}") from None
    try:
        return parse_budget_file(raw)
    except ValueError as exc:
        raise UsageError(f"--budgets: {exc}") from None


@dataclass(frozen=True)
class Selection:
    """Which events count (``occurred_at`` in ``[start, end)``) and where the log is cut."""

    start: float | None
    end: float | None
    as_of: AsOf | None

    @property
    def as_of_ms(self) -> int | None:
        return None if self.as_of is None or self.as_of.time is None else int(self.as_of.time * 1000)

    def report_instant(self, now: float) -> int:
        """The instant the report describes: just before ``--to``, at ``--as-of``, else now."""
        if self.end is not None:
            return int(self.end) - 1
        if self.as_of is not None and self.as_of.time is not None:
            return int(self.as_of.time)
        return int(now)


def select(options: ReplayOptions) -> Selection:
    """``--from``, ``--to`` and ``--as-of`` read and checked together (``UsageError``)."""
    start = None if options.from_ in (None, "", "earliest") else parse_time(options.from_, "--from")
    end = None if options.to is None else parse_time(options.to, "--to")
    as_of = None if options.as_of is None else parse_as_of(options.as_of)
    if start is not None and end is not None and end <= start:
        raise UsageError("--to must be after --from")
    if options.diff_live and (start is not None or end is not None or as_of is not None):
        raise UsageError("--diff-live compares the whole log with live state: drop --from/--to/--as-of")
    return Selection(start, end, as_of)
