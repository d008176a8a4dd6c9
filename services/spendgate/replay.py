"""``spendgate replay``: rebuild spend and decisions from ``spend.usage``, read-only.

    spendgate replay [--from earliest|TIME] [--to TIME] [--scope PATTERN] [--budgets FILE]
                     [--format table|csv|json] [--out PATH] [--diff-live] [--as-of OFFSETS|TIME]

What it does, in order:

1. Reads ``spend.config`` to its end into a :class:`RegistryView` (attribution and, unless
   ``--budgets`` is given, budgets are the current ones).
2. Takes the true end of every ``spend.usage`` partition from a Fetch high watermark (never
   ``end_offsets()``, which under-reports on Tansu) and stops there, or earlier at ``--as-of``.
3. Reads every partition from its log start with a plain consumer (no group, nothing
   committed, nothing produced) and feeds the batches to :class:`spendgate.analysis.Rebuild`,
   which runs the worker's own batch planner and ledger.
4. Simulates blocks in event-time order, prints the report, and with ``--diff-live`` compares
   the rebuilt spend with the latest ``spend.state`` record of every scope.

``--from``/``--to`` select events by their ``occurred_at`` (the time windows are decided by),
not by broker timestamps: the log is always read from its start, so an event's retry is still
recognised as a duplicate when the first copy lies before ``--from``. ``--as-of`` is a log
position: ``p:o,p:o`` (offsets before ``o`` in partition ``p``; partitions not named are read
to their end) or a time (each partition up to its first record whose broker timestamp is at or
after it).

Exit codes: 0 done (and, with ``--diff-live``, no difference); 1 differences found (each is
listed on stderr); 2 usage error or broker unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from spendgate.accounting.ingest import RawRecord
from spendgate.adapters.kafka import KafkaUnavailable, consumer, fetch_high_watermarks
from spendgate.analysis import (
    Difference,
    Rebuild,
    ScopeReport,
    diff_live,
    iso_ms,
    parse_budget_file,
    report,
    scope_matcher,
)
from spendgate.domain.budgets import Budget
from spendgate.domain.gate_state import state_supersedes
from spendgate.domain.money import format_usd
from spendgate.domain.registry import RegistryView
from spendgate.settings import Settings, SettingsError, settings_from_env

EXIT_OK, EXIT_DIFF, EXIT_USAGE = 0, 1, 2
FETCH_RECORDS = 10_000
_OFFSETS = re.compile(r"^\s*\d+\s*:\s*\d+\s*(,\s*\d+\s*:\s*\d+\s*)*$")


class UsageError(ValueError):
    """A bad option: the message says which and why (exit 2)."""


# ------------------------------------------------------------------------------ options


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spendgate replay",
        description="Rebuild every scope's spend from spend.usage (read-only), show when each "
        "budgeted scope was blocked, back-test budgets and diff against spend.state.",
    )
    parser.add_argument(
        "--from",
        dest="from_",
        default="earliest",
        metavar="earliest|TIME",
        help="only events with occurred_at >= TIME (RFC 3339); default earliest",
    )
    parser.add_argument("--to", metavar="TIME", help="only events with occurred_at < TIME")
    parser.add_argument(
        "--scope", metavar="PATTERN", help="only scopes matching this fnmatch pattern, e.g. 'team:*'"
    )
    parser.add_argument(
        "--budgets",
        metavar="FILE",
        type=Path,
        help="what-if: use these budgets ({scope: {limits, tz}}, YAML or JSON) instead of the live ones",
    )
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table")
    parser.add_argument("--out", metavar="PATH", type=Path, help="write the report here instead of stdout")
    parser.add_argument(
        "--diff-live",
        action="store_true",
        help="compare with the latest spend.state per scope; exit 1 listing every difference",
    )
    parser.add_argument(
        "--as-of",
        metavar="OFFSETS|TIME",
        help="only records before this log position: 'p:o,p:o' (exclusive) or a time",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


# ------------------------------------------------------------------------------ progress


class Progress:
    """A rich bar with events/s and ETA on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, stream: IO[str], total: int, *, quiet: bool = False, every_s: float = 2.0) -> None:
        self.stream, self.total, self.quiet, self.every_s = stream, total, quiet, every_s
        self.done = 0
        self.started = time.monotonic()
        self._last_line = self.started
        self._bar: Any = None
        self._task: Any = None
        if not quiet and stream.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as Bar,
            )

            self._bar = Bar(
                TextColumn("replay"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>9,.0f} events/s"),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TimeElapsedColumn(),
                console=Console(file=stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("replay", total=max(total, 1), rate=0.0)

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)

    def advance(self, n: int) -> None:
        self.done += n
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=self.rate)
            return
        now = time.monotonic()
        if now - self._last_line >= self.every_s:
            self._last_line = now
            self._line()

    def _line(self) -> None:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        print(
            f"replay: {self.done}/{self.total} records ({pct:.1f}%), {rate:,.0f} events/s, ETA {eta:.0f}s",
            file=self.stream,
            flush=True,
        )

    def finish(self) -> float:
        elapsed = time.monotonic() - self.started
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=self.rate)
            self._bar.stop()
        return elapsed


# ------------------------------------------------------------------------------ reading


async def read_registry(settings: Settings) -> tuple[RegistryView, int]:
    """The registry as of now: every ``spend.config`` record up to its end. Returns it and the
    number of records that could not be applied (logged, skipped)."""
    registry = RegistryView()
    rejected = 0

    def apply(key: str | None, value: Any) -> None:
        nonlocal rejected
        try:
            registry.apply(key or "", value)
        except Exception:  # noqa: BLE001 - a bad config record is skipped, as the gate does
            rejected += 1

    await _read_to_end(settings, settings.topic("config"), apply)
    return registry, rejected


async def read_latest(settings: Settings, short: str) -> dict[str, Any]:
    """Latest decoded value per key of a (compacted) topic, up to its end at start.

    For ``state``, latest as the gate sees it: a record older by provenance than the one kept
    (a late record from a worker that lost the scope) does not replace it.
    """
    latest: dict[str, Any] = {}
    ordered = short == "state"

    def keep(key: str | None, value: Any) -> None:
        if key is None:
            return
        held = latest.get(key)
        if ordered and value is not None and held is not None:
            try:
                if not state_supersedes(value, held):
                    return
            except (KeyError, TypeError, ValueError):
                pass  # a malformed record: log order, as before the field existed
        latest[key] = value

    await _read_to_end(settings, settings.topic(short), keep)
    return latest


async def _read_to_end(settings: Settings, topic: str, handler: Any) -> None:
    ends = await fetch_high_watermarks(settings.kafka_bootstrap, topic)
    client = consumer(settings, client_id="spendgate-replay")
    await client.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(ends)]
        client.assign(tps)
        await client.seek_to_beginning(*tps)
        pending = {tp for tp in tps if ends[tp.partition] > 0}
        pending = {tp for tp in pending if await client.position(tp) < ends[tp.partition]}
        while pending:
            batches = await client.getmany(*pending, timeout_ms=500, max_records=FETCH_RECORDS)
            for tp, messages in batches.items():
                for m in messages:
                    if m.offset >= ends[tp.partition]:
                        break
                    try:
                        value = None if m.value is None else orjson.loads(m.value)
                    except orjson.JSONDecodeError:
                        continue
                    handler(m.key.decode() if m.key else None, value)
            pending = {tp for tp in pending if await client.position(tp) < ends[tp.partition]}
    finally:
        await client.stop()


async def usage_targets(settings: Settings, as_of: AsOf | None) -> tuple[dict[int, int], dict[int, int]]:
    """``(start, target)`` offset per partition of ``spend.usage``: the log start, and where to stop."""
    topic = settings.topic("usage")
    ends = await fetch_high_watermarks(settings.kafka_bootstrap, topic)
    client = consumer(settings, client_id="spendgate-replay")
    await client.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(ends)]
        starts = {tp.partition: o for tp, o in (await client.beginning_offsets(tps)).items()}
    finally:
        await client.stop()
    targets = dict(ends)
    if as_of is not None and as_of.offsets is not None:
        unknown = sorted(set(as_of.offsets) - set(ends))
        if unknown:
            raise UsageError(f"--as-of: {topic} has no partition {unknown[0]} (it has {len(ends)})")
        for p, o in as_of.offsets.items():
            targets[p] = min(o, ends[p])
    return starts, {p: max(t, starts.get(p, 0)) for p, t in targets.items()}


async def read_usage(
    settings: Settings,
    state: Rebuild,
    starts: Mapping[int, int],
    targets: dict[int, int],
    progress: Progress,
    *,
    as_of_ms: int | None = None,
) -> None:
    """Feed every ``spend.usage`` record in ``[start, target)`` to ``state``, batch by batch."""
    topic = settings.topic("usage")
    client = consumer(settings, client_id="spendgate-replay", max_partition_fetch_bytes=4 * 1024 * 1024)
    await client.start()
    try:
        tps = {p: TopicPartition(topic, p) for p in sorted(targets)}
        client.assign(list(tps.values()))
        for p, tp in tps.items():
            client.seek(tp, starts.get(p, 0))
        pending = {p for p in tps if starts.get(p, 0) < targets[p]}
        while pending:
            batches = await client.getmany(
                *(tps[p] for p in pending), timeout_ms=500, max_records=FETCH_RECORDS
            )
            records: list[RawRecord] = []
            for tp, messages in batches.items():
                p = tp.partition
                for m in messages:
                    if m.offset >= targets[p]:
                        break
                    if as_of_ms is not None and m.timestamp >= as_of_ms:
                        targets[p] = m.offset  # the position of --as-of TIME in this partition
                        break
                    records.append(RawRecord(p, m.offset, m.value, m.key, m.timestamp / 1000))
            state.feed(records)
            progress.advance(len(records))
            pending = {p for p in pending if await client.position(tps[p]) < targets[p]}
    finally:
        await client.stop()


# ------------------------------------------------------------------------------- output


def _window_rows(r: ScopeReport) -> list[dict[str, Any]]:
    rows = []
    for w in r.status.windows:
        rows.append(
            {
                "window": w.window,
                "start": iso_ms(w.start),
                "resets_at": iso_ms(w.resets_at),
                "spend_usd": format_usd(w.spend),
                "limit_usd": None if w.limit is None else format_usd(w.limit),
                "reserved_usd": format_usd(r.reserved),
                "blocked": w.binding,
            }
        )
    return rows


def to_json(
    meta: Mapping[str, Any], reports: Sequence[ScopeReport], diffs: Sequence[Difference] | None
) -> dict[str, Any]:
    scopes = []
    for r in reports:
        t = r.timeline
        scopes.append(
            {
                "scope": r.scope,
                "budget": r.budget.to_json() if r.budget else None,
                "blocked_now": r.status.blocked,
                "windows": _window_rows(r),
                "blocked": [
                    {
                        "at": iso_ms(b.start),
                        "until": iso_ms(b.until),
                        "windows": list(b.windows),
                        "event_id": b.event_id,
                    }
                    for b in t.blocked
                ],
                "over_limit": [
                    {
                        "event_id": o.event_id,
                        "occurred_at": iso_ms(o.at),
                        "cost_usd": format_usd(o.nanos),
                        "partition": o.partition,
                        "offset": o.offset,
                        "prevented": o.prevented,
                    }
                    for o in t.over_limit
                ],
                "prevented_usd": format_usd(t.prevented_nanos),
            }
        )
    out: dict[str, Any] = {"v": 1, **meta, "scopes": scopes}
    if diffs is not None:
        out["differences"] = [
            {"scope": d.scope, "window": d.window, "live_usd": d.live, "rebuilt_usd": d.rebuilt}
            for d in diffs
        ]
    return out


def to_csv(reports: Sequence[ScopeReport]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [
            "scope",
            "window",
            "start",
            "resets_at",
            "spend_usd",
            "limit_usd",
            "blocked_now",
            "times_blocked",
            "first_blocked_at",
            "over_limit_calls",
            "prevented_usd",
            "reserved_usd",
        ]
    )
    for r in reports:
        t = r.timeline
        for w in _window_rows(r):
            periods = [b for b in t.blocked if w["window"] in b.windows]
            writer.writerow(
                [
                    r.scope,
                    w["window"],
                    w["start"] or "",
                    w["resets_at"] or "",
                    w["spend_usd"],
                    w["limit_usd"] or "",
                    str(w["blocked"]).lower(),
                    len(periods),
                    iso_ms(periods[0].start) if periods else "",
                    len(t.over_limit) if w["limit_usd"] else "",
                    format_usd(t.prevented_nanos) if w["limit_usd"] else "",
                    w["reserved_usd"],
                ]
            )
    return buf.getvalue()


def to_table(
    meta: Mapping[str, Any], reports: Sequence[ScopeReport], diffs: Sequence[Difference] | None
) -> str:
    positions = ",".join(f"{p}:{o}" for p, o in meta["positions"].items())
    outcome = "would have been prevented" if meta["what_if"] else "charged while blocked"
    lines = [
        f"replayed {meta['records']} records of {meta['topic']} up to {positions}: "
        f"{meta['events']} events, {meta['duplicates']} duplicates, {meta['dead_letters']} invalid"
        + (f", {meta['out_of_range']} outside --from/--to" if meta["out_of_range"] else ""),
        f"windows as of {meta['at']}; budgets: {meta['budgets']}",
        "",
    ]
    rows = [("SCOPE", "WINDOW", "SPEND_USD", "RESERVED_USD", "LIMIT_USD", "RESETS_AT", "BLOCKED")]
    for r in reports:
        for w in _window_rows(r):
            rows.append(
                (
                    r.scope,
                    w["window"],
                    w["spend_usd"],
                    w["reserved_usd"] if r.reserved else "-",
                    w["limit_usd"] or "-",
                    w["resets_at"] or "-",
                    "yes" if w["blocked"] else "",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows]
    budgeted = [r for r in reports if r.budget is not None]
    if budgeted:
        lines += ["", "Blocked periods (event time) and calls over the limit:"]
    for r in budgeted:
        t = r.timeline
        if not t.blocked:
            lines.append(f"  {r.scope}: never blocked")
            continue
        lines.append(
            f"  {r.scope}: blocked {len(t.blocked)}x, {len(t.over_limit)} calls over the limit, "
            f"{format_usd(t.prevented_nanos)} USD {outcome}"
        )
        for b in t.blocked:
            until = iso_ms(b.until) if b.until is not None else "still blocked"
            lines.append(
                f"    {iso_ms(b.start)} -> {until}  ({', '.join(b.windows)}; crossed by {b.event_id})"
            )
        for o in t.over_limit:
            what = "denied " if o.prevented else "crossed"
            where = f"p{o.partition}@{o.offset}"
            amount = format_usd(o.nanos)
            lines.append(f"    {what} {iso_ms(o.at)}  {amount:>12}  {o.event_id}  ({where})")
    if diffs is not None:
        lines += ["", f"Differences with live spend.state: {len(diffs) or 'none'}"]
        lines += [f"  {d}" for d in diffs]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- main


async def run(options: argparse.Namespace, settings: Settings, stdout: IO[str], stderr: IO[str]) -> int:
    start = None if options.from_ in (None, "", "earliest") else parse_time(options.from_, "--from")
    end = None if options.to is None else parse_time(options.to, "--to")
    as_of = None if options.as_of is None else parse_as_of(options.as_of)
    if start is not None and end is not None and end <= start:
        raise UsageError("--to must be after --from")
    if options.diff_live and (start is not None or end is not None or as_of is not None):
        raise UsageError("--diff-live compares the whole log with live state: drop --from/--to/--as-of")
    file_budgets = load_budgets(options.budgets) if options.budgets else None
    match = scope_matcher(options.scope)

    registry, rejected = await read_registry(settings)
    if rejected:
        print(f"replay: skipped {rejected} spend.config records that could not be applied", file=stderr)
    budgets = file_budgets if file_budgets is not None else dict(registry.budgets)
    starts, targets = await usage_targets(settings, as_of)
    total = sum(max(0, targets[p] - starts.get(p, 0)) for p in targets)
    state = Rebuild(registry, settings.topic("usage"), budgets, start, end, settings.dedupe_horizon_h * 3600)
    progress = Progress(stderr, total, quiet=options.quiet)
    as_of_ms = None if as_of is None or as_of.time is None else int(as_of.time * 1000)
    await read_usage(settings, state, starts, targets, progress, as_of_ms=as_of_ms)
    elapsed = progress.finish()
    if not options.quiet:
        rate = state.records / elapsed if elapsed else 0.0
        print(f"replay: {state.records} records in {elapsed:.2f}s ({rate:,.0f} events/s)", file=stderr)

    if end is not None:
        at = int(end) - 1
    elif as_of is not None and as_of.time is not None:
        at = int(as_of.time)
    else:
        at = int(time.time())
    reports = report(state, budgets, at=at, what_if=file_budgets is not None, match=match)
    diffs = (
        diff_live(state.ledgers, await read_latest(settings, "state"), match) if options.diff_live else None
    )

    meta = {
        "topic": settings.topic("usage"),
        "at": iso_ms(at),
        "from": iso_ms(start),
        "to": iso_ms(end),
        "positions": {str(p): t for p, t in sorted(targets.items())},
        "budgets": str(options.budgets) if options.budgets else "live (spend.config)",
        "what_if": file_budgets is not None,
        "records": state.records,
        "events": state.events,
        "duplicates": state.duplicates,
        "dead_letters": state.dead_letters,
        "out_of_range": state.out_of_range,
    }
    if options.format == "json":
        text = orjson.dumps(to_json(meta, reports, diffs), option=orjson.OPT_INDENT_2).decode() + "\n"
    elif options.format == "csv":
        text = to_csv(reports)
    else:
        text = to_table(meta, reports, diffs)
    if options.out:
        options.out.write_text(text)
    else:
        stdout.write(text)
        stdout.flush()
    if diffs:
        print(f"replay: {len(diffs)} difference(s) with live spend.state:", file=stderr)
        for d in diffs:
            print(f"  {d}", file=stderr)
        return EXIT_DIFF
    if diffs is not None:
        print("replay: rebuilt spend equals live spend.state", file=stderr)
    return EXIT_OK


async def main_async(
    argv: Sequence[str],
    *,
    settings: Settings,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """``spendgate replay`` inside a running event loop (tests). Returns the exit code."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    try:
        options = build_parser().parse_args(list(argv))
    except SystemExit as exc:  # --help or a usage error, already printed by argparse
        return int(exc.code or 0)
    try:
        return await run(options, settings, stdout, stderr)
    except UsageError as exc:
        print(f"spendgate replay: {exc}", file=stderr)
        return EXIT_USAGE
    except (KafkaUnavailable, KafkaError, OSError) as exc:
        print(
            f"spendgate replay: Kafka at {settings.kafka_bootstrap} failed: {exc} "
            "(check SPENDGATE_KAFKA_BOOTSTRAP)",
            file=stderr,
        )
        return EXIT_USAGE


def main(argv: Sequence[str] | None = None, *, settings: Settings | None = None) -> int:
    """Entry point of ``spendgate replay`` (the CLI passes its raw arguments). Returns the exit code.

    Read-only: no consumer group, no offset commit, nothing produced.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if settings is None and not {"-h", "--help"} & set(args):
        try:
            settings = settings_from_env()
        except SettingsError as exc:
            print(f"spendgate replay: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return asyncio.run(main_async(args, settings=settings or Settings()))
