"""Stage B, pure: what to publish for a scope after its spend, its budget or the clock moved.

- A decision is published when the scope's blocked state or its binding windows (window,
  reset, limit) differ from what this process last published for it, and once for every
  budgeted scope after a (re)start, since a new process cannot know what readers hold.
- Alerts fire once per window occurrence: ``soft_limit`` and ``blocked`` per (window, start),
  ``unblocked`` on every blocked -> unblocked transition.
- ``seq`` grows strictly per scope, across restarts and owners: microseconds of wall clock,
  bumped past the last one used.
- Decisions and state records carry the scope ledger's ``watermarks`` (last ``spend.usage``
  offset per partition): readers order a scope's records by them first, so a record from an
  owner that knew less never replaces one from an owner that knew more (``domain.gate_state``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

import orjson

from spendgate.domain.budgets import Budget
from spendgate.domain.decide import ScopeStatus, SpendSource, decide
from spendgate.domain.money import format_usd
from spendgate.records import Alert, Decision, DecisionWindow, Source


def _ts(instant: int | float | None) -> datetime | None:
    return None if instant is None else datetime.fromtimestamp(instant, UTC)


@dataclass
class _Published:
    key: tuple[tuple[str, int | None, int | None], ...]
    blocked: bool
    seq: int


@dataclass
class Outputs:
    decision: Decision | None = None
    alerts: list[Alert] = field(default_factory=list)
    status: ScopeStatus | None = None


@dataclass
class Publisher:
    published: dict[str, _Published] = field(default_factory=dict)
    alerted: set[tuple[str, str, str, int | None]] = field(default_factory=set)

    def _next_seq(self, scope: str, now: float) -> int:
        previous = self.published.get(scope)
        floor = previous.seq + 1 if previous else 0
        return max(floor, int(now * 1_000_000))

    def evaluate(
        self,
        scope: str,
        budget: Budget,
        spend: SpendSource,
        now: float,
        source: Source | None,
        watermarks: Mapping[int, int] | None = None,
    ) -> Outputs:
        """Decide the scope at ``now`` and return the records that must go out (maybe none)."""
        status = decide(budget, spend, int(now))
        out = Outputs(status=status)
        previous = self.published.get(scope)
        key = status.decision_key()
        if previous is None and budget.is_unlimited:
            return out
        if previous is None or previous.key != key or previous.blocked != status.blocked:
            seq = self._next_seq(scope, now)
            out.decision = Decision(
                scope=scope,
                blocked=status.blocked,
                seq=seq,
                as_of=_ts(now),  # type: ignore[arg-type]
                source=source,
                watermarks=None if watermarks is None else wire_watermarks(watermarks),
                windows=[
                    DecisionWindow(
                        window=w.window,
                        spend_usd=format_usd(w.spend),  # type: ignore[arg-type]
                        limit_usd=format_usd(w.limit or 0),  # type: ignore[arg-type]
                        resets_at=_ts(w.resets_at),
                    )
                    for w in status.binding
                ],
            )
            if previous is not None and previous.blocked and not status.blocked:
                out.alerts.append(Alert(scope=scope, kind="unblocked", window=None, as_of=_ts(now)))  # type: ignore[arg-type]
            self.published[scope] = _Published(key, status.blocked, seq)
        for w in status.windows:
            for kind, fired in (("soft_limit", w.soft_crossed), ("blocked", w.binding)):
                mark = (scope, kind, w.window, w.start)
                if fired and mark not in self.alerted:
                    self.alerted.add(mark)
                    out.alerts.append(
                        Alert(
                            scope=scope,
                            kind=kind,  # type: ignore[arg-type]
                            window=w.window,
                            spend_usd=format_usd(w.spend),  # type: ignore[arg-type]
                            limit_usd=format_usd((w.soft if kind == "soft_limit" else w.limit) or 0),  # type: ignore[arg-type]
                            resets_at=_ts(w.resets_at),
                            as_of=_ts(now),  # type: ignore[arg-type]
                        )
                    )
        return out

    def forget(self, scope: str) -> None:
        """Drop what was published for a scope this process no longer owns."""
        self.published.pop(scope, None)

    def forget_where(self, lost: Callable[[str], bool]) -> None:
        """Drop the decision and alert memory of every scope ``lost`` says this process lost."""
        self.published = {scope: p for scope, p in self.published.items() if not lost(scope)}
        self.alerted = {mark for mark in self.alerted if not lost(mark[0])}


def wire_watermarks(watermarks: Mapping[int, int]) -> dict[str, int]:
    """A ledger's watermarks as records carry them (JSON object keys are strings)."""
    return {str(p): o for p, o in watermarks.items()}


@lru_cache(maxsize=4096)
def _iso(instant: int | float | None) -> str | None:
    """RFC 3339 text of an instant. Cached: a tick writes the same ``now`` and the same window
    bounds (today's start, its reset, ...) into thousands of records."""
    ts = _ts(instant)
    return None if ts is None else ts.isoformat().replace("+00:00", "Z")


def state_json(
    scope: str,
    status: ScopeStatus,
    now: float,
    source: Source | None,
    watermarks: Mapping[int, int] | None = None,
    reserved: int = 0,
    holds_expire_at: float | None = None,
) -> bytes:
    """The ``spend.state`` record of a scope (``records.State``: every window of its budget plus
    ``total``), serialized without building the model: the tick emits thousands.

    ``reserved``: nano-dollars held at ``now`` by the scope's outstanding holds, shown in every
    window (a hold is for a call running now, whichever window its cost lands in);
    ``holds_expire_at``: the latest expiry among them (epoch s), after which readers count none.
    """
    held = format_usd(reserved)
    return orjson.dumps(
        {
            "v": 1,
            "scope": scope,
            "as_of": _iso(now),
            "source": None if source is None else {"partition": source.partition, "offset": source.offset},
            "watermarks": None if watermarks is None else wire_watermarks(watermarks),
            "holds_expire_at": _iso_ms(holds_expire_at) if reserved else None,
            "windows": [
                {
                    "window": w.window,
                    "start": _iso(w.start),
                    "resets_at": _iso(w.resets_at),
                    "spend_usd": format_usd(w.spend),
                    "reserved_usd": held,
                }
                for w in status.windows
            ],
        }
    )


def _iso_ms(instant: float | None) -> str | None:
    if instant is None:
        return None
    return datetime.fromtimestamp(instant, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
