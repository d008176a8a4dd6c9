"""``rocksdict://``: Faust's RocksDB table store (rocksdict driver), safe for this worker.

Faust's ``faust.stores.rocksdb.Store`` keeps one RocksDB database per changelog partition
(``<tabledir>/<table>-<partition>.db``) and picks it like this (faust-streaming 0.15.3):

* ``_set``: the partition of ``faust.current_event()`` (asserts there is one);
* ``_get`` / ``_contains``: the current event's partition when there is a current event (and
  the table is neither global nor ``use_partitioner``), otherwise a key-index/bloom-filter
  search over every open database; ``_del``: the key index, else every open database;
* iteration (``items()`` ...): every open database of an *active* changelog partition;
* recovery (``apply_changelog_batch``): each changelog record's own partition, then
  ``set_persisted_offset`` per partition; recovery later resumes after that offset.

The worker reads and writes only through ``worker.partitions.get_in_partition`` /
``write_in_partition`` (which set the current event to the right partition), so the
partition never comes from a stale event of a ``take_events`` batch.

What this subclass adds:

* **crash safety**: ``write_in_partition`` updates the store before the changelog records
  are acknowledged. Faust's store would then, after a crash, keep writes the changelog never
  got (and its recovery resumes after the persisted offset, so it never notices). Here a
  partition's database is marked dirty (one key, in the same write-ahead log as the data)
  before the local writes, and the mark is cleared only when every record of the write was
  acknowledged and the persisted offset is stored. A database found dirty when opened is
  destroyed, so Faust recovers that partition from the changelog from the start;
* ``items_in_partition`` reads one partition's database only;
* smaller default RocksDB buffers and cache (Faust's are 3 x 64 MiB memtables and a 2 GiB
  block cache *per partition database*), overridable through the table's ``options``.

Writes from two processes can't share a database: give every worker its own ``data_dir``.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator, Sequence
from typing import Any

from faust.stores import rocksdb as faust_rocksdb

__all__ = ["DEFAULT_OPTIONS", "DIRTY_KEY", "Store"]

#: Marks a partition database holding writes not yet acknowledged by the changelog.
DIRTY_KEY = b"__spendgate\0dirty__"

#: RocksDB options per partition database (Faust's table ``options`` override them).
DEFAULT_OPTIONS: dict[str, Any] = {
    "write_buffer_size": 16 << 20,
    "max_write_buffer_number": 2,
    "block_cache_size": 64 << 20,
}

_HIDDEN = (DIRTY_KEY, faust_rocksdb.Store.offset_key)


class Store(faust_rocksdb.Store):
    """Faust's RocksDB store with the rocksdict driver, plus the dirty-partition guard."""

    def __init__(self, url: Any, app: Any, table: Any, **kwargs: Any) -> None:
        if faust_rocksdb.rocksdict is None:
            raise RuntimeError("SPENDGATE_WORKER_STORE=rocksdict:// needs rocksdict: pip install rocksdict")
        # Faust pops keys from the options mapping it is given (the table's own): pass a copy.
        options = {**DEFAULT_OPTIONS, **(kwargs.pop("options", None) or {}), "driver": "rocksdict"}
        super().__init__(url, app, table, options=options, **kwargs)
        self._writing: dict[int, int] = {}  # partition -> writes awaiting their acks
        self._failed: set[int] = set()  # partitions with a failed changelog write: stay dirty

    # -- partition databases --------------------------------------------------------------

    def _open_for_partition(self, partition: int) -> Any:
        db = super()._open_for_partition(partition)
        if db.get(DIRTY_KEY) is None:
            return db
        path = str(self.partition_path(partition))
        self.log.warning(
            "%s: partition %d has writes the changelog may not have (crash?): rebuilding it "
            "from the changelog",
            self.table_name,
            partition,
        )
        db.close()
        del db
        gc.collect()
        faust_rocksdb.rocksdict.Rdict.destroy(path)
        return super()._open_for_partition(partition)

    def items_in_partition(self, partition: int) -> Iterator[tuple[Any, Any]]:
        """Decoded ``(key, value)`` pairs of one partition's database."""
        for key, value in self._visible_items(self._db_for_partition(partition)):
            yield self._decode_key(key), self._decode_value(value)

    def _visible_keys(self, db: Any) -> Iterator[bytes]:
        return (key for key in super()._visible_keys(db) if key not in _HIDDEN)

    def _visible_items(self, db: Any) -> Iterator[tuple[bytes, bytes]]:
        return ((key, value) for key, value in super()._visible_items(db) if key not in _HIDDEN)

    # -- the dirty mark -------------------------------------------------------------------

    def begin_write(self, partition: int) -> None:
        """Call before changing ``partition``'s keys; pair with :meth:`end_write`."""
        count = self._writing.get(partition, 0)
        if count == 0:
            self._db_for_partition(partition).put(DIRTY_KEY, b"1")
        self._writing[partition] = count + 1

    def end_write(self, partition: int, futures: Sequence[asyncio.Future]) -> None:
        """Clear the mark once ``futures`` (the write's changelog sends) all succeeded.

        Each acknowledged send stores its offset as the partition's persisted offset first
        (where Faust's recovery resumes). A failed or cancelled send leaves the mark for the
        rest of the process, so the next start rebuilds the partition.
        """
        remaining = len(futures)

        def done(fut: asyncio.Future) -> None:
            nonlocal remaining
            remaining -= 1
            if fut.cancelled() or fut.exception() is not None:
                self._failed.add(partition)
            else:
                meta = fut.result()
                self.set_persisted_offset(meta.topic_partition, meta.offset)
            if remaining == 0:
                self._finish(partition)

        if not futures:
            self._finish(partition)
        for fut in futures:
            fut.add_done_callback(done)

    def _finish(self, partition: int) -> None:
        count = self._writing[partition] - 1
        self._writing[partition] = count
        if count == 0 and partition not in self._failed:
            db = self._dbs.get(partition)
            if db is not None:  # None: revoked meanwhile, the mark stays (safe)
                db.delete(DIRTY_KEY)
