"""The Faust app the worker stands on, and the few helpers its agents need.

Everything here is valid on Apache Kafka and on the embedded Tansu broker (see
``FAUST-NOTES.md`` next to this file for the measurements and pitfalls).

Helpers (all run on the app's event loop, inside a started worker):

* :func:`make_app` -- the configured ``faust.App``; :func:`run_worker` runs it.
* :func:`in_partition` -- context manager making table reads/writes use one partition.
* :func:`get_in_partition` -- read one table key from an explicit partition's store.
* :func:`items_in_partition` -- a table's items of one partition (all items: memory store).
* :func:`write_in_partition` -- set/delete table keys in an explicit changelog partition and
  return the changelog send futures.
* :func:`group_by_partition` -- split a ``take_events`` batch by source partition.
* :func:`flush` -- push Faust's send buffer out and wait for broker acks; raises on failure.
* :func:`send_many` -- send records to a topic and wait for all acks.
* :func:`assigned_partitions` -- the partitions of a topic this worker actively owns.
* :func:`partitions_ready` -- same, but empty while rebalancing or recovering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import faust
import orjson
from faust import stores as faust_stores
from faust.streams import _current_event
from faust.tables.base import Collection
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import ChannelT, EventT, RecordMetadata

from spendgate.settings import Settings
from spendgate.worker import recovery_fix

log = logging.getLogger(__name__)

__all__ = [
    "FETCH_MAX_WAIT_MS",
    "assigned_partitions",
    "broker_credentials",
    "STORES",
    "flush",
    "get_in_partition",
    "group_by_partition",
    "in_partition",
    "items_in_partition",
    "make_app",
    "partitions_ready",
    "run_worker",
    "send_many",
    "write_in_partition",
]

#: Consumer ``fetch_max_wait_ms``. Faust hard-codes 1500 ms (produce->table p50 ~400 ms on
#: Tansu); 10-20 ms made no progress catching up on Tansu, 100 ms serves both latency and
#: catch-up (see FAUST-NOTES.md).
FETCH_MAX_WAIT_MS = 100

#: Faust's producer request timeout, also aiokafka's batch expiry (a batch whose partition has
#: no known leader fails after this long) and the broker-side ProduceRequest timeout.
PRODUCER_REQUEST_TIMEOUT_S = 60.0

#: Table stores the worker supports (``SPENDGATE_WORKER_STORE``). ``rocksdict://`` is
#: :mod:`spendgate.worker.rocks_store` (Faust's RocksDB store with the rocksdict driver and a
#: crash guard); Faust itself has no ``rocksdict://`` scheme (its ``rocksdb://`` picks the
#: driver by what is installed).
#: ``memory://`` is :mod:`spendgate.worker.memory_store` (Faust's memory store, but a kept
#: partition resumes recovery where it was instead of re-reading its changelog from the start).
STORES = {
    "memory://": "spendgate.worker.memory_store:Store",
    "rocksdict://": "spendgate.worker.rocks_store:Store",
}


def _store_url(store: str) -> str:
    if store not in STORES:
        raise ValueError(f"unsupported worker store {store!r}; use one of {', '.join(STORES)}")
    if store == "rocksdict://":
        try:
            import rocksdict  # noqa: F401
        except ImportError as exc:
            raise RuntimeError("worker store rocksdict:// needs rocksdict: pip install rocksdict") from exc
        # Faust resolves a store URL by its scheme through this registry (what a
        # ``faust.stores`` entry point would add); idempotent.
        faust_stores.STORES.aliases["rocksdict"] = STORES[store]
    if store == "memory://":  # Faust's own "memory" scheme stays Faust's store
        faust_stores.STORES.aliases["keptmemory"] = STORES[store]
        return "keptmemory://"
    return store


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread with a configurable fetch wait."""

    fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # Faust passes fetch_max_wait_ms=1500 literally; aiokafka only stores the value in
        # __init__ and hands it to its Fetcher in start(), so overriding it here is enough.
        if not hasattr(consumer, "_fetch_max_wait_ms"):  # pragma: no cover - aiokafka drift
            raise RuntimeError("aiokafka changed: cannot override fetch_max_wait_ms")
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer

    def verify_event_path(self, now: float, tp: Any) -> Any:
        """Faust's stall detector, minus a crash: it reads ``tp_state.position``, which aiokafka
        0.14 asserts is set; a partition assigned a moment ago whose committed offset is still
        being fetched has none, and the AssertionError crashed the whole worker (seen on Apache
        Kafka with two workers rebalancing). Such a partition has nothing to verify yet."""
        try:
            return super().verify_event_path(now, tp)
        except AssertionError:
            return None


class _Producer(faust_aiokafka.Producer):
    """Faust's producer whose aiokafka client keeps every topic it sends to in its metadata
    (``adapters.kafka.track_every_topic``: without it a batch could wait 20 minutes for a
    leader after a broker restart)."""

    def _new_producer(self, transactional_id: str | None = None) -> Any:
        from spendgate.adapters.kafka import track_every_topic

        return track_every_topic(super()._new_producer(transactional_id))


def _transport_class(fetch_max_wait_ms: int) -> type[faust_aiokafka.Transport]:
    thread_cls = type("SpendgateConsumerThread", (_ConsumerThread,), {"fetch_max_wait_ms": fetch_max_wait_ms})

    class _Consumer(faust_aiokafka.Consumer):
        def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
            return thread_cls(self, loop=self.loop, beacon=self.beacon)

        async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
            # Faust counts the offsets of a gap in what it read as acknowledged (they are
            # committed past): on topics without transactions or compaction a gap means
            # records were fetched and never delivered.
            log.warning("offset gap on %s: %s..%s counted as acked", tp, offset_from, offset_to - 1)
            await super()._add_gap(tp, offset_from, offset_to)

    class _Transport(faust_aiokafka.Transport):
        Consumer = _Consumer
        Producer = _Producer

    return _Transport


def broker_credentials(settings: Settings) -> Any:
    """Faust's credentials for SASL/TLS from the same settings as every other client (None: plaintext)."""
    from spendgate.adapters.kafka import client_security

    options = client_security(settings)
    if not options:
        return None
    if "sasl_mechanism" in options:
        return faust.SASLCredentials(
            username=options["sasl_plain_username"],
            password=options["sasl_plain_password"],
            ssl_context=options.get("ssl_context"),
            mechanism=options["sasl_mechanism"],
        )
    return faust.SSLCredentials(options["ssl_context"])


def make_app(
    settings: Settings,
    *,
    app_id: str | None = None,
    fetch_max_wait_ms: int = FETCH_MAX_WAIT_MS,
    recovery_fix_enabled: bool = True,
    store: str | None = None,
    session_timeout: float | None = None,
) -> faust.App:
    """Build the worker's ``faust.App`` (not started; nothing touches the network here).

    * group id / changelog prefix: ``app_id`` or ``settings.worker_id``;
    * at-least-once, ``acks=all`` (Tansu has no idempotent/transactional producer);
    * group timing: session = rebalance timeout = ``session_timeout`` (default 2 s when
      ``settings.dev``, else 10 s), heartbeat = min(0.5 s, session / 4). Tansu answers
      JoinGroup after ~half the session timeout, so 2 s gives a ~2.5 s (re)join instead of
      ~31 s with Faust's 60 s. Apache Kafka refuses sessions below
      ``group.min.session.timeout.ms`` (6 s by default), hence 10 s outside dev;
    * Faust declares its own changelog topics (compact, ``settings.partitions`` partitions,
      replication ``settings.replication_factor``); source topics are never declared
      by Faust and must exist (``adapters.kafka.ensure_topics``);
    * web server on 127.0.0.1:``settings.worker_web_port``, disabled when the port is 0;
    * creates ``settings.data_dir`` (Faust's datadir is ``<data_dir>/faust``);
    * table store ``store`` or ``settings.worker_store``: ``memory://`` or ``rocksdict://``
      (RocksDB under ``<data_dir>/faust/v1/tables/``, not per app id; one ``data_dir`` per
      process, RocksDB locks its databases).
      Either way, read tables with :func:`get_in_partition` / :func:`items_in_partition` and
      write them with :func:`write_in_partition`: RocksDB keeps one database per partition;
    * ``recovery_fix_enabled=False`` exists only for the regression test that proves the fix
      is needed.
    """
    if recovery_fix_enabled:
        recovery_fix.install()
    web_port = settings.worker_web_port
    if session_timeout is None:
        session_timeout = 2.0 if settings.dev else 10.0
    store_url = _store_url(store or settings.worker_store)
    datadir = Path(settings.data_dir).absolute() / "faust"
    datadir.mkdir(parents=True, exist_ok=True)  # Faust only creates the last level
    app = faust.App(
        app_id or settings.worker_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store=store_url,
        datadir=str(datadir),
        autodiscover=False,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        # table writes go out as whole batches (send_batches): let one hold many records
        producer_max_batch_size=1 << 20,
        broker_session_timeout=session_timeout,
        broker_heartbeat_interval=min(0.5, session_timeout / 4),
        broker_rebalance_timeout=session_timeout,
        broker_request_timeout=30.0,
        # Faust's default is 20 minutes, which is also how long a batch without a leader waits
        # before it fails (aiokafka's batch expiry): a flush must give up far sooner.
        producer_request_timeout=PRODUCER_REQUEST_TIMEOUT_S,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        topic_partitions=settings.partitions,
        # Faust's setting is unsigned (no -1 = broker default): 1 for Tansu, 3 for production.
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        # The leader topic only serves app.timer(on_leader=True); we use none.
        topic_disable_leader=True,
        # Memory stores recover a newly assigned partition from offset 0, so standby copies
        # buy nothing and would put other partitions' keys in our tables. RocksDB stores resume from the
        # offset they persisted, so a partition coming back to this data_dir catches up.
        table_standby_replicas=0,
        stream_recovery_delay=0.0,
        web_enabled=web_port != 0,
        web_bind="127.0.0.1",
        web_host="127.0.0.1",
        web_port=web_port or 6066,
        broker_credentials=broker_credentials(settings),
    )
    app.transport = _transport_class(fetch_max_wait_ms)(app.conf.broker_consumer, app)
    return app


def run_worker(app: faust.App, *, loglevel: str = "info") -> None:
    """Run ``app`` as a worker in this process; blocks until SIGTERM/SIGINT, then stops cleanly.

    Use this instead of ``app.main()`` / ``faust worker``: Faust's CLI resets
    ``web_enabled`` (``--with-web`` is its default) and the web port, undoing ``make_app``.
    Faust's worker redirects ``print`` to its logger at WARNING level.
    """
    faust.Worker(app, loglevel=loglevel).execute_from_commandline()


# -- writing table keys into the right partition --------------------------------------------


@dataclass(frozen=True)
class _Message:
    topic: str
    partition: int


class _PartitionEvent:
    """Stand-in for an event of ``topic``/``partition`` (only ``.message`` is read)."""

    __slots__ = ("message", "__weakref__")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = _Message(topic, partition)


@contextlib.contextmanager
def in_partition(table: Collection, where: EventT | int) -> Iterator[None]:
    """Make table writes and reads inside the block use one partition.

    ``where`` is an event of the source partition (preferred: Faust then also checks that the
    source topic and the changelog have the same partition count) or a partition number.
    Faust picks a table write's changelog partition, and RocksDB's per-partition database for
    ``table.data[k] = v`` and for ``table.data.get(k)`` / ``k in table.data``, from the
    contextvar behind ``faust.current_event()``, which a batch from ``stream.take_events()``
    does not set per event (a stale event of another partition may be current: a RocksDB read
    then looks in the wrong database and misses). This sets it for the block and restores it
    afterwards. Does not block; nothing is awaited.
    """
    if isinstance(where, int):
        event: Any = _PartitionEvent(table.changelog_topic.get_topic_name(), where)
    else:
        event = where
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)


async def write_in_partition(
    table: Collection, where: EventT | int, items: Iterable[tuple[Any, Any]]
) -> list[asyncio.Future]:
    """Set (value) or delete (value ``None``) table keys; changelog records go to one partition.

    The store is updated at once; the changelog records are handed straight to the producer
    (not through Faust's per-message send buffer, which made a table write ~15x dearer than a
    plain aiokafka send). Returns their send futures (``RecordMetadata`` on broker ack, raise
    on failure): pass them to :func:`flush` when the writes must be durable before you go on.
    Deleting a missing key is a no-op (no tombstone). Awaits only the producer's enqueue.

    Do not mix with ``table[k] = v`` on the same table: those records travel through Faust's
    buffer and could reach the changelog after newer ones written here. Not for windowed
    tables (their key TTL bookkeeping is skipped).
    """
    partition = where if isinstance(where, int) else where.message.partition
    store = table.data
    topic = table.changelog_topic
    records: list[tuple[bytes, bytes | None]] = []
    # RocksDB (rocks_store.Store): mark the partition dirty until the changelog has it all.
    guarded = hasattr(store, "begin_write")
    if guarded:
        store.begin_write(partition)
    with in_partition(table, where):
        for key, value in items:
            key_bytes = _encode(topic, key, table.key_serializer, key=True)
            if value is None:
                if key not in store:
                    continue
                del store[key]
                records.append((key_bytes, None))
            else:
                store[key] = value
                records.append((key_bytes, _encode(topic, value, table.value_serializer, key=False)))
    futures = await send_batches(table.app, topic.get_topic_name(), partition, records)
    if guarded:
        store.end_write(partition, futures)  # stores the offsets, then clears the mark
    else:
        for fut in futures:
            # what Faust's own changelog callback does: lets a store remember how far it is
            fut.add_done_callback(partial(_persist_offset, store))
    return futures


def get_in_partition(table: Collection, where: EventT | int, key: Any, default: Any = None) -> Any:
    """``table.data.get(key, default)`` from the store of partition ``where`` (event or number).

    Use for every single-key read: with RocksDB the key is looked up in that partition's
    database only (see :func:`in_partition` for why the current event can't be trusted).
    The partition must be the one the key is written to.
    """
    with in_partition(table, where):
        return table.data.get(key, default)


def items_in_partition(table: Collection, partition: int) -> Iterator[tuple[Any, Any]]:
    """``(key, value)`` pairs of ``partition``'s store; **every** item for the memory store.

    The memory store does not know the partition of keys written live (FAUST-NOTES.md), so
    callers filter by key (e.g. a ``f"{partition}/"`` prefix) either way. With RocksDB only
    that partition's database is read.
    """
    store: Any = table.data
    if hasattr(store, "items_in_partition"):
        return cast(Iterator[tuple[Any, Any]], store.items_in_partition(partition))
    return iter(store.items())


def _encode(topic: Any, obj: Any, serializer: Any, *, key: bool) -> bytes:
    # Faust's json codec is the stdlib's; orjson writes the same JSON (UTF-8 rather than
    # \u-escapes, which Faust's decoder reads the same) several times faster. Like the stdlib,
    # write integer dict keys as strings (the ledger records' buckets).
    if serializer in (None, "json"):
        return orjson.dumps(obj, option=orjson.OPT_NON_STR_KEYS)
    prepared = topic.prepare_key(obj, serializer) if key else topic.prepare_value(obj, serializer)
    return cast(bytes, prepared[0])


async def send_batches(
    app: faust.types.AppT, topic: str, partition: int, records: Sequence[tuple[bytes | None, bytes | None]]
) -> list[asyncio.Future]:
    """Produce ``(key, value)`` records to one partition as few producer batches.

    One future per batch instead of one per record: aiokafka's per-message futures and
    accumulator bookkeeping were most of the cost of a table write. Order is kept.
    """
    # Faust keeps its aiokafka producer private; batches need it (public aiokafka API).
    producer = app.producer._ensure_producer()  # type: ignore[attr-defined]
    futures: list[asyncio.Future] = []
    batch = producer.create_batch()
    pending = 0
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is None:
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            batch = producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None) is None:
                raise ValueError(f"record of {len(value or b'')} bytes exceeds the producer batch size")
            pending = 0
        pending += 1
    if pending:
        futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


def _persist_offset(store: Any, fut: asyncio.Future) -> None:
    if not fut.cancelled() and fut.exception() is None:
        meta = fut.result()
        store.set_persisted_offset(meta.topic_partition, meta.offset)


#: A flush still waiting after this long logs the producer's pending batches (and again every
#: this many seconds): which partition, its leader, the in-flight requests.
FLUSH_REPORT_AFTER_S = 15.0


async def flush(app: faust.App, futures: Iterable[asyncio.Future] = ()) -> list[Any]:
    """Send everything Faust has buffered and wait for the broker's acks.

    Waits for ``futures`` (from :func:`write_in_partition`, ``table.send_changelog`` or
    ``await channel.send(...)``) and returns their results; raises the first send error. Without
    ``futures`` it only drains the producer (aiokafka's flush never raises, so a failed send
    would go unnoticed -- pass the futures whenever durability matters). A wait longer than
    :data:`FLUSH_REPORT_AFTER_S` is logged with the producer's state (:func:`producer_report`).
    """
    waiting = asyncio.ensure_future(_flush_and_gather(app, list(futures)))
    started = time.monotonic()
    while True:
        try:
            done, _ = await asyncio.wait([waiting], timeout=FLUSH_REPORT_AFTER_S)
        except asyncio.CancelledError:
            waiting.cancel()
            raise
        if done:
            return waiting.result()
        log.warning(
            "flush: waiting %.0fs for the broker's acks; %s", time.monotonic() - started, producer_report(app)
        )


async def _flush_and_gather(app: faust.App, futures: list[asyncio.Future]) -> list[Any]:
    await app.producer.flush()
    return list(await asyncio.gather(*futures))


def producer_report(app: faust.App) -> str:
    """One line on what the worker's aiokafka producer is waiting for (best effort, no I/O)."""
    try:
        producer: Any = app.producer._producer  # type: ignore[attr-defined]
        if producer is None:
            return "no producer"
        acc, sender, client = producer._message_accumulator, producer._sender, producer.client
        now = time.monotonic()
        queued = [
            f"{tp.topic}/{tp.partition}(leader {client.cluster.leader_for_partition(tp)}, "
            f"{len(batches)} queued, oldest {now - batches[0]._ctime:.0f}s)"
            for tp, batches in acc._batches.items()
            if batches
        ]
        pending = [
            f"{b.tp.topic}/{b.tp.partition}(leader {client.cluster.leader_for_partition(b.tp)}, "
            f"age {now - b._ctime:.0f}s, tries {b.retry_count})"
            for b in acc._pending_batches
        ]
        conns = [
            f"node {node}/{group.name} {'up' if conn.connected() else 'down'} {len(conn._requests)} in flight"
            for (node, group), conn in client._conns.items()
        ]
        task = sender.sender_task
        return (
            f"queued {queued[:8]} ({len(queued)}); sent, unanswered {pending[:8]} ({len(pending)}); "
            f"in-flight nodes {sorted(sender._in_flight)}; muted {len(sender._muted_partitions)}; "
            f"sender {'done' if task is not None and task.done() else 'running'}; conns {conns}"
        )
    except Exception as exc:  # noqa: BLE001 - a diagnostic must never break the flush
        return f"(no report: {exc!r})"


async def send_many(
    channel: ChannelT,
    records: Iterable[tuple[Any, Any] | tuple[Any, Any, int | None]],
) -> list[RecordMetadata]:
    """Send ``(key, value[, partition])`` records to ``channel`` and wait for every ack.

    Records are handed to the producer in order (per partition order is kept) and awaited
    together, so the cost is about one round trip, not one per record. Raises on the first
    failed send; records sent before it may already be written (at-least-once).
    """
    pending: list[Any] = []
    for record in records:
        key, value = record[0], record[1]
        partition = record[2] if len(record) > 2 else None  # type: ignore[misc]
        pending.append(await channel.send(key=key, value=value, partition=partition, force=True))
    return list(await asyncio.gather(*pending))


# -- ownership -------------------------------------------------------------------------------


def assigned_partitions(app: faust.App, topic: str | ChannelT) -> set[int]:
    """Partitions of ``topic`` (a source topic or a changelog topic) this worker owns.

    From Faust's assignor: reflects the last completed rebalance and is empty before the
    first one. Use :func:`partitions_ready` before writing from outside an agent.
    """
    name = topic if isinstance(topic, str) else topic.get_topic_name()
    return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == name}


def partitions_ready(app: faust.App, topic: str | ChannelT) -> set[int]:
    """Like :func:`assigned_partitions`, but empty while a rebalance or recovery is running."""
    if app.rebalancing or getattr(app, "in_recovery", False):
        return set()
    return assigned_partitions(app, topic)


def group_by_partition(events: Sequence[EventT]) -> dict[int, list[EventT]]:
    """Split a ``take_events`` batch by source partition, keeping offset order in each."""
    groups: dict[int, list[EventT]] = {}
    for event in events:
        groups.setdefault(event.message.partition, []).append(event)
    return groups
