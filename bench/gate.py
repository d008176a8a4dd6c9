"""1. Gate check latency/throughput (open loop), beside the HTTP floor and a Redis-backed check."""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import orjson

from bench import data
from bench.common import log, pin, run_json, summary
from bench.stack import ADMIN_TOKEN, PYTHON, Stack, rss_mib, wait_http
from spendgate.adapters.embedded import free_port

P99_TARGET_MS = 5.0
SERVER_CPU, LOADGEN_CPU = 0, 1


async def load_gate_topics(stack: Stack, prefix: str, keys: int, teams: int, orgs: int) -> dict[str, Any]:
    s = await stack.topics(prefix)
    started = time.monotonic()
    config = data.registry_records(keys, teams, orgs) + data.gate_budgets(keys, teams)
    n_config = await data.produce(stack.bootstrap, s.topic("config"), config)
    states = data.state_records(keys, teams, time.time())
    n_state = await data.produce(stack.bootstrap, s.topic("state"), states)
    took = time.monotonic() - started
    log(f"gate data: {n_config:,} config + {n_state:,} state records produced in {took:.1f}s")
    return {"config_records": n_config, "state_records": n_state, "budgeted_scopes": keys + teams,
            "keys": keys, "teams": teams, "orgs": orgs, "produce_s": took}


def write_bodies(path: Path, keys: int, n: int = 5000) -> None:
    rng = random.Random(7)
    with open(path, "wb") as f:
        for _ in range(n):
            i = rng.randrange(keys)
            f.write(orjson.dumps({"key_id": f"k{i}", "model": f"m{i % 50}"}) + b"\n")


class Server:
    def __init__(self, name: str, proc: subprocess.Popen, port: int, token: str) -> None:
        self.name, self.proc, self.port, self.token = name, proc, port, token


def start_servers(stack: Stack, prefix: str, keys: int, teams: int, orgs: int) -> dict[str, Server]:
    from bench.baselines import load_redis

    servers: dict[str, Server] = {}
    port = free_port()
    api = stack.service("api", prefix, "gate-api.log", SPENDGATE_API_PORT=str(port))
    ready_s = wait_http(f"http://127.0.0.1:{port}/readyz", api, 300)
    log(f"gate API ready in {ready_s:.1f}s (rss {rss_mib(api.pid):.0f} MiB)")
    servers["spendgate"] = Server("spendgate", api, port, ADMIN_TOKEN)
    port = free_port()
    floor = stack.spawn([PYTHON, "-m", "bench.baselines", "floor", "--port", str(port)], "floor.log")
    wait_http(f"http://127.0.0.1:{port}/healthz", floor, 30)
    servers["floor"] = Server("floor", floor, port, "")
    n = load_redis(keys, teams)
    log(f"redis: {n:,} spend counters loaded")
    port = free_port()
    rapp = stack.spawn([PYTHON, "-m", "bench.baselines", "redis", "--port", str(port), "--keys", str(keys),
                        "--teams", str(teams), "--orgs", str(orgs), "--token", ADMIN_TOKEN], "redis-app.log")
    wait_http(f"http://127.0.0.1:{port}/healthz", rapp, 60)
    servers["redis"] = Server("redis", rapp, port, ADMIN_TOKEN)
    for server in servers.values():
        pin(server.proc.pid, SERVER_CPU)
        try:
            import psutil

            for child in psutil.Process(server.proc.pid).children(recursive=True):
                pin(child.pid, SERVER_CPU)
        except Exception:  # noqa: BLE001
            pass
    return servers


def shoot(server: Server, bodies: Path, rate: float, duration: float, warmup: float) -> dict[str, Any]:
    argv = [PYTHON, "-m", "bench.loadgen", "--port", str(server.port), "--path", "/v1/check",
            "--bodies", str(bodies), "--rate", str(rate), "--duration", str(duration), "--warmup", str(warmup),
            "--connections", "64", "--drain", "5"]
    if server.token:
        argv += ["--token", server.token]
    return run_json(argv, timeout=duration + warmup + 30, cpu=LOADGEN_CPU)


def passes(result: dict[str, Any]) -> bool:
    non_ok = result["completed"] - result["ok"]
    return (
        result["missing"] == 0
        and non_ok == 0
        and result["p99_ms"] < P99_TARGET_MS
        and result["achieved_rate"] >= 0.95 * result["rate"]
    )


def max_sustainable(server: Server, bodies: Path, step_s: float, start: float = 250, cap: float = 30000) -> tuple[float, list[dict[str, Any]]]:
    """Largest rate whose p99 < 5 ms with everything answered 2xx: x1.5 ladder, then 2 bisections."""
    steps: list[dict[str, Any]] = []
    good, bad = 0.0, None
    rate = start
    while rate <= cap:
        r = shoot(server, bodies, rate, step_s, 0.5)
        steps.append(r)
        if passes(r):
            good = rate
            rate = round(rate * 1.5)
        else:
            bad = rate
            break
    if bad is not None and good > 0:
        for _ in range(2):
            mid = round((good + bad) / 2)
            r = shoot(server, bodies, mid, step_s, 0.5)
            steps.append(r)
            if passes(r):
                good = mid
            else:
                bad = mid
    return good, steps


def wrk_closed_loop(server: Server, workdir: Path, bodies: Path, duration: int = 5) -> float | None:
    """Closed-loop max throughput with wrk (32 connections), one request body; requests/s."""
    if shutil.which("wrk") is None:
        return None
    body = bodies.read_bytes().splitlines()[0].decode()
    script = workdir / f"wrk-{server.name}.lua"
    auth = f'wrk.headers["Authorization"] = "Bearer {server.token}"\n' if server.token else ""
    script.write_text(f'wrk.method = "POST"\nwrk.body = [[{body}]]\nwrk.headers["Content-Type"] = "application/json"\n{auth}')
    proc = subprocess.run(["taskset", "-c", str(LOADGEN_CPU), "wrk", "-t1", "-c32", f"-d{duration}s", "-s", str(script),
                           f"http://127.0.0.1:{server.port}/v1/check"], capture_output=True, text=True, timeout=duration + 20)
    for line in proc.stdout.splitlines():
        if line.startswith("Requests/sec:"):
            non2xx = [x for x in proc.stdout.splitlines() if "Non-2xx" in x]
            if non2xx:
                log(f"wrk {server.name}: {non2xx[0].strip()}")
                return None
            return float(line.split()[1])
    log(f"wrk {server.name} failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    return None


def run_gate(stack: Stack, servers: dict[str, Server], workdir: Path, keys: int, quick: bool) -> dict[str, Any]:
    bodies = workdir / "check-bodies.jsonl"
    write_bodies(bodies, keys)
    reps = 2 if quick else 3
    duration, warmup = (2.0, 0.5) if quick else (4.0, 1.0)
    step_s = 1.5 if quick else 2.5
    search_reps = 1 if quick else 2
    out: dict[str, Any] = {"rates": {}, "max_sustainable": {}, "wrk_closed_loop_rps": {}, "raw": {}}
    # warm every server (JIT-less, but caches, connection pools, pydantic)
    for server in servers.values():
        shoot(server, bodies, 500, 1.0, 0.2)
    for rate in (500, 2000):
        for name, server in servers.items():
            runs = [shoot(server, bodies, rate, duration, warmup) for _ in range(reps)]
            out["raw"][f"{name}@{rate}"] = runs
            out["rates"].setdefault(str(rate), {})[name] = {
                q: summary([r[f"{q}_ms"] for r in runs]) for q in ("p50", "p99", "p999", "max")
            } | {"achieved_rate": summary([r["achieved_rate"] for r in runs]),
                 "non_2xx": sum(r["completed"] - r["ok"] for r in runs),
                 "missing": sum(r["missing"] for r in runs),
                 "pass_p99_lt_5ms": sum(passes(r) for r in runs)}
            log(f"gate {name} @ {rate}/s: p50 {out['rates'][str(rate)][name]['p50']['median']:.2f} ms, "
                f"p99 {out['rates'][str(rate)][name]['p99']['median']:.2f} ms")
    for name, server in servers.items():
        found = []
        for _ in range(search_reps):
            best, steps = max_sustainable(server, bodies, step_s)
            found.append(best)
            out["raw"].setdefault(f"{name}@search", []).append(steps)
        out["max_sustainable"][name] = summary(found)
        log(f"gate {name}: max sustainable with p99 < 5 ms: {found}")
    for name, server in servers.items():
        out["wrk_closed_loop_rps"][name] = wrk_closed_loop(server, workdir, bodies, 3 if quick else 5)
    out["rss_mib"] = {name: rss_mib(s.proc.pid) for name, s in servers.items()}
    out["setup"] = {"reps": reps, "duration_s": duration, "warmup_s": warmup, "search_step_s": step_s,
                    "search_reps": search_reps, "connections": 64,
                    "request": "POST /v1/check {key_id, model} -> 7 scopes (key, user, team, member, org, model, key_model)"}
    return out
