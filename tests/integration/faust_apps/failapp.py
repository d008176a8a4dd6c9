"""A tiny Faust worker for the failed-batch test: one ``take_events`` agent, like the worker's.

Run as a script (the test starts it as a subprocess):
    FAILAPP_TOPIC=... SPENDGATE_KAFKA_BOOTSTRAP=... SPENDGATE_WORKER_ID=... python failapp.py
Prints ``PROCESSED <partition>:<offset> ...`` after each batch it processed. With
``FAILAPP_FAIL=1`` its first batch raises (as when a flush fails). The batch runs through the
worker's ``run_batch`` guard unless ``FAILAPP_NO_GUARD=1`` (stock Faust: the agent raises and
is restarted in-process).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import faust

from spendgate.settings import Settings
from spendgate.worker.app import run_batch
from spendgate.worker.faust_app import make_app, run_worker

settings = Settings()
app = make_app(settings, session_timeout=2.0)
source = app.topic(os.environ["FAILAPP_TOPIC"], key_type=bytes, value_type=bytes, value_serializer="raw")
failing = {"left": 1 if os.environ.get("FAILAPP_FAIL") == "1" else 0}


async def process(events: Sequence[faust.EventT]) -> None:
    if failing["left"]:
        failing["left"] -= 1
        raise RuntimeError("simulated: a changelog batch expired without a leader")
    print("PROCESSED " + " ".join(f"{e.message.partition}:{e.message.offset}" for e in events), flush=True)


@app.agent(source)
async def agent(stream: faust.StreamT) -> None:
    async for events in stream.take_events(100, within=0.2):  # type: ignore[attr-defined]
        if os.environ.get("FAILAPP_NO_GUARD") == "1":
            await process(events)
        else:
            await run_batch("failapp", process, events)


if __name__ == "__main__":
    run_worker(app)
