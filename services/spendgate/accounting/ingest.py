"""Stage A, pure: one batch of raw ``spend.usage`` records -> dead letters, new seen ids, deltas.

Exactly once without transactions (the embedded broker has none):

1. Every record is validated; a record proven invalid becomes a dead letter with its reason.
2. ``event_id`` is looked up in ``seen`` (remembered in the partition the event lives in, since
   gateways key events by ``key_id``). An id already seen at *another* place (partition and
   offset) is a duplicate and dropped; seen at *this* place means the record is being replayed
   after a crash.
3. Holds (``kind: "hold"``, settles, releases) are planned against the ``HoldBook``
   (``domain.holds``): an add op for each scope of a new hold, an end op for each scope of the
   hold a settle or release ends, in log order, exactly once per request.
4. Charges are aggregated per scope into minute buckets, hold ops appended in order. Events
   at offsets above the partition's ``progress`` (never emitted before) form one delta per
   (partition, scope) whose ``last`` is the batch's last offset in that partition. Events at or
   below ``progress`` may already have been emitted, so each becomes its own delta (``first ==
   last == offset``): the ledger's per-record watermark then applies exactly the ones that
   were lost.

The caller persists ``seen_new`` and ``progress`` durably, then emits the deltas, then lets the
offsets be committed: in that order.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from spendgate.accounting.deltas import Delta
from spendgate.accounting.usage import Usage, parse_usage
from spendgate.domain.attribution import scopes_for
from spendgate.domain.holds import HoldBook, HoldOp, expires_at_ms, hold_id
from spendgate.domain.registry import RegistryView
from spendgate.records import DeadLetter


@dataclass(frozen=True, slots=True)
class RawRecord:
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None = None
    timestamp: float | None = None  # the broker record's, epoch s (replay's clock for the dedupe horizon)


@dataclass
class BatchPlan:
    dead_letters: list[tuple[RawRecord, DeadLetter]] = field(default_factory=list)
    seen_new: dict[str, tuple[int, int]] = field(default_factory=dict)  # event id -> (partition, offset)
    deltas: list[Delta] = field(default_factory=list)
    progress: dict[int, int] = field(default_factory=dict)
    events: int = 0
    duplicates: int = 0


def dead_letter(record: RawRecord, reason: str, topic: str) -> DeadLetter:
    raw = base64.b64encode(record.value or b"").decode()
    return DeadLetter(error=reason, raw=raw, topic=topic, partition=record.partition, offset=record.offset)


def plan_batch(
    records: Sequence[RawRecord],
    *,
    seen: Callable[[str], tuple[int, int] | None],
    progress: Mapping[int, int],
    registry: RegistryView,
    topic: str,
    holds: HoldBook | None = None,
) -> BatchPlan:
    """Plan a batch (records of any partitions, in offset order within each). Pure.

    A record delivered twice in one batch (Faust may redeliver around a rebalance, see
    ``recovery_fix``) is planned once: records are identified by ``(partition, offset)``.
    Without ``holds``, hold events and settles charge what they charge and hold nothing.
    Every hold or release event touches each scope of its own (a delta, maybe without ops),
    so the scope's state record reflects its offset (the gate counts a hold it placed until
    then: ``domain.holds.LocalHolds``).
    """
    plan = BatchPlan()
    batch_last: dict[int, int] = {}
    unique: dict[tuple[int, int], RawRecord] = {}
    for record in records:
        unique.setdefault((record.partition, record.offset), record)
        batch_last[record.partition] = max(record.offset, batch_last.get(record.partition, -1))
    fresh: dict[tuple[int, str], Delta] = {}
    for (p, offset), record in unique.items():
        try:
            event = parse_usage(record.value)
        except ValueError as exc:
            plan.dead_letters.append((record, dead_letter(record, str(exc), topic)))
            continue
        previous = plan.seen_new.get(event.event_id) or seen(event.event_id)
        if previous is not None and previous != (p, offset):
            plan.duplicates += 1
            continue
        plan.seen_new[event.event_id] = (p, offset)
        plan.events += 1
        nanos = event.charge_nanos
        ops: dict[str, list[HoldOp]] | None = None
        if holds is not None and event.request_id and event.kind != "request":
            ops = _hold_ops(holds, event, p, offset, registry, record.timestamp)
        if not nanos and ops is None:
            continue
        minute = int(event.occurred_at.timestamp()) // 60
        replayed = offset <= progress.get(p, -1)
        scopes = scopes_for(event, registry) if nanos or event.kind != "cost" else []
        charged = frozenset(scopes) if nanos else frozenset()  # the cost goes by its own attribution
        if ops:  # a settle also ends its hold on the hold's scopes, charging them nothing
            scopes = scopes + [s for s in ops if s not in scopes]
        for scope in scopes:
            if replayed:
                delta = Delta(scope, p, offset, offset)
                plan.deltas.append(delta)
            else:
                delta = fresh.get((p, scope)) or fresh.setdefault(
                    (p, scope), Delta(scope, p, offset, batch_last[p])
                )
            if scope in charged:
                delta.add(minute, nanos)
            if ops and scope in ops:
                delta.holds.extend(ops[scope])
    plan.deltas.extend(fresh.values())
    plan.progress = {p: last for p, last in batch_last.items() if last > progress.get(p, -1)}
    return plan


def _hold_ops(
    holds: HoldBook,
    event: Usage,
    partition: int,
    offset: int,
    registry: RegistryView,
    appended_at: float | None = None,
) -> dict[str, list[HoldOp]]:
    """The hold ops of one event with a ``request_id``, per scope (empty: it holds or ends
    nothing). A hold is charged to the scopes of its own event; an end reaches the scopes its
    hold was charged to, whatever the settling event's own attribution says.

    A hold expires its TTL after its ``occurred_at``, or after the broker appended it if that
    is earlier: a gateway clock running ahead (``occurred_at`` in 2099) cannot pin a budget. The
    append time is in the log, so replay computes the same expiry."""
    assert event.request_id is not None
    hid = hold_id(event.key_id, event.request_id)
    if event.kind == "hold":
        scopes = scopes_for(event, registry)
        if not holds.on_hold(hid, partition, offset, scopes):
            return {}
        add: HoldOp = [
            hid,
            event.estimated_cost_usd or 0,
            expires_at_ms(min(event.occurred_at.timestamp(), appended_at or math.inf), event.hold_ttl_s),
        ]
        return {scope: [add] for scope in scopes}
    return {scope: [[hid]] for scope in holds.on_end(hid, partition, offset)}
