"""7. Rebalance: time from a worker group membership change to spend advancing again (prefix ``rebal.``).

One group of worker processes (memory store, dev settings: 2 s session timeout) under a
background load; the membership changes one at a time: a worker joins, one is SIGKILLed, one
joins, one gets SIGTERM. Measured per change, on the topics (no API in the loop):

* *probes*: every 50 ms one $0.000001 event for the next of 8 probe keys, whose scopes lie
  in the 8 different ``worker.deltas`` partitions. ``stopped_s`` = the longest time any probe
  key's ``spend.state`` total did not advance, from 1 s before the change to 15 s after it
  (the time spend stopped advancing; with no change it is the probe spacing, ~0.4 s);
  ``stall_max_ms`` = the largest produce -> state latency of a probe in that window;
* *enforcement*: a key with a $1 ``total`` budget already at $0.99 gets its crossing $0.02
  event about when the rebalance begins (3.5 s after a join, 1.5 s after a kill or stop);
  ``enforce_ms`` = until its ``blocked`` decision is on ``spend.decisions`` (the gate follows
  that topic; add its few ms). The same trial without a change gives the steady-state figure.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from bench import data
from bench.common import log, summary
from bench.stack import PYTHON, Stack
from spendgate.accounting.ledgers import partition_of
from spendgate.adapters.watermarks import fetch_high_watermarks

PREFIX = "rebal."
PARTITIONS = 8
PROBE_USD = "0.000001"
PROBE_NANOS = 1000
PROBE_EVERY_S = 0.05
BG_KEYS = 2000
WINDOW_S = 15.0  # after a change, where its stall is looked for


def probe_keys() -> list[str]:
    """One key per ``worker.deltas`` partition of its ``key:`` scope."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < PARTITIONS:
        key = f"probe{i}"
        found.setdefault(partition_of(f"key:{key}", PARTITIONS), key)
        i += 1
    return [found[p] for p in sorted(found)]


class Topics:
    """Follows spend.state / spend.decisions from their end; remembers when probe totals and blocks show."""

    def __init__(
        self, bootstrap: str, state: str, decisions: str, probes: list[str], enforce: list[str]
    ) -> None:
        self.bootstrap, self.state, self.decisions = bootstrap, state, decisions
        self.probe_scopes = {f"key:{k}".encode(): k for k in probes}
        self.enforce_scopes = {f"key:{k}".encode(): k for k in enforce}
        self.reached: dict[str, list[float]] = {k: [] for k in probes}  # n-th probe reflected at
        self.blocked_at: dict[str, float] = {}
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=20
        )
        await self.consumer.start()
        tps = [TopicPartition(t, p) for t in (self.state, self.decisions) for p in range(PARTITIONS)]
        self.consumer.assign(tps)
        await self.consumer.seek_to_end(*tps)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            batches = await self.consumer.getmany(timeout_ms=100)
            now = time.monotonic()
            for tp, messages in batches.items():
                for m in messages:
                    if tp.topic == self.state and m.key in self.probe_scopes:
                        key = self.probe_scopes[m.key]
                        value = orjson.loads(m.value)
                        total = next(w["spend_usd"] for w in value["windows"] if w["window"] == "total")
                        n = round(float(total) * 1e9) // PROBE_NANOS
                        seen = self.reached[key]
                        seen += [now] * (n - len(seen))
                    elif (
                        tp.topic == self.decisions
                        and m.key in self.enforce_scopes
                        and orjson.loads(m.value)["blocked"]
                    ):
                        self.blocked_at.setdefault(self.enforce_scopes[m.key], now)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.consumer.stop()


class Probes:
    """Produces probe events round-robin; remembers when the n-th event of each key went out."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, keys: list[str]) -> None:
        self.producer, self.topic, self.keys = producer, topic, keys
        self.sent: dict[str, list[float]] = {k: [] for k in keys}
        self.stop = asyncio.Event()

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            key = self.keys[i % len(self.keys)]
            at = time.monotonic()
            await (
                await self.producer.send(
                    self.topic, orjson.dumps(data.usage_event(key, PROBE_USD, model=None)), key=key.encode()
                )
            )
            self.sent[key].append(at)
            i += 1
            await asyncio.sleep(max(0.0, PROBE_EVERY_S - (time.monotonic() - at)))


def measure(change_at: float, probes: Probes, topics: Topics, window_s: float) -> dict[str, Any]:
    """``stopped_s``: the longest time any probe key's spend did not advance, from 1 s before
    the change to ``window_s`` after it (a joiner starts for seconds before the group
    rebalances, so the stall is found wherever it falls in the window); None until then."""
    stopped, stall, complete = 0.0, 0.0, True
    start, end = change_at - 1, change_at + window_s
    for key, sent in probes.sent.items():
        reached = topics.reached[key]
        marks = [start] + [at for at in reached if start <= at <= end]
        if not reached or reached[-1] < end:
            complete = False
            marks.append(min(end, time.monotonic()))
        stopped = max([stopped] + [b - a for a, b in zip(marks, marks[1:], strict=False)])
        for i, at in enumerate(sent):
            if start <= at <= end and i < len(reached):
                stall = max(stall, reached[i] - at)
    return {"stopped_s": stopped if complete else None, "stall_max_ms": stall * 1000}


async def wait_for(check: Any, timeout_s: float, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(interval_s)
    return False


async def run_rebalance_bench(stack: Stack, quick: bool) -> dict[str, Any]:
    s = await stack.topics(PREFIX)
    cycles = 1 if quick else 2
    changes = ["join", "sigkill", "join", "sigterm"] * cycles
    probes_k = probe_keys()
    enforce_k = [f"enf{i}" for i in range(len(changes) + cycles)]
    config = data.registry_records(BG_KEYS, 20, 4)
    for k in probes_k + enforce_k:
        config.append(data.key_record(k, f"u-{k}", "t0"))
    config += [data.budget_record(f"key:{k}", [{"window": "total", "max_usd": "1.00"}]) for k in enforce_k]
    await data.produce(stack.bootstrap, s.topic("config"), config)
    bg_rate = 50  # the box is shared: more lets a starved worker fall behind, which is not what is measured
    topics = Topics(stack.bootstrap, s.topic("state"), s.topic("decisions"), probes_k, enforce_k)
    await topics.start()
    producer = AIOKafkaProducer(bootstrap_servers=stack.bootstrap, acks="all", linger_ms=2)
    await producer.start()
    probes = Probes(producer, s.topic("usage"), probes_k)
    workers: list[Any] = []
    n_started = 0
    results: list[dict[str, Any]] = []
    steady: list[float] = []

    def start_worker() -> None:
        nonlocal n_started
        n_started += 1
        workers.append(stack.service("worker", PREFIX, f"rebal-worker{n_started}.log"))

    async def enforce(key: str, at: float) -> float | None:
        """Produce the crossing event at ``at``; ms until the blocked decision (None: 30 s timeout)."""
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        sent = time.monotonic()
        await (
            await producer.send(
                s.topic("usage"), orjson.dumps(data.usage_event(key, "0.02", model=None)), key=key.encode()
            )
        )
        ok = await wait_for(lambda: key in topics.blocked_at, 30)
        return (topics.blocked_at[key] - sent) * 1000 if ok else None

    bg = stack.spawn(
        [
            PYTHON,
            "-m",
            "bench.bgload",
            "--bootstrap",
            stack.bootstrap,
            "--topic",
            s.topic("usage"),
            "--rate",
            str(bg_rate),
            "--keys",
            str(BG_KEYS),
        ],
        "rebal-bgload.log",
    )
    prober = asyncio.create_task(probes.run())
    try:
        start_worker()
        # pre-charge every enforcement key to $0.99 (its crossing event comes later)
        pending = [
            await producer.send(
                s.topic("usage"), orjson.dumps(data.usage_event(k, "0.99", model=None)), key=k.encode()
            )
            for k in enforce_k
        ]
        await asyncio.gather(*pending)
        if not await wait_for(lambda: all(len(topics.reached[k]) >= 3 for k in probes_k), 120):
            raise RuntimeError("rebalance bench: the first worker never published probe spend")
        await asyncio.sleep(3)
        steady_from = time.monotonic()
        ek = iter(enforce_k)
        for _ in range(cycles):  # steady state: no change
            t0 = time.monotonic()
            ms = await enforce(next(ek), t0 + 0.5)
            if ms is not None:
                steady.append(ms)
        steady_to = time.monotonic()
        log(f"rebalance: steady enforcement {steady} ms; probes {[len(r) for r in topics.reached.values()]}")
        for change in changes:
            alive = [w for w in workers if w.poll() is None]
            t0 = time.monotonic()
            if change == "join":
                start_worker()
            elif change == "sigkill":
                alive[-1].kill()
            # graceful stop of the oldest: waits for its exit, off the loop that follows the topics
            stopping = (
                asyncio.create_task(asyncio.to_thread(stack.stop_child, alive[0], 20))
                if change == "sigterm"
                else None
            )
            # a joiner starts for seconds before the group rebalances, a dead member's session
            # (2 s) expires first: the crossing event goes out about when the rebalance begins
            enforce_ms = await enforce(next(ek), t0 + (3.5 if change == "join" else 1.5))
            settled = await wait_for(
                lambda t0=t0: measure(t0, probes, topics, WINDOW_S)["stopped_s"] is not None, 90, 0.2
            )
            if stopping is not None:
                await stopping
            await asyncio.sleep(3)  # let the group settle; later probes show the steady state again
            result = {
                "change": change,
                "enforce_ms": enforce_ms,
                "settled": settled,
                **measure(t0, probes, topics, WINDOW_S),
            }
            log(f"rebalance: {result}")
            results.append(result)
    finally:
        probes.stop.set()
        await asyncio.gather(prober, return_exceptions=True)
        stack.stop_child(bg, 10)
        for w in workers:
            stack.stop_child(w, 10)
        await producer.stop()
        await topics.stop()
    latency = [  # probes of the steady phase (one worker, no change)
        (topics.reached[k][i] - at) * 1000
        for k, sent in probes.sent.items()
        for i, at in enumerate(sent)
        if steady_from <= at < steady_to and i < len(topics.reached[k])
    ]
    by_change: dict[str, Any] = {}
    for kind in ("join", "sigkill", "sigterm"):
        runs = [r for r in results if r["change"] == kind]
        by_change[kind] = {
            "stopped_s": summary([r["stopped_s"] for r in runs if r["stopped_s"] is not None]),
            "stall_max_ms": summary([r["stall_max_ms"] for r in runs]),
            "enforce_ms": summary([r["enforce_ms"] for r in runs if r["enforce_ms"] is not None]),
            "timeouts": sum(1 for r in runs if r["enforce_ms"] is None or r["stopped_s"] is None),
        }
    ends = await fetch_high_watermarks(stack.bootstrap, s.topic("usage"))
    return {
        "background_rate": bg_rate,
        "partitions": PARTITIONS,
        "session_timeout_s": 2.0,
        "runs": results,
        "by_change": by_change,
        "steady_enforce_ms": summary(steady),
        "steady_probe_latency_ms": summary(latency),
        "usage_records": sum(ends.values()),
    }
