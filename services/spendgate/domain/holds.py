"""Holds: money reserved for a request until its real cost arrives (CONTRACT §2, §4; issue 15).

A hold is identified by ``(key_id, request_id)``. It starts with a usage event of ``kind:
"hold"`` (``estimated_cost_usd``, ``hold_ttl_s``) and ends exactly once, whichever comes first
in the key's partition of ``spend.usage``:

- *settled* by the ``cost`` event with the same ``request_id`` (the cost is counted as any cost;
  the hold simply stops counting),
- *released* by a ``kind: "release"`` event with that ``request_id``, or
- *expired* at ``occurred_at + hold_ttl_s`` (event time: it counts while ``now < expires_at``,
  whoever computes it and whenever, so a replay says what the worker said at the same instant).

An end that arrives first voids the hold that follows it in the log (a gateway that reported
the cost before the gate's hold reached the log); a second hold, settle or release of the same
request changes nothing.

Three pure pieces, one per place holds live:

1. :class:`HoldBook` (worker stage A, and replay): per usage partition, the offsets where each
   request's hold started and ended, and the scopes the hold was charged to. Every mark is
   remembered with the place (partition, offset) it was first seen at, like ``seen`` event ids,
   so a batch replayed after a crash is planned exactly as the first time.
2. Scope hold maps (worker stage B, in the scope ledger's hot record): hold id -> ``(nanos,
   expires_at_ms)``, changed by ordered ops ``[id, nanos, expires_at_ms]`` (add) and ``[id]``
   (end); :func:`reserved` sums the live ones at an instant.
3. :class:`LocalHolds` (the answering gate): holds this process placed that ``spend.state``
   does not reflect yet, per scope, and the remembered answer of each reserving check (a retry
   with the same ``request_id`` gets it back and holds nothing more).

Money is integer nano-dollars; instants are integer epoch milliseconds (exact in JSON).
"""

from __future__ import annotations

import hashlib
import heapq
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_TTL_S = 600
MAX_TTL_S = 3600
MEMORY_S = 2 * MAX_TTL_S
"""How long stage A remembers a request's marks. A hold older than its TTL counts nothing
anyway, and an end that came first voids a hold arriving up to ``MAX_TTL_S`` later."""

MARKS_PER_RECORD = 500

HoldOp = list[Any]  # [hold id, nanos, expires_at_ms] (add) or [hold id] (end)
ScopeHolds = dict[str, list[int]]  # hold id -> [nanos, expires_at_ms]


def hold_id(key_id: str, request_id: str) -> str:
    """The hold's id in deltas and ledgers: unique per key and request, ids kept apart by NUL
    (ids never contain control characters)."""
    return f"{key_id}\x00{request_id}"


def event_id_for(kind: str, key_id: str, request_id: str) -> str:
    """The ``event_id`` a gate gives the hold / release event it appends: the same for every
    replica and every retry, so the log counts it once (dedupe by event id)."""
    digest = hashlib.sha256(f"{key_id}\x00{request_id}".encode()).hexdigest()[:40]
    return f"{kind}-{digest}"


def expires_at_ms(occurred_at_s: float, ttl_s: int | None) -> int:
    """When a hold placed at ``occurred_at_s`` stops counting (epoch ms)."""
    ttl = DEFAULT_TTL_S if ttl_s is None else min(int(ttl_s), MAX_TTL_S)
    return round(occurred_at_s * 1000) + ttl * 1000


# ----------------------------------------------------------------------- 1. stage A


@dataclass(frozen=True, slots=True)
class Start:
    partition: int
    offset: int
    scopes: tuple[str, ...]


Place = tuple[int, int]  # (partition, offset)


class HoldBook:
    """Start and end marks of requests, per usage partition, for ``horizon_s``.

    Persisted like ``seen`` ids: one record per (partition, batch) in the same table, key
    ``"h{p}/{first offset}"`` -> ``{"t": written at, "s": [[hold id, offset, [scopes]], ...],
    "e": [[hold id, offset], ...]}``; the index is rebuilt from the records when a partition is
    assigned. Not thread-safe; pure.
    """

    def __init__(self, horizon_s: float = MEMORY_S) -> None:
        self.horizon_s = horizon_s
        self.starts: dict[str, Start] = {}
        self.ends: dict[str, Place] = {}
        self._records: dict[int, deque[tuple[float, str, list[str], list[str]]]] = {}
        self._new_starts: dict[int, list[list[Any]]] = {}
        self._new_ends: dict[int, list[list[Any]]] = {}

    # --- planning (called by ingest.plan_batch, in offset order per partition)

    def on_hold(self, hid: str, partition: int, offset: int, scopes: Sequence[str]) -> bool:
        """A hold event at ``(partition, offset)``: True when its add must be emitted.

        False for a repeat (a hold of this request started elsewhere) and for a hold whose
        request already ended earlier in the log (void). A replay of the same hold is True
        again (stage B's watermarks drop what was applied already).
        """
        start = self.starts.get(hid)
        if start is not None and (start.partition, start.offset) != (partition, offset):
            return False
        end = self.ends.get(hid)
        if end is not None and (end[0] != partition or end[1] < offset):
            return False
        if start is None:
            self.starts[hid] = Start(partition, offset, tuple(scopes))
            self._new_starts.setdefault(partition, []).append([hid, offset, list(scopes)])
        return True

    def on_end(self, hid: str, partition: int, offset: int) -> tuple[str, ...]:
        """A settle or release at ``(partition, offset)``: the scopes whose hold it ends (maybe
        none: no hold yet, a hold that started after it, or the request ended before)."""
        end = self.ends.get(hid)
        if end is not None and end != (partition, offset):
            return ()
        if end is None:
            self.ends[hid] = (partition, offset)
            self._new_ends.setdefault(partition, []).append([hid, offset])
        start = self.starts.get(hid)
        if start is None or start.partition != partition or start.offset > offset:
            return ()
        return start.scopes

    # --- persistence

    def is_loaded(self, partition: int) -> bool:
        return partition in self._records

    def load(self, partition: int, items: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """Learn the recovered records of ``partition`` (keys ``"h{partition}/…"``)."""
        prefix = f"h{partition}/"
        found = []
        for key, value in items:
            if not key.startswith(prefix):
                continue
            starts, ends = [], []
            for hid, offset, scopes in value.get("s", ()):
                self.starts.setdefault(str(hid), Start(partition, int(offset), tuple(scopes)))
                starts.append(str(hid))
            for hid, offset in value.get("e", ()):
                self.ends.setdefault(str(hid), (partition, int(offset)))
                ends.append(str(hid))
            found.append((float(value["t"]), key, starts, ends))
        self._records[partition] = deque(sorted(found))

    def take_records(self, partition: int, now: float) -> list[tuple[str, dict[str, Any]]]:
        """The table records of the marks made since the last call, at most
        ``MARKS_PER_RECORD`` marks each (a batch of 5,000 settles with long ids would otherwise
        make one changelog record of megabytes, past a broker's message size limit)."""
        marks = sorted(
            [(s[1], "s", s) for s in self._new_starts.pop(partition, [])]
            + [(e[1], "e", e) for e in self._new_ends.pop(partition, [])],
            key=lambda m: m[0],
        )
        out = []
        for i in range(0, len(marks), MARKS_PER_RECORD):
            chunk = marks[i : i + MARKS_PER_RECORD]
            starts = [m[2] for m in chunk if m[1] == "s"]
            ends = [m[2] for m in chunk if m[1] == "e"]
            key = f"h{partition}/{chunk[0][0]}"
            self._records.setdefault(partition, deque()).append(
                (now, key, [s[0] for s in starts], [e[0] for e in ends])
            )
            out.append((key, {"t": now, "s": starts, "e": ends}))
        return out

    def pending_partitions(self) -> set[int]:
        return set(self._new_starts) | set(self._new_ends)

    def expire(self, partition: int, now: float) -> list[str]:
        """Forget records of ``partition`` older than the horizon; returns their keys to delete."""
        records = self._records.get(partition)
        expired = []
        while records and records[0][0] < now - self.horizon_s:
            _, key, starts, ends = records.popleft()
            for hid in starts:
                start = self.starts.get(hid)
                if start is not None and start.partition == partition:
                    del self.starts[hid]
            for hid in ends:
                end = self.ends.get(hid)
                if end is not None and end[0] == partition:
                    del self.ends[hid]
            expired.append(key)
        return expired


# ----------------------------------------------------------------------- 2. stage B


def apply_ops(holds: ScopeHolds, ops: Iterable[HoldOp]) -> None:
    """Apply ordered hold ops to one scope's holds (stage A made them exactly once)."""
    for op in ops:
        if len(op) == 3:
            holds[op[0]] = [int(op[1]), int(op[2])]
        else:
            holds.pop(op[0], None)


def reserved(holds: Mapping[str, Sequence[int]], now_ms: int) -> int:
    """Nano-dollars held at ``now_ms``: every hold that has not ended nor expired."""
    return sum(h[0] for h in holds.values() if h[1] > now_ms)


def expiry(holds: Mapping[str, Sequence[int]], now_ms: int) -> tuple[int | None, int | None]:
    """``(next, last)`` expiry among live holds (epoch ms), None when none is live."""
    live = [h[1] for h in holds.values() if h[1] > now_ms]
    return (min(live), max(live)) if live else (None, None)


def prune(holds: ScopeHolds, now_ms: int) -> bool:
    """Drop expired holds (they never count again: time only moves forward). True if any."""
    gone = [hid for hid, h in holds.items() if h[1] <= now_ms]
    for hid in gone:
        del holds[hid]
    return bool(gone)


# ----------------------------------------------------------------------- 3. the gate


@dataclass(eq=False, slots=True)
class LocalHold:
    """A hold this gate placed. Kept small for the collector: a busy gate places thousands a
    second, and only the hold object itself is a container the GC must walk (the scopes and
    place are tuples of atoms, which it stops tracking; the rest are ints and floats)."""

    key_id: str
    request_id: str
    scopes: tuple[str, ...]
    nanos: int
    expires_at: float  # epoch s
    degraded: bool = False  # the answer it was allowed with (all a retry needs: allowed, degraded?)
    lag: int = 0
    place: Place | None = None  # where the hold event landed, once acknowledged
    counting: int = 0  # bit i set: still adds to scopes[i] here

    def counted(self) -> list[str]:
        """The scopes it still adds to on this gate."""
        return [scope for i, scope in enumerate(self.scopes) if self.counting >> i & 1]


class LocalHolds:
    """Holds placed by this gate, counted per scope until ``spend.state`` reflects them.

    A hold counts here from the moment the check allowed it. Once its event is acknowledged at
    ``(p, o)``, the first state record of a scope whose ``watermarks[p] >= o`` includes it in
    ``reserved_usd``; from then on only that record counts it (never both). It stops counting
    here at its expiry, or when released here; a hold that counts nowhere is forgotten. Retries:
    the answer is remembered per (key, request) until the hold expires, as three atoms.
    """

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}  # scope -> nanos held here, not yet in its state
        #: holds that still count here somewhere, by (key, request)
        self.requests: dict[tuple[str, str], LocalHold] = {}
        #: (key, request) -> (expires_at, degraded, lag) of every allowed reserving check
        self.answers: dict[tuple[str, str], tuple[float, bool, int]] = {}
        self._by_scope: dict[str, list[LocalHold]] = {}
        self._expiry: list[tuple[float, str, str]] = []

    def __len__(self) -> int:
        return len(self.answers)

    def latest_expiry(self, scope: str) -> float | None:
        """When the last hold still counting here on ``scope`` expires (None: none counts)."""
        return max((hold.expires_at for hold in self._by_scope.get(scope, ())), default=None)

    def answer(self, key_id: str, request_id: str, now: float) -> tuple[bool, int] | None:
        """``(degraded, lag)`` of the allowed reserving check of this request, while its hold lasts."""
        known = self.answers.get((key_id, request_id))
        return (known[1], known[2]) if known is not None and known[0] > now else None

    def add(self, hold: LocalHold) -> None:
        """Count ``hold`` on each of its scopes at once (the caller judged it first, without
        awaiting in between: one event loop makes judge-and-hold atomic)."""
        request = (hold.key_id, hold.request_id)
        self.answers[request] = (hold.expires_at, hold.degraded, hold.lag)
        heapq.heappush(self._expiry, (hold.expires_at, hold.key_id, hold.request_id))
        if not hold.scopes:
            return
        self.requests[request] = hold
        pending = self.pending
        for scope in hold.scopes:
            pending[scope] = pending.get(scope, 0) + hold.nanos
            self._by_scope.setdefault(scope, []).append(hold)
        hold.counting = (1 << len(hold.scopes)) - 1

    def _subtract(self, scope: str, nanos: int) -> None:
        left = self.pending.get(scope, 0) - nanos
        if left > 0:
            self.pending[scope] = left
        else:
            self.pending.pop(scope, None)
            self._by_scope.pop(scope, None)  # nothing counts there any more

    def _uncount(self, hold: LocalHold, index: int) -> None:
        if not hold.counting >> index & 1:
            return
        hold.counting &= ~(1 << index)
        self._subtract(hold.scopes[index], hold.nanos)
        if not hold.counting:
            request = (hold.key_id, hold.request_id)
            if self.requests.get(request) is hold:
                del self.requests[request]

    def placed(self, hold: LocalHold, partition: int, offset: int) -> None:
        hold.place = (partition, offset)

    def reflect(self, scope: str, watermarks: Mapping[str, int] | None) -> None:
        """A state record of ``scope`` with ``watermarks`` was applied: stop counting what it
        includes."""
        holds = self._by_scope.get(scope)
        if not holds or not watermarks:
            return
        keep = []
        for hold in holds:  # one pass: a busy scope may have hundreds in flight
            index = hold.scopes.index(scope)
            if not hold.counting >> index & 1:
                continue  # released or expired since
            place = hold.place
            if place is not None and watermarks.get(str(place[0]), -1) >= place[1]:
                self._uncount(hold, index)
            else:
                keep.append(hold)
        if scope not in self._by_scope:
            return  # the last one left: _subtract dropped the list
        if not keep:
            del self._by_scope[scope]
        elif len(keep) < len(holds):
            self._by_scope[scope] = keep

    def reflect_hold(self, hold: LocalHold, states: Mapping[str, Mapping[str, int] | None]) -> None:
        """``hold`` was just placed: stop counting it on each scope whose state record (its
        ``watermarks`` in ``states``) already reflects it. O(its scopes), where ``reflect`` of
        each scope would walk every hold in flight there."""
        place = hold.place
        if place is None:
            return
        partition = str(place[0])
        for index, scope in enumerate(hold.scopes):
            watermarks = states.get(scope)
            if watermarks and watermarks.get(partition, -1) >= place[1]:
                self._uncount(hold, index)  # it leaves _by_scope at that scope's next reflect

    def release(self, key_id: str, request_id: str) -> LocalHold | None:
        """Stop counting a hold placed here and forget its answer (its release event is the
        caller's to append)."""
        self.answers.pop((key_id, request_id), None)
        hold = self.requests.pop((key_id, request_id), None)
        if hold is not None:
            self._uncount_all(hold)
        return hold

    def _uncount_all(self, hold: LocalHold) -> None:
        for index in range(len(hold.scopes)):
            self._uncount(hold, index)

    def expire(self, now: float) -> None:
        """Forget holds and answers whose TTL has passed. O(1) when none has."""
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, key_id, request_id = heapq.heappop(heap)
            request = (key_id, request_id)
            known = self.answers.get(request)
            if known is not None and known[0] <= now:
                del self.answers[request]
            hold = self.requests.get(request)
            if hold is not None and hold.expires_at <= now:
                del self.requests[request]
                self._uncount_all(hold)
