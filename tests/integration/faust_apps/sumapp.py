"""A tiny Faust worker for the recovery regression test: sums values per key in a table.

Run as a script (the test starts it as a subprocess):
    SUMAPP_TOPIC=... SPENDGATE_KAFKA_BOOTSTRAP=... python sumapp.py
Prints ``PROCESSED <n>`` after each batch is durable and ``RECOVERED <json>`` each time table
recovery completes. ``SUMAPP_NO_FIX=1`` runs without ``recovery_fix.install()``.

The batch pattern is the one the worker uses: ``take_events``, group by source partition,
skip events at offsets <= ``progress/<p>``, write sums and progress in one changelog batch.
"""

from __future__ import annotations

import json
import os

import faust

from spendgate.settings import Settings
from spendgate.worker.faust_app import make_app, run_worker
from spendgate.worker.partitions import assigned_partitions, group_by_partition, write_in_partition
from spendgate.worker.sends import flush


def build(settings: Settings, topic_name: str, *, fix: bool) -> faust.App:
    app = make_app(settings, recovery_fix_enabled=fix, session_timeout=2.0)
    source = app.topic(topic_name, key_type=str, value_type=int, value_serializer="json")
    state = app.Table("state", default=None, partitions=settings.partitions)

    def snapshot() -> dict[str, object]:
        sums = {k[4:]: v for k, v in state.items() if k.startswith("sum/")}
        owned = sorted(assigned_partitions(app, state.changelog_topic))
        return {"total": sum(sums.values()), "sums": sums, "partitions": owned}

    @state.on_recover
    async def _recovered() -> None:
        print("RECOVERED " + json.dumps(snapshot(), sort_keys=True), flush=True)

    @app.agent(source)
    async def summer(stream: faust.StreamT) -> None:
        processed = 0
        async for events in stream.take_events(1000, within=0.05):
            futures = []
            for partition, group in group_by_partition(events).items():
                done = state.get(f"progress/{partition}", -1)
                updates: dict[str, object] = {}
                for event in group:
                    if event.message.offset <= done:
                        continue
                    key = f"sum/{event.key}"
                    updates[key] = int(updates.get(key, state.get(key, 0))) + event.value
                    done = event.message.offset
                    processed += 1
                updates[f"progress/{partition}"] = done
                futures += await write_in_partition(state, group[-1], updates.items())
            await flush(app, futures)
            print(f"PROCESSED {processed}", flush=True)

    return app


def main() -> None:
    settings = Settings()
    app = build(
        settings, os.environ["SUMAPP_TOPIC"], fix=os.environ.get("SUMAPP_NO_FIX") != "1"
    )
    run_worker(app, loglevel=os.environ.get("SUMAPP_LOGLEVEL", "warning"))


if __name__ == "__main__":
    main()
