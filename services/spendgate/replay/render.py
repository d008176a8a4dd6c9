"""Replay's reports: a table for people, CSV and JSON for tools."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from spendgate.analysis import Difference, ScopeReport, iso_ms
from spendgate.domain.money import format_usd


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


def render(
    format: str, meta: Mapping[str, Any], reports: Sequence[ScopeReport], diffs: list[Difference] | None
) -> str:
    """The report as ``format`` (table, csv or json)."""
    if format == "json":
        return orjson.dumps(to_json(meta, reports, diffs), option=orjson.OPT_INDENT_2).decode() + "\n"
    if format == "csv":
        return to_csv(reports)
    return to_table(meta, reports, diffs)
