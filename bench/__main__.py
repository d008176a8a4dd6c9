"""``python -m bench [--only gate,worker,replay,enforce,overshoot,reserve,cold,micro,rebalance,writes,dashboard] [--quick]``.

``python -m bench --kafka real [--only gate,worker]`` runs the gate and worker phases against a
real 3-broker Apache Kafka cluster (``spendgate.adapters.kafka_cluster``: KRaft, RF 3, min ISR 2,
changelogs included) instead of Tansu; its figures go beside the embedded ones (``gate_kafka``,
``worker_kafka`` in BENCHMARKS.json), the embedded figures are kept.

Starts its own embedded stack (Tansu + Postgres on free ports; spendgate worker/API as child
processes), runs each measurement beside its baseline, writes BENCHMARKS.md and BENCHMARKS.json.
With ``--only``, the phases run replace theirs in the existing BENCHMARKS.json and the others
are kept (the report says which run each comes from).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.common import log

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("micro", "gate", "reserve", "cold", "worker", "replay", "enforce", "overshoot", "rebalance", "litellm",
          "litellm_holds", "writes", "dashboard")
#: BENCHMARKS.json keys written by each phase (for ``--only`` merges).
PHASE_KEYS = {
    "micro": ("micro",),
    "gate": ("gate", "gate_data"),
    "cold": ("cold_api", "cold_worker", "gate_data"),
    "worker": ("worker",),
    "replay": ("replay",),
    "enforce": ("enforce", "enforce_1000"),
    "overshoot": ("overshoot", "overshoot_holds"),
    "reserve": ("reserve",),
    "litellm_holds": ("litellm_holds",),
    "rebalance": ("rebalance",),
    "litellm": ("litellm",),
    "writes": ("writes",),
    "dashboard": ("dashboard",),
    # --kafka real: the same phases on the 3-broker cluster, stored beside the embedded figures
    "gate@kafka": ("gate_kafka", "gate_data_kafka"),
    "worker@kafka": ("worker_kafka",),
}
#: Phases that run on the real cluster (``--kafka real``) and the BENCHMARKS.json keys they write.
KAFKA_PHASES = ("gate", "worker")
KAFKA_SUFFIXED = ("gate", "gate_data", "worker")


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_avg_at_start": os.getloadavg()}


def micro(quick: bool) -> dict[str, Any]:
    argv = [sys.executable, str(ROOT / "bench" / "check_micro.py"), "--scopes", "100000" if not quick else "20000",
            "--number", "20000"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    out: dict[str, Any] = {"stdout": proc.stdout}
    for label in ("allowed", "blocked"):
        m = re.search(rf"check\(\) {label}\s+(\d+)-scope request: ([\d.]+) us", proc.stdout)
        if m:
            out[f"{label}_us"] = float(m.group(2))
            out["scopes_per_request"] = int(m.group(1))
    log(f"micro: {proc.stdout.strip().splitlines()[-2:] if proc.stdout else proc.stderr[-300:]}")
    return out


WORKDIR = Path(os.environ.get("SPENDGATE_BENCH_DIR", "/tmp/spendgate-bench"))


async def main_async(args: argparse.Namespace, results: dict[str, Any], stack: Any) -> None:
    from bench import coldstart, gate, holds, live, replay, worker

    only = set(args.only.split(",")) if args.only else set(PHASES)
    quick = args.quick
    workdir = WORKDIR
    keys, teams, orgs = (20_000, 200, 10) if quick else (100_000, 1_000, 10)
    if "micro" in only:
        results["micro"] = micro(quick)
    try:
        stack.start()
        log(f"stack: broker {stack.bootstrap}, postgres {stack.database_url}")
        if only & {"gate", "cold", "reserve"}:
            results["gate_data"] = await gate.load_gate_topics(stack, "gate.", keys, teams, orgs)
        if "gate" in only:
            stack.start_redis()
            servers = gate.start_servers(stack, "gate.", keys, teams, orgs)
            try:
                results["gate"] = gate.run_gate(stack, servers, workdir, keys, quick)
                results["gate"]["profile"] = profile_gate(stack, servers["spendgate"], workdir, quick)
                results["gate"]["load_avg_after"] = os.getloadavg()
            finally:
                for s in servers.values():
                    stack.stop_child(s.proc, 10)
                from bench.baselines import clear_redis

                clear_redis()
        if "reserve" in only:
            results["reserve"] = holds.run_reserve_latency(stack, workdir, keys, quick)
        if "cold" in only:
            results["cold_api"] = coldstart.api_cold_start(stack, "gate.", 2 if quick else 3)
        if "worker" in only:
            results["worker"] = await worker.run_worker_bench(stack, workdir, quick)
            results["worker"]["load_avg_after"] = os.getloadavg()
        if "replay" in only:
            results["replay"] = await replay.run_replay_bench(stack, workdir, quick)
        if only & {"enforce", "overshoot"}:
            n_enf, n_over = (4, 1) if quick else (10, 3)
            enforce_keys, over_keys = live.trial_keys(2 * n_enf, n_over)
            hold_keys = holds.trial_keys(n_over)
            lv = live.Live(stack)
            await lv.start(enforce_keys + over_keys[False] + over_keys[True] + [k for ks in hold_keys.values() for k in ks])
            try:
                if "enforce" in only:
                    results["enforce"] = await live.run_enforcement(lv, enforce_keys[:n_enf], args.enforce_rate)
                if "overshoot" in only:
                    results["overshoot"] = await live.run_overshoot(lv, over_keys)
                    results["overshoot_holds"] = await holds.run_overshoot_holds(lv, hold_keys)
                if "enforce" in only and args.enforce_rate < 1000:
                    # issue 16's load: ~1,000 events/s in the background, as many trials, bounded waits
                    results["enforce_1000"] = await live.run_enforcement_overload(lv, enforce_keys[n_enf:], 1000)
            finally:
                lv.stop()
        if "rebalance" in only:
            from bench import rebalance

            results["rebalance"] = await rebalance.run_rebalance_bench(stack, quick)
        if "litellm" in only:
            from bench import gateway

            results["litellm"] = await gateway.run_litellm_bench(stack, workdir, quick)
        if "litellm_holds" in only:
            results["litellm_holds"] = await holds.run_litellm_overshoot(stack, workdir, quick)
        if "writes" in only:
            from bench import writes

            results["writes"] = await writes.run_writes_bench(stack, quick)
        if "dashboard" in only:
            from bench import dashboard

            results["dashboard"] = await dashboard.run_dashboard_bench(stack, quick)
        if "cold" in only:
            scopes = 10_000 if quick else 50_000
            results["cold_worker"] = await coldstart.worker_cold_start(stack, "cold.", scopes, 10, 1 if quick else 3)
    finally:
        stack.stop()


def profile_gate(stack: Any, server: Any, workdir: Path, quick: bool) -> dict[str, Any]:
    """py-spy on the API while it serves a fixed 1,500 checks/s (where the time goes)."""
    from bench import gate
    from bench.worker import top_frames

    out_file = workdir / "gate-profile.txt"
    spy = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.proc.pid),
                            "--rate", "250", "--format", "raw", "--output", str(out_file), "--nonblocking",
                            "--duration", "4"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        gate.shoot(server, workdir / "check-bodies.jsonl", 1500, 3.0, 0.5)
    finally:
        try:
            spy.wait(20)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
    return top_frames(out_file)


def merged(previous: dict[str, Any], new: dict[str, Any], phases: list[str]) -> dict[str, Any]:
    """``previous`` with the keys of ``phases`` taken from ``new``; remembers what came from where."""
    out = dict(previous)
    for phase in phases:
        for key in PHASE_KEYS.get(phase, ()):
            if key in new:
                out[key] = new[key]
    runs = [r for r in previous.get("updates", []) if r.get("phases") != phases]
    out["updates"] = [*runs, {"phases": phases, "command": new["command"], "started_at": new["started_at"],
                              "elapsed_s": new["elapsed_s"], "machine": new["machine"], "error": new.get("error")}]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer runs, for iteration")
    parser.add_argument("--enforce-rate", type=float, default=50.0,
                        help="background events/s during the enforcement-delay trials (default 50)")
    parser.add_argument("--out", default=str(ROOT), help="where BENCHMARKS.md/.json go")
    parser.add_argument("--kafka", choices=("embedded", "real"), default="embedded",
                        help="broker: embedded Tansu (default) or a real 3-broker Apache Kafka cluster "
                             f"(phases {','.join(KAFKA_PHASES)} only; needs java and mvn)")
    args = parser.parse_args()
    if args.kafka == "real":
        args.only = args.only or ",".join(KAFKA_PHASES)
        if not set(args.only.split(",")) <= set(KAFKA_PHASES):
            parser.error(f"--kafka real runs only {','.join(KAFKA_PHASES)}")
    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine(), "command": " ".join(["python -m bench", *sys.argv[1:]]),
                               "quick": args.quick, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    code = 0
    from bench.stack import Stack

    stack = Stack(WORKDIR, kafka=args.kafka)
    try:
        if args.kafka == "real":
            stack.start_kafka_cluster()
            log(f"kafka: 3 brokers at {stack.broker.bootstrap}")  # type: ignore[attr-defined]
        asyncio.run(main_async(args, results, stack))
    except BaseException as exc:  # noqa: BLE001 - partial numbers are still written
        results["error"] = "".join(traceback.format_exception(exc))[-4000:]
        log(f"FAILED: {exc!r}")
        code = 1
    finally:
        if stack.broker is not None and args.kafka == "real":
            stack.broker.stop()  # type: ignore[attr-defined]  # idempotent; main_async stops it too
    elapsed = results["elapsed_s"] = time.monotonic() - started
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    out = Path(args.out)
    phases = args.only.split(",") if args.only else []
    if args.kafka == "real":
        for key in KAFKA_SUFFIXED:
            if key in results:
                results[f"{key}_kafka"] = results.pop(key)
        phases = [f"{p}@kafka" for p in phases]
    if phases and (out / "BENCHMARKS.json").exists():
        results = merged(json.loads((out / "BENCHMARKS.json").read_text()), results, phases)
    (out / "BENCHMARKS.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "BENCHMARKS.md").write_text(report.markdown(results))
    log(f"wrote {out / 'BENCHMARKS.md'} and BENCHMARKS.json in {elapsed:.0f}s")
    sys.exit(code)


if __name__ == "__main__":
    main()
