"""Read-your-writes costs (issue 10): how long a control-plane write takes to answer now that it
waits until it is visible, and how long until *another* API replica applies it.

Two API processes on one prefix (no worker needed: the gate applies budgets itself). Per trial:
``PUT /v1/budgets/key:K`` with a 0 limit on API A (timed: the write latency), then
``POST /v1/check`` on API B every 2 ms until it is denied (timed from A's answer: the replica
delay). The first check on A itself right after the answer must already be denied (counted).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from bench.common import log
from bench.stack import ADMIN_TOKEN, Stack, wait_http
from spendgate.adapters.embedded import free_port

PREFIX = "writes."


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(ordered[-1] * 1000, 2)}


async def run_writes_bench(stack: Stack, quick: bool) -> dict[str, Any]:
    await stack.topics(PREFIX)
    ports = [free_port(), free_port()]
    procs = [
        stack.service("api", PREFIX, f"writes-api{n}.log", SPENDGATE_API_PORT=str(p))
        for n, p in enumerate(ports)
    ]
    try:
        for port, proc in zip(ports, procs, strict=True):
            wait_http(f"http://127.0.0.1:{port}/readyz", proc, 60)
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        trials = 30 if quick else 100
        write_s: list[float] = []
        replica_s: list[float] = []
        same_api_denied = 0
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}", headers=headers, timeout=10) as a,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[1]}", headers=headers, timeout=10) as b,
        ):
            for n in range(trials):
                key = f"kw{n}"
                started = time.perf_counter()
                answer = await a.put(
                    f"/v1/budgets/key:{key}", json={"limits": [{"window": "1d", "max_usd": "0"}]}
                )
                answered = time.perf_counter()
                answer.raise_for_status()
                write_s.append(answered - started)
                first = (await a.post("/v1/check", json={"key_id": key})).json()
                same_api_denied += not first["allowed"]
                deadline = answered + 10
                while time.perf_counter() < deadline:
                    if not (await b.post("/v1/check", json={"key_id": key})).json()["allowed"]:
                        replica_s.append(time.perf_counter() - answered)
                        break
                    await asyncio.sleep(0.002)
        out = {
            "trials": trials,
            "write": _percentiles(write_s),
            "other_replica": _percentiles(replica_s),
            "other_replica_applied": len(replica_s),
            "same_api_first_check_denied": same_api_denied,
        }
        log(f"writes: {out}")
        return out
    finally:
        for proc in procs:
            stack.stop_child(proc, 10)
