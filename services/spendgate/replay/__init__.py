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

import sys
import time
from typing import IO

from aiokafka.errors import KafkaError

from spendgate.adapters.kafka import KafkaUnavailable
from spendgate.analysis import Difference, Rebuild, diff_live, iso_ms, report, scope_matcher
from spendgate.replay.options import (
    ReplayOptions,
    ReportFormat,
    UsageError,
    load_budgets,
    select,
)
from spendgate.replay.progress import Progress
from spendgate.replay.reader import read_latest, read_registry, read_usage, usage_targets
from spendgate.replay.render import render
from spendgate.settings import Settings

EXIT_OK, EXIT_DIFF, EXIT_USAGE = 0, 1, 2
__all__ = ["ReplayOptions", "ReportFormat", "UsageError", "main_async", "run"]


async def run(options: ReplayOptions, settings: Settings, stdout: IO[str], stderr: IO[str]) -> int:
    """Read, rebuild, report; the exit code (module docstring)."""
    chosen = select(options)
    file_budgets = load_budgets(options.budgets) if options.budgets else None
    match = scope_matcher(options.scope)
    registry, rejected = await read_registry(settings)
    if rejected:
        print(f"replay: skipped {rejected} spend.config records that could not be applied", file=stderr)
    budgets = file_budgets if file_budgets is not None else dict(registry.budgets)
    starts, targets = await usage_targets(settings, chosen.as_of)
    total = sum(max(0, targets[p] - starts.get(p, 0)) for p in targets)
    horizon_s = settings.dedupe_horizon_h * 3600
    state = Rebuild(registry, settings.topic("usage"), budgets, chosen.start, chosen.end, horizon_s)
    progress = Progress(stderr, total, quiet=options.quiet)
    await read_usage(settings, state, starts, targets, progress, as_of_ms=chosen.as_of_ms)
    elapsed = progress.finish()
    if not options.quiet:
        rate = state.records / elapsed if elapsed else 0.0
        print(f"replay: {state.records} records in {elapsed:.2f}s ({rate:,.0f} events/s)", file=stderr)

    at = chosen.report_instant(time.time())
    reports = report(state, budgets, at=at, what_if=file_budgets is not None, match=match)
    diffs = None
    if options.diff_live:
        diffs = diff_live(state.ledgers, await read_latest(settings, "state"), match)
    meta = {
        "topic": settings.topic("usage"),
        "at": iso_ms(at),
        "from": iso_ms(chosen.start),
        "to": iso_ms(chosen.end),
        "positions": {str(p): t for p, t in sorted(targets.items())},
        "budgets": str(options.budgets) if options.budgets else "live (spend.config)",
        "what_if": file_budgets is not None,
        "records": state.records,
        "events": state.events,
        "duplicates": state.duplicates,
        "dead_letters": state.dead_letters,
        "out_of_range": state.out_of_range,
    }
    _write(options, render(options.format, meta, reports, diffs), stdout)
    return _exit_with_diffs(diffs, stderr)


def _write(options: ReplayOptions, text: str, stdout: IO[str]) -> None:
    if options.out:
        options.out.write_text(text)
    else:
        stdout.write(text)
        stdout.flush()


def _exit_with_diffs(diffs: list[Difference] | None, stderr: IO[str]) -> int:
    if diffs:
        print(f"replay: {len(diffs)} difference(s) with live spend.state:", file=stderr)
        for d in diffs:
            print(f"  {d}", file=stderr)
        return EXIT_DIFF
    if diffs is not None:
        print("replay: rebuilt spend equals live spend.state", file=stderr)
    return EXIT_OK


async def main_async(
    options: ReplayOptions,
    *,
    settings: Settings,
    stdout: IO[str] | None = None,
    stderr: IO[str] | None = None,
) -> int:
    """``spendgate replay`` inside a running event loop. Returns the exit code.

    Read-only: no consumer group, no offset commit, nothing produced.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
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
