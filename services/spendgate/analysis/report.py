"""The per-scope report of a replay, and its differences with live ``spend.state``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from spendgate.analysis.blocks import Timeline, simulate
from spendgate.analysis.rebuild import Rebuild, ScopeMatch
from spendgate.domain.budgets import NO_BUDGET, Budget
from spendgate.domain.decide import ScopeStatus, decide
from spendgate.domain.ledger import ScopeLedger
from spendgate.domain.money import format_usd, parse_usd


@dataclass(frozen=True, slots=True)
class ScopeReport:
    scope: str
    budget: Budget | None
    status: ScopeStatus  # windows at the reference time, from the rebuilt ledger
    timeline: Timeline
    reserved: int = 0  # nanos held by outstanding holds at the reference time (event-time expiry)


def report(
    state: Rebuild, budgets: Mapping[str, Budget], *, at: int, what_if: bool, match: ScopeMatch
) -> list[ScopeReport]:
    """Every matching scope that has spend or a budget, sorted by scope text."""
    scopes = sorted(s for s in set(state.ledgers) | set(budgets) if match(s))
    # A what-if denial depends on every budgeted scope of the call; live-budget scopes are
    # independent, so only the ones shown need simulating.
    simulated = budgets if what_if else {s: b for s, b in budgets.items() if match(s)}
    timelines = simulate(state.charges, simulated, end=at, what_if=what_if)
    out = []
    for scope in scopes:
        budget = budgets.get(scope)
        ledger = state.ledgers.get(scope) or ScopeLedger()
        status = decide(budget or NO_BUDGET, ledger, at)
        reserved = ledger.reserved(at * 1000)
        out.append(ScopeReport(scope, budget, status, timelines.get(scope) or Timeline(), reserved))
    return out


# --------------------------------------------------------------------------------- diff


@dataclass(frozen=True, slots=True)
class Difference:
    scope: str
    window: str
    live: str | None  # decimal string; None when live state has no record for the scope
    rebuilt: str

    def __str__(self) -> str:
        live = "missing" if self.live is None else self.live
        return f"{self.scope} {self.window}: live {live}, rebuilt {self.rebuilt}"


def _epoch(text: str | None) -> int | None:
    if text is None:
        return None
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC).timestamp())


def diff_live(
    ledgers: Mapping[str, ScopeLedger], live: Mapping[str, Mapping[str, object] | None], match: ScopeMatch
) -> list[Difference]:
    """Compare the rebuilt spend with the latest ``spend.state`` record of every scope.

    For each live record: its ``total`` and every window it lists (summed over the record's own
    ``[start, resets_at)``, so the budget or time zone it was computed with does not matter),
    and ``reserved_usd`` (the rebuilt holds at the record's ``as_of``: expiry is event time, so
    the same log says the same thing about the same instant; window ``reserved:<window>``).
    A rebuilt scope with spend but no live record is a difference too. Sorted by scope.
    """
    out: list[Difference] = []
    for scope in sorted(set(ledgers) | {s for s, v in live.items() if v is not None}):
        if not match(scope):
            continue
        ledger = ledgers.get(scope) or ScopeLedger()
        record = live.get(scope)
        if record is None:
            if ledger.total:
                out.append(Difference(scope, "total", None, format_usd(ledger.total)))
            continue
        windows = record.get("windows") or []
        assert isinstance(windows, list)
        for w in windows:
            name = str(w["window"])
            if name == "total":
                rebuilt = ledger.total
            else:
                start, end = _epoch(w.get("start")), _epoch(w.get("resets_at"))
                if start is None or end is None:
                    continue
                rebuilt = ledger.sum_between(start, end)
            live_nanos = parse_usd(w["spend_usd"])
            if live_nanos != rebuilt:
                out.append(Difference(scope, name, format_usd(live_nanos), format_usd(rebuilt)))
            if "reserved_usd" in w:
                as_of = datetime.fromisoformat(str(record["as_of"]).replace("Z", "+00:00")).timestamp()
                held = ledger.reserved(int(as_of * 1000))
                live_held = parse_usd(w["reserved_usd"])
                if live_held != held:
                    out.append(Difference(scope, f"reserved:{name}", format_usd(live_held), format_usd(held)))
    return out


def iso_ms(instant: float | None) -> str | None:
    """Epoch seconds as RFC 3339 UTC with milliseconds when it has any."""
    if instant is None:
        return None
    moment = datetime.fromtimestamp(instant, UTC)
    text = moment.isoformat(timespec="milliseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")
