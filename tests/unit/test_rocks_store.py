"""The rocksdict table store without a broker: partition choice and the crash guard.

The end-to-end tests are ``tests/integration/test_worker_rocksdb.py``.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest
from aiokafka.structs import RecordMetadata, TopicPartition

pytest.importorskip("rocksdict")

from spendgate.settings import Settings  # noqa: E402
from spendgate.worker.faust_app import make_app  # noqa: E402
from spendgate.worker.partitions import get_in_partition, in_partition, items_in_partition  # noqa: E402
from spendgate.worker.rocks_store import DIRTY_KEY, Store  # noqa: E402


def table(tmp_path: Path) -> Any:
    settings = Settings(
        kafka_bootstrap="127.0.0.1:1", data_dir=tmp_path, worker_web_port=0, worker_store="rocksdict://"
    )
    app = make_app(settings)  # touches no network
    t = app.Table("ledger", partitions=4, key_type=str)
    assert isinstance(t.data, Store)
    return t


def reopen(store: Store, partition: int) -> None:
    store._dbs.pop(partition).close()
    gc.collect()
    store._db_for_partition(partition)


def acked(loop: asyncio.AbstractEventLoop, topic: str, partition: int, offset: int) -> asyncio.Future:
    fut = loop.create_future()
    tp = TopicPartition(topic, partition)
    fut.set_result(RecordMetadata(topic, partition, tp, offset, -1, 0, 0))
    return fut


async def test_reads_use_the_given_partition_not_the_current_event(tmp_path: Path) -> None:
    t = table(tmp_path)
    with in_partition(t, 1):
        t.data["scope"] = {"total": 5}
    with in_partition(t, 2):  # what a stale event of another partition did to a read
        assert t.data.get("scope") is None
        assert get_in_partition(t, 1, "scope") == {"total": 5}
    assert get_in_partition(t, 3, "scope", "absent") == "absent"
    assert list(items_in_partition(t, 1)) == [("scope", {"total": 5})]
    assert list(items_in_partition(t, 2)) == []


async def test_unacknowledged_writes_make_the_partition_rebuild_from_the_changelog(tmp_path: Path) -> None:
    t = table(tmp_path)
    store: Store = t.data
    topic = t.changelog_topic.get_topic_name()
    loop = asyncio.get_running_loop()

    store.begin_write(1)  # acknowledged: kept, offset persisted, mark cleared
    with in_partition(t, 1):
        store["kept"] = 1
    store.end_write(1, [acked(loop, topic, 1, 41)])
    await asyncio.sleep(0)  # done callbacks run on the loop
    assert store._dbs[1].get(DIRTY_KEY) is None
    assert list(items_in_partition(t, 1)) == [("kept", 1)]  # the marks never show as keys

    store.begin_write(2)  # never acknowledged (the process "dies" here)
    with in_partition(t, 2):
        store["lost"] = 1
    assert list(items_in_partition(t, 2)) == [("lost", 1)]

    reopen(store, 1)
    reopen(store, 2)
    assert get_in_partition(t, 1, "kept") == 1
    assert store.persisted_offset(TopicPartition(topic, 1)) == 41
    assert list(items_in_partition(t, 2)) == []  # destroyed: Faust recovers it from offset 0
    assert store.persisted_offset(TopicPartition(topic, 2)) is None


async def test_a_failed_send_keeps_the_mark(tmp_path: Path) -> None:
    t = table(tmp_path)
    store: Store = t.data
    loop = asyncio.get_running_loop()
    failed = loop.create_future()
    failed.set_exception(RuntimeError("broker down"))
    store.begin_write(0)
    with in_partition(t, 0):
        store["k"] = 1
    store.end_write(0, [acked(loop, t.changelog_topic.get_topic_name(), 0, 3), failed])
    await asyncio.sleep(0)
    assert store._dbs[0].get(DIRTY_KEY) is not None
