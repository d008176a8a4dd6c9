"""Holds on the gate (CONTRACT §4; issue 15): reserving checks and ``DELETE /v1/holds/{id}``.

A reserving check (``"reserve": true`` with ``request_id`` and ``estimated_cost_usd``):

1. a retry of an allowed reserving check of the same key and request (still live here) gets
   the first answer back and holds nothing more;
2. otherwise it is judged like any check with an estimate, counting what holds keep
   (``GateState.held``);
3. when allowed, the hold counts on this gate at once (``LocalHolds.add``: steps 2 and 3 run
   without awaiting, so on one event loop no other check slips in between), and its
   ``kind: "hold"`` event is queued for ``spend.usage``; the answer does not wait for the
   broker (a check never does). Once the broker acknowledges it at ``(p, o)``, the first state
   record of each scope reflecting ``o`` takes over counting it.

When the event cannot be appended (broker down), the hold still counts here until its TTL and
nowhere else: never less safe than no hold. A gate killed with holds outstanding leaves them in
the log, where they expire ``hold_ttl_s`` after their ``occurred_at``.

Each hold event has an id of its own: a retry through another replica appends a second hold of
the same request, which holds nothing (the worker's hold book, by key and request) but still
reaches the request's scopes, so that replica's state records reflect it and it stops counting
its copy there (with the same event id the worker would drop it as a duplicate, and the copy
would count on that replica until its TTL). A release has a deterministic id
(``domain.holds.event_id_for``): repeating one appends nothing new.
"""

# No "from __future__ import annotations": FastAPI must see the route-local Annotated aliases.
import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Protocol

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2
from fastapi import APIRouter, Depends, Path, Query, Request, Response

from spendgate.api.deps import GateDep, Ingester
from spendgate.api.errors import error_responses
from spendgate.domain.attribution import scopes_for
from spendgate.domain.check import ALLOWED, DEGRADED_OPEN, CheckRequest, CheckResult
from spendgate.domain.gate_state import GateState
from spendgate.domain.holds import DEFAULT_TTL_S, MAX_TTL_S, LocalHold, event_id_for
from spendgate.domain.money import format_usd

log = logging.getLogger(__name__)

QUEUE_LIMIT = 100_000  # hold events waiting for the broker; beyond it they stay local only
LINGER_S = 0.02  # adds to how soon other replicas see a hold (~200 ms anyway), never to a check


@lru_cache(maxsize=100_000)
def _partition(key: bytes, count: int) -> int:
    """Kafka's default partitioner (aiokafka's and the Java client's): murmur2 of the key."""
    return (murmur2(key) & 0x7FFFFFFF) % count


class Judge(Protocol):
    state: GateState

    def judge(self, request: CheckRequest) -> tuple[CheckResult, int]: ...

    def clock(self) -> float: ...


class Sender(Protocol):
    async def send_all(self, records: list[tuple[bytes, bytes]]) -> None: ...


def _iso_ms(instant: float) -> str:
    return datetime.fromtimestamp(instant, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_EVENT_IDS = itertools.count()
_EVENT_PREFIX = f"hold-{uuid.uuid4().hex[:16]}-"  # unique per process; a counter after it


def hold_event(request: CheckRequest, request_id: str, ttl_s: int, now: float) -> dict[str, Any]:
    """The ``kind: "hold"`` usage event of an allowed reserving check (fields without a value
    are left out, as the contract allows)."""
    event: dict[str, Any] = {
        "v": 1,
        "event_id": f"{_EVENT_PREFIX}{next(_EVENT_IDS)}",
        "kind": "hold",
        "occurred_at": _iso_ms(now),
        "key_id": request.key_id,
        "request_id": request_id,
        "estimated_cost_usd": format_usd(request.estimated_cost_nanos or 0),
        "hold_ttl_s": ttl_s,
    }
    for name in ("end_user_id", "model", "user_id", "team_id", "org_id"):
        value = getattr(request, name)
        if value is not None:
            event[name] = value
    if request.tags:
        event["tags"] = list(request.tags)
    return event


def release_event(key_id: str, request_id: str, now: float) -> dict[str, Any]:
    return {
        "v": 1,
        "event_id": event_id_for("release", key_id, request_id),
        "kind": "release",
        "occurred_at": _iso_ms(now),
        "key_id": key_id,
        "request_id": request_id,
    }


class HoldAppender:
    """Appends hold events to ``spend.usage`` in the background, in order, acks=all.

    One task drains a queue into its own producer (started lazily; restarted after an error),
    and tells ``GateState.local`` where each hold landed.
    """

    def __init__(self, factory: Callable[[], AIOKafkaProducer], topic: str, state: GateState) -> None:
        self._factory = factory
        self.topic = topic
        self.state = state
        self._queue: asyncio.Queue[tuple[LocalHold, CheckRequest, int, float]] = asyncio.Queue(QUEUE_LIMIT)
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self.failed = 0

    def append(self, hold: LocalHold, request: CheckRequest, ttl_s: int, now: float) -> None:
        """Queue the hold's event (built and sent by the appender task, off the check's path)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="hold-appender")
        try:
            self._queue.put_nowait((hold, request, ttl_s, now))
        except asyncio.QueueFull:
            self.failed += 1  # counted here until its TTL, like any hold the log never got

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(LINGER_S)  # let a few more checks queue theirs: fewer, larger batches
            while not self._queue.empty() and len(batch) < 1000:
                batch.append(self._queue.get_nowait())
            try:
                if self._producer is None:
                    producer = self._factory()
                    await producer.start()
                    self._producer = producer
                await self._send(self._producer, batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - an outage: the holds stay local until their TTL
                self.failed += len(batch)
                log.warning(
                    "holds: %d hold events not appended (%r); they count here until their TTL",
                    len(batch),
                    exc,
                )
                producer, self._producer = self._producer, None
                if producer is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(producer.stop(), 5)
                await asyncio.sleep(0.5)

    async def _send(
        self, producer: AIOKafkaProducer, batch: list[tuple[LocalHold, CheckRequest, int, float]]
    ) -> None:
        """One record batch per partition, the partition the default partitioner gives the key
        (murmur2, where every other usage event of the key goes); a record's offset is its
        batch's base offset plus its index. About half the CPU of a ``send()`` per record, and
        this runs for every reserving check."""
        count = len(await producer.partitions_for(self.topic))
        parts: dict[int, list[tuple[LocalHold, bytes, bytes]]] = {}
        for hold, request, ttl, now in batch:
            key = request.key_id.encode()
            value = orjson.dumps(hold_event(request, hold.request_id, ttl, now))
            parts.setdefault(_partition(key, count), []).append((hold, key, value))
        sent: list[tuple[list[LocalHold], asyncio.Future[Any]]] = []
        for partition, records in parts.items():
            builder = producer.create_batch()
            held: list[LocalHold] = []
            for hold, key, value in records:
                if builder.append(timestamp=None, key=key, value=value) is None:  # full: send it
                    sent.append((held, await producer.send_batch(builder, self.topic, partition=partition)))
                    builder, held = producer.create_batch(), []
                    builder.append(timestamp=None, key=key, value=value)
                held.append(hold)
            sent.append((held, await producer.send_batch(builder, self.topic, partition=partition)))
        for held, future in sent:
            meta = await future
            for index, hold in enumerate(held):
                self._placed(hold, meta.partition, meta.offset + index)

    def _placed(self, hold: LocalHold, partition: int, offset: int) -> None:
        local = self.state.local
        local.placed(hold, partition, offset)
        states = self.state.states  # a state record may have reflected it already
        known = {scope: states[scope].watermarks for scope in hold.counted() if scope in states}
        local.reflect_hold(hold, known)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued (bounded), then stop."""
        deadline = time.monotonic() + timeout_s
        while not self._queue.empty() and self._task is not None and not self._task.done():
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        if self._task is not None:
            self._task.cancel()  # bounded: aiokafka can swallow a cancellation inside send/stop
            await asyncio.wait({self._task}, timeout=max(0.1, deadline - time.monotonic()))
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), max(0.1, deadline - time.monotonic()))


class Holds:
    """The gate's hold service: reserve (the check path) and release."""

    def __init__(self, appender: HoldAppender, sender: Sender) -> None:
        self.appender = appender
        self.sender = sender

    def reserve(
        self, gate: Judge, request: CheckRequest, request_id: str, ttl_s: int | None
    ) -> tuple[CheckResult, int]:
        """Judge a reserving check and, when allowed, hold its estimate (module docstring).

        Synchronous on purpose: nothing may run between the judgement and the hold.
        """
        now = gate.clock()
        local = gate.state.local
        earlier = local.answer(request.key_id, request_id, now)
        key = gate.state.registry.keys.get(request.key_id)
        if earlier is not None and not (key is not None and key.revoked):  # a revocation wins
            degraded, lag = earlier
            return (DEGRADED_OPEN if degraded else ALLOWED), lag
        result, lag = gate.judge(request)
        if result.allowed:
            ttl = DEFAULT_TTL_S if ttl_s is None else min(ttl_s, MAX_TTL_S)
            state = gate.state
            budgets = state.budgets
            hold = LocalHold(
                request.key_id,
                request_id,
                # held here on the budgeted scopes (the only ones a check reads); the log's
                # hold event holds on every scope, as spend.state then shows
                tuple(s for s in scopes_for(request, state.registry) if s in budgets),
                request.estimated_cost_nanos or 0,
                now + ttl,
                result.degraded,
                lag,
            )
            local.add(hold)
            self.appender.append(hold, request, ttl, now)
        return result, lag

    async def release(self, gate: Judge, key_id: str, request_id: str) -> None:
        """Stop counting the hold here and append its release (acks=all; 503 when the broker
        does not acknowledge in time: retry, a release repeated changes nothing)."""
        gate.state.local.release(key_id, request_id)
        event = release_event(key_id, request_id, gate.clock())
        await self.sender.send_all([(key_id.encode(), orjson.dumps(event))])

    async def close(self) -> None:
        await self.appender.close()


router = APIRouter(prefix="/v1", tags=["gate"], responses=error_responses(400, 401, 403, 422, 503))


def _holds(request: Request) -> Holds:
    holds: Holds = request.app.state.holds
    return holds


@router.delete(
    "/holds/{request_id:path}",  # a request id may hold "/" (sent encoded or not)
    status_code=204,
    summary="Release the hold of a request (idempotent; 204 whether or not one was held)",
)
async def delete_hold(
    _: Ingester,
    gate: GateDep,
    holds: Annotated[Holds, Depends(_holds)],
    request_id: Annotated[str, Path(min_length=1, max_length=256)],
    key_id: Annotated[str, Query(min_length=1, max_length=256)],
) -> Response:
    """``DELETE /v1/holds/{request_id}?key_id=…`` (gateway or admin, like ingesting events)."""
    await holds.release(gate, key_id, request_id)
    return Response(status_code=204)
