"""Stage B, pure: apply deltas to per-scope ledgers; what must be persisted afterwards.

The worker and replay apply deltas with the same :func:`apply_deltas`, so a replay can never
count differently from the live worker. Each changed ledger record is reported once per call
with the ledger holding its final value: the caller writes every record once per batch, so a
crash leaves every record at some state it really had, each with its own watermarks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from functools import lru_cache

from aiokafka.partitioner import murmur2

from spendgate.accounting.deltas import Delta
from spendgate.domain.ledger import HOT, ScopeLedger


@lru_cache(maxsize=1_000_000)
def partition_of(key: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (murmur2, as the producers use)."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def day_key(scope: str, day: int) -> str:
    """The ledger table key of a scope's day record (its hot record's key is the scope)."""
    return f"{scope}@{day}"


@dataclass
class Applied:
    """What :func:`apply_deltas` changed."""

    #: (scope, ``HOT`` or epoch day) -> the ledger holding the record's final value
    dirty: dict[tuple[str, int], ScopeLedger] = field(default_factory=dict)
    #: ledgers that exported hot days to day records: ``settle()`` them once those are durable
    exported: list[ScopeLedger] = field(default_factory=list)
    #: scope -> (source partition, last offset) of the last delta applied to it
    touched: dict[str, tuple[int, int]] = field(default_factory=dict)
    applied: int = 0

    def writes(self) -> list[tuple[str, dict[str, object]]]:
        """The ledger table records to write: ``(scope or day key, record)``."""
        return [
            (scope, ledger.hot.to_json())
            if record_id == HOT
            else (day_key(scope, record_id), ledger.days[record_id].to_json())
            for (scope, record_id), ledger in self.dirty.items()
        ]


def apply_deltas(
    ledgers: MutableMapping[str, ScopeLedger],
    deltas: Iterable[Delta],
    load: Callable[[str], ScopeLedger] | None = None,
    into: Applied | None = None,
) -> Applied:
    """Apply ``deltas`` in order (idempotent per delta: ``ScopeLedger.apply``'s watermarks).

    A scope without a ledger gets ``load(scope)`` (the worker reads its table), else an empty
    one. ``into``: accumulate into an earlier result (several groups of one batch).
    """
    out = into if into is not None else Applied()
    dirty_records, exported, touched = out.dirty, out.exported, out.touched
    for delta in deltas:
        scope = delta.scope
        ledger = ledgers.get(scope)
        if ledger is None:
            ledger = ledgers[scope] = load(scope) if load is not None else ScopeLedger()
        dirty = ledger.apply(delta.partition, delta.last, delta.minutes, delta.holds)
        for record_id in dirty:
            dirty_records[scope, record_id] = ledger
        if len(dirty) > 1 or (dirty and dirty[0] != HOT):
            exported.append(ledger)
        out.applied += 1
        touched[scope] = (delta.partition, delta.last)
    return out
