"""2. Worker throughput: pre-produced spend.usage -> every key's total in spend.state; 1 and 2 workers.

Baseline: a plain aiokafka consumer over the same records that only parses the JSON.
Profile: py-spy on the 1-worker process (a separate, unmeasured run), top frames by own time.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench import data
from bench.common import log, summary
from bench.stack import Stack, rss_mib
from spendgate.adapters.watermarks import fetch_high_watermarks

KEYS, TEAMS, ORGS = 10_000, 100, 10
#: Keys the "hot keys" run spreads the same number of events over: the cost of a worker is per
#: scope update, and a batch (or a state tick) coalesces every event of one scope into one.
HOT_KEYS = 100
RUN_FIGURES = ("rate_processing", "rate_wall", "first_output_s", "peak_rss_mib", "state_records_per_event",
               "ledger_records_per_event")


async def prepare(stack: Stack, prefix: str, n_events: int, seed: int, active_keys: int = KEYS) -> tuple[int, int]:
    s = await stack.topics(prefix)
    config = data.registry_records(KEYS, TEAMS, ORGS)
    config += [data.budget_record(f"team:t{t}", data.TEAM_LIMITS) for t in range(TEAMS)]
    await data.produce(stack.bootstrap, s.topic("config"), config)
    records, total = data.usage_records(n_events, active_keys, seed=seed)
    await data.produce(stack.bootstrap, s.topic("usage"), records)
    return len(records), total


async def follow_key_totals(bootstrap: str, topic: str, expected: int, timeout_s: float) -> dict[str, float]:
    """Follow ``topic`` (spend.state) until the key scopes' totals add up to ``expected`` nanos."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100)
    await consumer.start()
    totals: dict[str, int] = {}
    running = 0
    first = None
    started = time.monotonic()
    try:
        tps = [TopicPartition(topic, p) for p in range(8)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while time.monotonic() - started < timeout_s:
            batches = await consumer.getmany(timeout_ms=100, max_records=10000)
            for messages in batches.values():
                for m in messages:
                    if first is None:
                        first = time.monotonic()
                    if not m.key or not m.key.startswith(b"key:"):
                        continue
                    value = orjson.loads(m.value)
                    for w in value["windows"]:
                        if w["window"] == "total":
                            nanos = data.nanos_of(w["spend_usd"])
                            running += nanos - totals.get(value["scope"], 0)
                            totals[value["scope"]] = nanos
            if running == expected:
                return {"first": first or time.monotonic(), "done": time.monotonic()}
    finally:
        await consumer.stop()
    raise TimeoutError(f"key totals {running} != expected {expected} after {timeout_s}s")


async def one_run(stack: Stack, prefix: str, n_events: int, workers: int, seed: int,
                  profile_to: Path | None = None, active_keys: int = KEYS) -> dict[str, Any]:
    n, expected = await prepare(stack, prefix, n_events, seed, active_keys)
    s = stack.settings(prefix)
    follower = asyncio.create_task(follow_key_totals(stack.bootstrap, s.topic("state"), expected, 240))
    await asyncio.sleep(0.2)
    spawned = time.monotonic()
    procs = [stack.service("worker", prefix, f"worker-{prefix}{i}.log") for i in range(workers)]
    spy = None
    if profile_to is not None:
        spy = subprocess.Popen([os.path.join(os.path.dirname(os.sys.executable), "py-spy"), "record", "--pid",
                                str(procs[0].pid), "--rate", "250", "--format", "raw", "--output", str(profile_to),
                                "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    rss = 0.0
    try:
        while not follower.done():
            rss = max(rss, sum(rss_mib(p.pid) for p in procs))
            await asyncio.sleep(0.5)
        times = follower.result()
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            try:
                spy.wait(20)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        for p in procs:
            stack.stop_child(p, 10)
    processing = times["done"] - times["first"]
    wall = times["done"] - spawned
    written = {name: sum((await fetch_high_watermarks(stack.bootstrap, topic)).values())
               for name, topic in (("state", s.topic("state")), ("ledger", f"w-{prefix.strip('.')}-ledger-changelog"))}
    return {"events": n, "workers": workers, "wall_s": wall, "first_output_s": times["first"] - spawned,
            "processing_s": processing, "rate_processing": n / processing if processing > 0 else None,
            "rate_wall": n / wall, "peak_rss_mib": rss,
            # scope updates: what a worker's cost is proportional to (see the report)
            "state_records_per_event": written["state"] / n, "ledger_records_per_event": written["ledger"] / n}


async def baseline(stack: Stack, prefix: str, n_events: int) -> dict[str, Any]:
    """Plain aiokafka consumer: assign 8 partitions, read from the beginning, orjson.loads each value."""
    topic = stack.settings(prefix).topic("usage")
    started = time.monotonic()
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100,
                                max_partition_fetch_bytes=4 * 2**20)
    await consumer.start()
    got = 0
    first = None
    cost = 0
    try:
        tps = [TopicPartition(topic, p) for p in range(8)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        while got < n_events:
            for messages in (await consumer.getmany(timeout_ms=100, max_records=10000)).values():
                if first is None:
                    first = time.monotonic()
                for m in messages:
                    cost += len(orjson.loads(m.value)["cost_usd"])
                got += len(messages)
    finally:
        await consumer.stop()
    done = time.monotonic()
    return {"events": got, "rate_processing": got / (done - (first or started)), "rate_wall": got / (done - started)}


def top_frames(profile: Path, n: int = 10) -> dict[str, Any]:
    """Top ``n`` frames of a py-spy raw (collapsed) profile by own samples and by inclusive samples."""
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        lines = profile.read_text().splitlines()
    except OSError:
        return {"error": f"no profile at {profile}"}
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += c
        own[_short(frames[-1])] += c
        for f in {_short(f) for f in frames}:
            incl[f] += c
    # the trunk every sample shares (entry points, the event loop) says nothing: keep frames under 80 %
    trunk = ("runpy", "typer/", "_click/", "spendgate/cli.py", "mode/", "asyncio/base_events.py", "asyncio/events.py",
             "uvicorn/", "threading.py")
    interest = ("Gate.judge", "check (domain/check.py", "post_check", "hash_token", "authenticate",
                "serialize_response", "solve_dependencies", "_validate", "to_request", "Worker.ingest",
                "plan_batch", "parse_usage", "scopes_for", "Worker.aggregate", "Worker.tick", "Worker._publish",
                "send_many", "flush (", "write_in_partition", "state_record", "model_dump_json", "decide (")
    selected: dict[str, int] = {}
    for f, c in incl.items():
        for name in interest:
            if f.startswith(name) or f" {name}" in f or f.startswith(name.split(" (")[0] + " ("):
                if f.split(" (")[0] == name.split(" (")[0]:
                    selected[f] = max(selected.get(f, 0), c)
    return {
        "selected": sorted(((f, 100 * c / max(1, total)) for f, c in selected.items()), key=lambda x: -x[1])[:20],
        "samples": total,
        "own": [(f, c, 100 * c / max(1, total)) for f, c in own.most_common(n)],
        "inclusive": [(f, c, 100 * c / max(1, total)) for f, c in incl.most_common(200)
                      if c < 0.8 * total and not any(t in f for t in trunk)][:n],
    }


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (pkg/file.py:123)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = where.split("/")
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    elif "services" in parts:
        parts = parts[parts.index("services") + 1 :]
    else:
        parts = parts[-2:]
    return f"{name} ({'/'.join(parts)})"


async def run_worker_bench(stack: Stack, workdir: Path, quick: bool) -> dict[str, Any]:
    n_events = 2_000 if quick else 20_000  # long enough to measure the steady state, not start-up
    reps = int(os.environ.get("BENCH_WORKER_REPS", 1 if quick else 2))  # e.g. 3 for an A/B of two trees
    out: dict[str, Any] = {"events_per_run": n_events, "keys": KEYS, "partitions": 8, "reps": reps, "runs": {}}
    run_id = 0
    for workers in (1, 2):
        runs = []
        for _ in range(reps):
            run_id += 1
            r = await one_run(stack, f"wt{run_id}.", n_events, workers, seed=run_id)
            log(f"worker x{workers}: {r['rate_processing']:.0f} ev/s processing, {r['rate_wall']:.0f} ev/s wall "
                f"(first output {r['first_output_s']:.1f}s after spawn)")
            runs.append(r)
            if workers == 1 and _ == 0:
                b = await baseline(stack, f"wt{run_id}.", n_events)
                out.setdefault("baseline_runs", []).append(b)
        out["runs"][str(workers)] = runs
        out[f"workers_{workers}"] = {k: summary([r[k] for r in runs]) for k in RUN_FIGURES}
    hot = []
    for _ in range(reps):
        run_id += 1
        hot.append(await one_run(stack, f"wt{run_id}.", n_events, 1, seed=run_id, active_keys=HOT_KEYS))
        log(f"worker x1, {HOT_KEYS} hot keys: {hot[-1]['rate_processing']:.0f} ev/s processing")
    out["runs"]["1_hot"] = hot
    out["workers_1_hot"] = {k: summary([r[k] for r in hot]) for k in RUN_FIGURES}
    out["hot_keys"] = HOT_KEYS
    for _ in range(reps - 1):
        out["baseline_runs"].append(await baseline(stack, "wt1.", n_events))
    out["baseline"] = {k: summary([b[k] for b in out["baseline_runs"]]) for k in ("rate_processing", "rate_wall")}
    # profile: one more 1-worker run under py-spy (not counted above)
    run_id += 1
    profile = workdir / "worker-profile.txt"
    r = await one_run(stack, f"wt{run_id}.", n_events, 1, seed=run_id, profile_to=profile)
    out["profiled_run"] = r
    out["profile"] = top_frames(profile)
    log(f"worker profiled run: {r['rate_processing']:.0f} ev/s under py-spy")
    return out
