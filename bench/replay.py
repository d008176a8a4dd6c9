"""6. Replay speed: ``spendgate replay`` over the same kind of history as the worker bench.

The issue asks replay to be at least as fast per core as the live worker: both run the same
validation, dedupe, attribution and ledger code, replay without a broker round trip per batch.
Each run: fresh topics with the worker bench's registry, team budgets and usage events, then
``spendgate replay --format json`` as a child process (one process, one core). The rate is the
one replay reports (records / time reading and rebuilding, process start excluded); the
``wall`` figure includes the process start and the JSON report.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import log, summary
from bench.stack import PYTHON, Stack
from bench.worker import prepare

_RATE = re.compile(r"replay: (\d+) records in ([\d.]+)s")


async def run_replay_bench(stack: Stack, workdir: Path, quick: bool) -> dict[str, Any]:
    n_events, reps = (2_000, 1) if quick else (20_000, 2)
    out: dict[str, Any] = {"events_per_run": n_events, "reps": reps, "runs": []}
    for run_id in range(reps):
        prefix = f"rp{run_id}."
        n, _ = await prepare(stack, prefix, n_events, seed=100 + run_id)
        report = workdir / f"replay-{run_id}.json"
        started = time.monotonic()
        proc = subprocess.run([PYTHON, "-m", "spendgate.cli", "replay", "--format", "json", "--out", str(report)],
                              env=stack.env(prefix), capture_output=True, text=True, timeout=600)
        wall = time.monotonic() - started
        match = _RATE.search(proc.stderr)
        if proc.returncode != 0 or match is None:
            raise RuntimeError(f"replay failed ({proc.returncode}): {proc.stderr[-800:]}")
        records, seconds = int(match.group(1)), float(match.group(2))
        run = {"records": records, "events": n, "seconds": seconds, "rate": records / seconds,
               "wall_s": wall, "rate_wall": n / wall}
        log(f"replay: {records} records in {seconds:.2f}s ({run['rate']:,.0f} events/s), wall {wall:.1f}s")
        out["runs"].append(run)
    out["rate"] = summary([r["rate"] for r in out["runs"]])
    out["rate_wall"] = summary([r["rate_wall"] for r in out["runs"]])
    return out
