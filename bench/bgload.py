"""Background usage load: ``python -m bench.bgload --bootstrap B --topic T --rate R --keys N``.

Produces cost events for keys k0..k{N-1} straight to the usage topic at ``rate`` events/s
(batches every 50 ms, acks=all) until SIGTERM; prints the count on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time
import uuid

import orjson
from aiokafka import AIOKafkaProducer

from bench.data import now_iso


async def run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, acks="all", linger_ms=5)
    await producer.start()
    rng = random.Random(3)
    sent = 0
    started = time.monotonic()
    tick = 0.05
    try:
        while not stop.is_set():
            due = int((time.monotonic() - started) * args.rate) - sent
            futures = []
            at = now_iso()
            for _ in range(max(0, due)):
                k = f"k{rng.randrange(args.keys)}"
                ev = {"v": 1, "event_id": uuid.uuid4().hex, "occurred_at": at, "key_id": k, "model": "m1",
                      "cost_usd": f"0.{rng.randrange(1, 50_000):06d}"}
                futures.append(await producer.send(args.topic, orjson.dumps(ev), key=k.encode()))
            sent += len(futures)
            if futures:
                await asyncio.gather(*futures)
            try:
                await asyncio.wait_for(stop.wait(), tick)
            except TimeoutError:
                pass
    finally:
        await producer.stop()
    sys.stdout.write(f"{sent} {sent / (time.monotonic() - started):.1f}\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--keys", type=int, default=10_000)
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
