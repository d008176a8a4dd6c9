"""The worker's pure per-event CPU cost, stage by stage, without Kafka or Faust.

``python -m bench.worker_micro [--events N] [--reps R]``: the worker bench's data (bench/worker.py:
10,000 keys, 100 team budgets, 8 scopes per event) through accounting's stage A planning, stage B's
apply_deltas + the ledger records it writes, and the state tick's decide + state_json, in batches as
the worker sees them. Prints CPU µs per event (process time, less sensitive to a loaded box) for each stage (median of R reps). What Faust and Kafka
add on top is the difference with bench/worker.py's figure.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import orjson

from bench import data
from bench.worker import KEYS, ORGS, TEAMS
from spendgate.accounting.deltas import decode_bundle, encode_bundle
from spendgate.accounting.ingest import RawRecord
from spendgate.accounting.ledgers import apply_deltas, partition_of
from spendgate.accounting.publish import Publisher, state_json
from spendgate.accounting.seen import SeenIds, plan_with_seen
from spendgate.domain.decide import decide
from spendgate.domain.holds import HoldBook
from spendgate.domain.ledger import ScopeLedger
from spendgate.domain.registry import RegistryView
from spendgate.records import Source

PARTITIONS = 8
BATCH = 5000


def registry() -> RegistryView:
    view = RegistryView()
    config = data.registry_records(KEYS, TEAMS, ORGS)
    config += [data.budget_record(f"team:t{t}", data.TEAM_LIMITS) for t in range(TEAMS)]
    for key, value in config:
        assert key is not None and value is not None
        view.apply(key.decode(), orjson.loads(value))
    return view


def records(n: int, seed: int) -> list[RawRecord]:
    raw, _ = data.usage_records(n, KEYS, seed=seed)
    offsets = [0] * PARTITIONS
    out = []
    for key, value in raw:
        assert key is not None
        p = partition_of(key.decode(), PARTITIONS)
        out.append(RawRecord(p, offsets[p], value, key, time.time()))
        offsets[p] += 1
    return out


def one_rep(view: RegistryView, recs: list[RawRecord]) -> dict[str, float]:
    seen, holds = SeenIds(86400.0), HoldBook()
    for p in range(PARTITIONS):
        seen.load(p, [])
        holds.load(p, [])
    ledgers: dict[str, ScopeLedger] = {}
    publisher = Publisher()
    spent = dict.fromkeys(("plan", "encode+decode", "apply", "ledger writes", "decide+evaluate", "state_json"), 0.0)

    def timed(stage: str, fn: Callable[[], object]) -> object:
        started = time.process_time()
        out = fn()
        spent[stage] += time.process_time() - started
        return out

    progress: dict[int, int] = {}
    for i in range(0, len(recs), BATCH):
        batch = recs[i : i + BATCH]
        parts = {r.partition for r in batch}
        plan, _ = timed(  # type: ignore[misc]
            "plan",
            lambda: plan_with_seen(seen, batch, now=dict.fromkeys(parts, time.time()), progress=progress,
                                   registry=view, topic="spend.usage", holds=holds),
        )
        progress.update(plan.progress)
        bundles: dict[int, list] = {}
        for d in plan.deltas:
            bundles.setdefault(partition_of(d.scope, PARTITIONS), []).append(d)
        decoded = timed("encode+decode", lambda: [decode_bundle(encode_bundle(ds)) for ds in bundles.values()])
        applied = timed("apply", lambda: [apply_deltas(ledgers, ds) for ds in decoded])  # type: ignore[union-attr]
        timed("ledger writes", lambda: [orjson.dumps(w, option=orjson.OPT_NON_STR_KEYS)
                                        for a in applied for w in a.writes()])  # type: ignore[union-attr]
        now = time.time()
        touched = {s for a in applied for s in a.touched}  # type: ignore[union-attr]
        budgeted = [s for s in touched if s in view.budgets]
        timed("decide+evaluate", lambda: [publisher.evaluate(s, view.budget(s), ledgers[s], now, None)
                                          for s in budgeted])
        src = Source(partition=0, offset=1)
        timed("state_json", lambda: [state_json(s, decide(view.budget(s), ledgers[s], int(now)), now, src,
                                                ledgers[s].hot.watermarks) for s in touched])
    return {stage: 1e6 * t / len(recs) for stage, t in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    view = registry()
    reps = [one_rep(view, records(args.events, seed)) for seed in range(1, args.reps + 1)]
    total = [sum(r.values()) for r in reps]
    for stage in reps[0]:
        print(f"{stage:>16}: {statistics.median(r[stage] for r in reps):7.1f} µs/event")
    med = statistics.median(total)
    print(f"{'total':>16}: {med:7.1f} µs/event -> {1e6 / med:,.0f} events/s on one core (pure path only)")


if __name__ == "__main__":
    main()
