"""recovery_fix part 2: the flow is stopped while Faust seeks, and every stream partition moves.

Faust's ``Recovery`` calls ``flow_control.resume()`` (which clears every stream queue) right
after ``perform_seek``; a record queued during the seek, or fetched on a partition that
aiokafka's ``seek_to_committed`` does not move (no committed offset), would be thrown away and
never fetched again. The end-to-end regression is ``tests/integration/test_worker.py::
test_worker_serves_metrics_and_a_killed_worker_is_processing_again_within_seconds``; this one
pins the mechanism without a broker (Faust's consumer thread is replaced by a recorder).
"""

from __future__ import annotations

from pathlib import Path

from aiokafka import TopicPartition
from faust.types import TP

from spendgate.settings import Settings
from spendgate.worker import recovery_fix
from spendgate.worker.faust_app import make_app

USAGE_0, USAGE_1, USAGE_2 = (TP("spend.usage", p) for p in range(3))


class RecordingThread:
    def __init__(self, app, committed: dict[TP, int | None]) -> None:
        self.app, self.committed, self.calls = app, committed, []

    async def seek_to_committed(self) -> dict[TP, int | None]:
        consumer = self.app.consumer
        self.calls.append(("seek_to_committed", self.app.flow_control.is_active(), consumer.flow_active))
        return self.committed

    async def seek_to_beginning(self, *partitions: TP) -> None:
        assert all(isinstance(tp, TopicPartition) for tp in partitions)  # aiokafka refuses Faust's TP
        self.calls.append(("seek_to_beginning", sorted(partitions)))

    def assignment(self) -> set[TP]:
        return set(self.committed)


async def test_perform_seek_stops_the_flow_and_rewinds_uncommitted_partitions(tmp_path: Path) -> None:
    settings = Settings(kafka_bootstrap="127.0.0.1:1", data_dir=tmp_path, worker_web_port=0)
    app = make_app(settings)  # installs the fixes; touches no network
    assert recovery_fix.installed()
    consumer = app.consumer
    thread = RecordingThread(app, {USAGE_0: 7, USAGE_1: None, USAGE_2: 0})
    consumer._thread = thread
    app.flow_control.resume()
    consumer.resume_flow()

    await consumer.perform_seek()

    assert thread.calls == [
        ("seek_to_committed", False, False),  # nothing is fetched or queued while seeking
        ("seek_to_beginning", [USAGE_1, USAGE_2]),  # aiokafka left these where they were
    ]
    assert consumer._read_offset[USAGE_0] == 7 and consumer._read_offset[USAGE_1] is None
