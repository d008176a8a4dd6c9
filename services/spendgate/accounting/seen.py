"""Event ids already counted, per usage partition, for the dedupe horizon.

Persisted as one table record per (partition, batch): ``"{p}/{first offset}" -> {"t": written
at, "ids": [[event id, offset], ...]}``, so a batch costs one changelog write, not one per
event, and expiry drops whole records. The lookup index (event id -> (partition, offset)) is in
memory and rebuilt from the recovered records when a partition is assigned; the worker starts
a new one after every rebalance, so it never holds ids of partitions it no longer owns (or
misses the ids another worker added while it did not own one).

Memory: about 200 bytes per remembered id (the index entry plus its share of the record).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from spendgate.accounting.ingest import BatchPlan, RawRecord, plan_batch
from spendgate.domain.holds import HoldBook
from spendgate.domain.registry import RegistryView

#: A ``seen`` table write: ``(key, record)``, or ``(key, None)`` to delete an expired record.
SeenWrite = tuple[str, dict[str, Any] | None]


class SeenIds:
    def __init__(self, horizon_s: float) -> None:
        self.horizon_s = horizon_s
        self.index: dict[str, tuple[int, int]] = {}
        self._records: dict[int, deque[tuple[float, str, list[str]]]] = {}

    def where(self, event_id: str) -> tuple[int, int] | None:
        """``(partition, offset)`` at which ``event_id`` was first counted, if remembered."""
        return self.index.get(event_id)

    def is_loaded(self, partition: int) -> bool:
        return partition in self._records

    def load(self, partition: int, items: Iterable[tuple[str, Mapping[str, Any]]]) -> None:
        """Learn the recovered records of ``partition`` (keys ``"{partition}/…"``)."""
        prefix = f"{partition}/"
        found = []
        for key, value in items:
            if key.startswith(prefix):
                ids = [str(event_id) for event_id, _ in value["ids"]]
                self.index.update((str(i), (partition, int(offset))) for i, offset in value["ids"])
                found.append((float(value["t"]), key, ids))
        self._records[partition] = deque(sorted(found))

    def remember(
        self, partition: int, new: Mapping[str, int], now: float
    ) -> tuple[str, dict[str, Any]] | None:
        """Index ids first counted now; returns the record to write, or None when nothing is new."""
        fresh = {event_id: offset for event_id, offset in new.items() if event_id not in self.index}
        if not fresh:
            return None
        self.index.update((event_id, (partition, offset)) for event_id, offset in fresh.items())
        key = f"{partition}/{min(fresh.values())}"
        self._records.setdefault(partition, deque()).append((now, key, list(fresh)))
        return key, {"t": now, "ids": [[event_id, offset] for event_id, offset in fresh.items()]}

    def expire(self, partition: int, now: float) -> list[str]:
        """Forget records of ``partition`` older than the horizon; returns their keys to delete."""
        records = self._records.get(partition)
        expired = []
        while records and records[0][0] < now - self.horizon_s:
            _, key, ids = records.popleft()
            for event_id in ids:
                self.index.pop(event_id, None)
            expired.append(key)
        return expired


def plan_with_seen(
    seen: SeenIds,
    records: Sequence[RawRecord],
    *,
    now: Mapping[int, float],
    progress: Mapping[int, int],
    registry: RegistryView,
    topic: str,
    holds: HoldBook | None = None,
) -> tuple[BatchPlan, dict[int, list[SeenWrite]]]:
    """Plan one batch against ``seen``: expire, plan, remember. The worker and replay share it.

    ``now`` is the clock per partition (processing time for the worker, the records' broker
    timestamps for replay); a partition without one expires nothing. Ids older than the horizon
    are forgotten *before* planning, so a retry that late counts again. Returns the plan and the
    ``seen`` table writes per partition (expired records deleted, the batch's new record).
    With ``holds``, the hold book's records live in the same table (keys ``h{p}/…``) and are
    expired and written the same way.
    """
    writes: dict[int, list[SeenWrite]] = {
        p: [(key, None) for key in seen.expire(p, clock)] for p, clock in now.items()
    }
    if holds is not None:
        for p, clock in now.items():
            writes[p] += [(key, None) for key in holds.expire(p, clock)]
    plan = plan_batch(
        records, seen=seen.where, progress=progress, registry=registry, topic=topic, holds=holds
    )
    fresh: dict[int, dict[str, int]] = {}
    for event_id, (p, offset) in plan.seen_new.items():
        fresh.setdefault(p, {})[event_id] = offset
    for p, ids in fresh.items():
        record = seen.remember(p, ids, now.get(p, 0.0))
        if record is not None:
            writes.setdefault(p, []).append(record)
    if holds is not None:
        for p in holds.pending_partitions():
            writes.setdefault(p, []).extend(holds.take_records(p, now.get(p, 0.0)))
    return plan, writes
