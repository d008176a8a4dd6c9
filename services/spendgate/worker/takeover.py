"""A group generation's start: what the ledger table holds, and the takeover republish.

A worker that starts a generation (after a restart or a rebalance) republishes the state of
every scope it owns: the last owner may have counted deltas without publishing them (issue 13).
With 50,000 scopes, decoding every ledger and publishing every state in the first tick held
the ``publishing`` lock for seconds while fresh spend waited (issue 16). So a generation only
lists its scopes here (keys, no decoding: ledgers load on first use), and the republish is a
backlog the ticks drain :data:`BACKLOG_CHUNK` scopes at a time, after the scopes with new
deltas or decisions, which go out at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

__all__ = ["BACKLOG_CHUNK", "Stored", "stored_scopes", "takeover_chunk"]

log = logging.getLogger(__name__)

#: Takeover scopes a tick publishes besides its dirty ones (~0.1 s of work on this box).
BACKLOG_CHUNK = 1000


@dataclass
class Stored:
    """What the ledger table holds of a scope: its day records, and whether its hot record
    has holds (their expiry must be watched from the generation's start)."""

    days: list[int] = field(default_factory=list)
    holds: bool = False


def stored_scopes(items: Iterable[tuple[str, Any]], owns: Callable[[str], bool]) -> dict[str, Stored]:
    """The owned scopes among the ledger table's ``(key, value)`` items: a scope's hot record is
    keyed by the scope, a day record by ``scope@day``. Reads keys and a hot record's holds only."""
    out: dict[str, Stored] = {}
    for key, value in items:
        scope, at, day = key.rpartition("@")
        if at and scope:
            if owns(scope):
                out.setdefault(scope, Stored()).days.append(int(day))
        elif owns(key):
            out.setdefault(key, Stored()).holds = bool(value.get("h"))
    return out


def takeover_chunk(
    backlog: dict[str, None],
    dirty: Mapping[str, object],
    unflushed: Collection[str],
    limit: int = BACKLOG_CHUNK,
) -> list[str]:
    """Take the next ``limit`` scopes off the takeover ``backlog`` for this tick.

    Scopes already ``dirty`` leave the backlog without counting (the tick publishes them
    anyway); scopes with changelog writes in flight stay (they are dirty once acked).
    """
    for scope in dirty:
        backlog.pop(scope, None)
    taken = [scope for scope in islice(backlog, limit) if scope not in unflushed]
    for scope in taken:
        del backlog[scope]
    if taken and not backlog:
        log.info("takeover republish: the last %d scopes go out with this tick", len(taken))
    return taken
