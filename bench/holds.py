"""4b. Overshoot with holds (issue 15) and 1b. the latency of a reserving check.

Overshoot: the section-4 setup (20 concurrent clients, one key with a $1.00/day limit, $0.01
calls, a client stops at its first deny), but each call is a reserving check (``"reserve":
true``, a fresh ``request_id``, ``estimated_cost_usd``) and its cost event carries the same
``request_id`` (the settle). Variants: estimates equal to the cost, 2x too high, 2x too low; one
API process, or two with the clients split between them.

Latency: the gate bench's API (100,000 keys, no worker: a hold is counted by the gate that
placed it, and its event is appended to ``spend.usage`` by that process), plain and reserving
checks alternated at the same open-loop rate.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench import data
from bench.common import log, summary
from bench.stack import Stack, wait_http
from spendgate.adapters.embedded import free_port

VARIANTS: dict[str, tuple[str, int]] = {  # name -> (estimate for a $0.01 call, API processes)
    "exact_1_api": ("0.01", 1),
    "exact_2_apis": ("0.01", 2),
    "high_2x_1_api": ("0.02", 1),
    "low_2x_1_api": ("0.005", 1),
    "high_2x_2_apis": ("0.02", 2),
    "low_2x_2_apis": ("0.005", 2),
}


def trial_keys(n: int) -> dict[str, list[str]]:
    tag = uuid.uuid4().hex[:6]
    return {name: [f"kh{tag}{i}{name[:1]}{name[-5:]}" for i in range(n)] for name in VARIANTS}


async def hold_trial(
    urls: list[str], key: str, estimate: str, clients: int = 20, timeout_s: float = 60
) -> dict[str, Any]:
    from bench.live import check, post_events, spend_1d

    admitted = 0
    errors = 0
    started = time.monotonic()

    async def one(client: httpx.AsyncClient, url: str, c: int) -> None:
        nonlocal admitted, errors
        n = 0
        while time.monotonic() - started < timeout_s:
            n += 1
            request_id = f"{key}-{c}-{n}"
            if not await check(client, url, key, estimate, request_id):
                return
            event = data.usage_event(key, "0.01", model=None) | {"request_id": request_id}
            try:
                await post_events(client, url, [event])
                admitted += 1
            except RuntimeError:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(headers=_headers(), timeout=10, limits=limits) as client:
        await asyncio.gather(*(one(client, urls[c % len(urls)], c) for c in range(clients)))
        took = time.monotonic() - started
        await asyncio.sleep(1.5)
        recorded = await spend_1d(client, urls[0], f"key:{key}")
    return {
        "admitted_calls": admitted,
        "over_calls": admitted - 100,
        "over_usd": round(admitted / 100 - 1.0, 2),
        "recorded_usd": recorded / 1e9,
        "errors": errors,
        "duration_s": took,
        "rate_calls_per_s": admitted / took if took else None,
    }


def _headers() -> dict[str, str]:
    from bench.live import HEADERS

    return HEADERS


async def run_overshoot_holds(live: Any, keys: dict[str, list[str]]) -> dict[str, Any]:
    """Every variant's trials; a second API process (same topics) serves the two-API ones."""
    port = free_port()
    second = live.stack.service("api", live.prefix, "live-api-2.log", SPENDGATE_API_PORT=str(port))
    out: dict[str, Any] = {}
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", second, 120)
        await _wait_budgets(f"http://127.0.0.1:{port}", [k for ks in keys.values() for k in ks])
        for name, (estimate, apis) in VARIANTS.items():
            urls = [live.url, f"http://127.0.0.1:{port}"][:apis]
            trials = []
            for key in keys[name]:
                trials.append(await hold_trial(urls, key, estimate))
                await asyncio.sleep(0.5)
            out[name] = {
                "estimate_usd": estimate,
                "api_processes": apis,
                "trials": trials,
                "over_calls": summary([t["over_calls"] for t in trials]),
                "over_usd": summary([t["over_usd"] for t in trials]),
                "rate_calls_per_s": summary([t["rate_calls_per_s"] for t in trials]),
            }
            log(f"overshoot with holds, {name}: {[t['over_calls'] for t in trials]} calls over")
    finally:
        live.stack.stop_child(second, 10)
    return out


async def _wait_budgets(url: str, keys: list[str], timeout_s: float = 60) -> None:
    """The second API has every trial key's budget (it followed spend.config)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(headers=_headers(), timeout=10) as client:
        for key in keys:
            while True:
                body = (await client.get(f"{url}/v1/spend/key:{key}")).json()
                if any(w.get("limit_usd") == "1" for w in body.get("windows", ())):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"second API: no budget for key:{key}")
                await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- latency


def write_reserve_bodies(path: Path, keys: int, n: int, tag: str) -> None:
    """Like the gate bench's bodies, each a reserving check with its own request id."""
    import random

    rng = random.Random(7)
    with open(path, "wb") as f:
        for j in range(n):
            i = rng.randrange(keys)
            body = {
                "key_id": f"k{i}",
                "model": f"m{i % 50}",
                "reserve": True,
                "request_id": f"{tag}-{j}",
                "estimated_cost_usd": "0.000001",
            }
            f.write(orjson.dumps(body) + b"\n")


def run_reserve_latency(stack: Stack, workdir: Path, keys: int, quick: bool) -> dict[str, Any]:
    from bench import gate
    from bench.common import pin
    from bench.stack import ADMIN_TOKEN, rss_mib

    rate = 2000
    reps = 2 if quick else 3
    duration, warmup = (2.0, 0.5) if quick else (4.0, 1.0)
    import os

    load_at_start = os.getloadavg()[0]
    port = free_port()
    api = stack.service("api", "gate.", "reserve-api.log", SPENDGATE_API_PORT=str(port))
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", api, 300)
        pin(api.pid, gate.SERVER_CPU)
        server = gate.Server("spendgate", api, port, ADMIN_TOKEN)
        plain = workdir / "check-bodies.jsonl"
        gate.write_bodies(plain, keys)
        per_run = int(rate * (duration + warmup + 1)) + 1000
        gate.shoot(server, plain, 500, 1.0, 0.2)  # warm
        warm = workdir / "reserve-bodies-warm.jsonl"
        write_reserve_bodies(warm, keys, 1000, "warm")
        gate.shoot(server, warm, 500, 1.0, 0.2)
        import psutil

        process = psutil.Process(api.pid)
        broker = psutil.Process(stack.broker.process.popen.pid)  # type: ignore[attr-defined]

        def shoot(bodies: Path) -> dict[str, Any]:
            """One run, and the CPU per request of the API process and of the broker (user +
            system: what each request costs, whatever else the machine does)."""
            before, broker_before = sum(process.cpu_times()[:2]), sum(broker.cpu_times()[:2])
            result = gate.shoot(server, bodies, rate, duration, warmup)
            done = result["completed"] or 1
            result["api_cpu_us_per_request"] = (sum(process.cpu_times()[:2]) - before) / done * 1e6
            result["broker_cpu_us_per_request"] = (sum(broker.cpu_times()[:2]) - broker_before) / done * 1e6
            return result

        runs: dict[str, list[dict[str, Any]]] = {"plain": [], "reserve": []}
        for rep in range(reps):  # alternated, so drift on the shared machine hits both alike
            runs["plain"].append(shoot(plain))
            bodies = workdir / f"reserve-bodies-{rep}.jsonl"
            write_reserve_bodies(bodies, keys, per_run, f"r{rep}-{uuid.uuid4().hex[:6]}")
            runs["reserve"].append(shoot(bodies))
        out: dict[str, Any] = {
            "rate": rate,
            "raw": runs,
            "rss_mib_after": rss_mib(api.pid),
            "load_avg": [load_at_start, os.getloadavg()[0]],
        }
        for name, rs in runs.items():
            out[name] = {q: summary([r[f"{q}_ms"] for r in rs]) for q in ("p50", "p99", "p999", "max")} | {
                "achieved_rate": summary([r["achieved_rate"] for r in rs]),
                "api_cpu_us_per_request": summary([r["api_cpu_us_per_request"] for r in rs]),
                "broker_cpu_us_per_request": summary([r["broker_cpu_us_per_request"] for r in rs]),
                "non_2xx": sum(r["completed"] - r["ok"] for r in rs),
                "missing": sum(r["missing"] for r in rs),
            }
        p99_plain, p99_reserve = out["plain"]["p99"]["median"], out["reserve"]["p99"]["median"]
        out["p99_ratio"] = p99_reserve / p99_plain if p99_plain else None
        out["setup"] = {
            "reps": reps,
            "duration_s": duration,
            "warmup_s": warmup,
            "connections": 64,
            "request": "POST /v1/check {key_id, model[, reserve, request_id, estimated_cost_usd]}",
        }
        log(f"reserve latency @ {rate}/s: plain p99 {p99_plain:.2f} ms, reserve p99 {p99_reserve:.2f} ms")
        return out
    finally:
        stack.stop_child(api, 10)


# --------------------------------------------------------------------- through LiteLLM

LITELLM_CALL_USD = "0.00045"  # what the fake upstream's 1000 + 500 tokens of gpt-4o-mini cost
LITELLM_LIMIT_USD = "0.045"  # 100 calls
# The hook estimates prompt tokens (litellm's counter, ~13 here) + max_tokens of output: 747
# output tokens make the estimate the call's cost (within 0.1 %), like section 4b's "exact".
LITELLM_MAX_TOKENS = 747


async def litellm_trial(
    proxy_url: str, key: str, clients: int = 20, timeout_s: float = 120
) -> dict[str, Any]:
    """Section 4b's loop through the proxy: each client calls until its first non-200 (429)."""
    admitted = 0
    statuses: dict[str, int] = {}
    started = time.monotonic()
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say hi in one word."}],
        "max_tokens": LITELLM_MAX_TOKENS,
    }

    async def one(http: httpx.AsyncClient) -> None:
        nonlocal admitted
        while time.monotonic() - started < timeout_s:
            r = await http.post(
                proxy_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code != 200:
                return
            admitted += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        await asyncio.gather(*(one(http) for _ in range(clients)))
    took = time.monotonic() - started
    return {
        "admitted_calls": admitted,
        "over_calls": admitted - 100,
        "statuses": statuses,
        "duration_s": took,
        "rate_calls_per_s": admitted / took if took else None,
    }


async def run_litellm_overshoot(stack: Stack, workdir: Path, quick: bool) -> dict[str, Any]:
    """A real LiteLLM proxy with the spendgate callback (reserving in its pre-call hook) in front
    of the fake upstream; one spendgate API process and worker; $0.045/day on each trial key."""
    import hashlib
    import json

    from tests.litellm_helpers import LITELLM_BIN, FakeOpenAI, LiteLLMProxy, write_config

    from bench.stack import ADMIN_TOKEN

    if not LITELLM_BIN.exists():
        raise RuntimeError("no .venv-litellm: run `make litellm-venv` (make bench depends on it)")
    prefix = "llmh."
    await stack.topics(prefix)
    api_port = free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    worker = stack.service("worker", prefix, "llmh-worker.log")
    api = stack.service("api", prefix, "llmh-api.log", SPENDGATE_API_PORT=str(api_port))
    tag = uuid.uuid4().hex[:6]
    keys = {
        f"sk-over-{tag}-{i}": {"user_id": f"uo{i}", "team_id": "t-over"} for i in range(2 if quick else 3)
    }
    out: dict[str, Any] = {"limit_usd": LITELLM_LIMIT_USD, "call_usd": LITELLM_CALL_USD, "clients": 20}
    try:
        wait_http(api_url + "/readyz", api, 180)
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        async with httpx.AsyncClient(base_url=api_url, timeout=30, headers=admin) as http:
            token = (await http.post("/v1/tokens", json={"role": "gateway"})).json()["token"]
            for key in keys:
                scope = f"key:{hashlib.sha256(key.encode()).hexdigest()}"
                budget = {"limits": [{"window": "1d", "max_usd": LITELLM_LIMIT_USD}]}
                r = await http.put(f"/v1/budgets/{scope}", json=budget)
                r.raise_for_status()
        with FakeOpenAI() as upstream:
            config = write_config(workdir / "litellm" / "holds", upstream.base_url, callback=True)
            env = {
                "SPENDGATE_URL": api_url,
                "SPENDGATE_TOKEN": token,
                "SPENDGATE_FAIL_MODE": "open",
                # a check that times out fails open (admitted, no hold): on this shared box a 2 s
                # timeout was hit under load, so the figure would measure the box; counted below
                "SPENDGATE_CHECK_TIMEOUT_MS": "10000",
                "E2E_KEYS": json.dumps(keys),
            }
            proxy_log = workdir / "logs" / "litellm-holds.log"
            proxy = LiteLLMProxy(config, free_port(), proxy_log, env).start()

            def failed_open() -> int:
                return proxy_log.read_text(errors="replace").count("spendgate check failed")

            try:
                out["ready_s"] = await asyncio.to_thread(proxy.wait_ready, 300.0)
                trials = []
                for key in keys:
                    before = failed_open()
                    trials.append(await litellm_trial(proxy.url, key))
                    trials[-1]["checks_failed_open"] = failed_open() - before
                    log(f"overshoot through LiteLLM (reserving hook): {trials[-1]['over_calls']} calls over")
            finally:
                proxy.stop()
        async with httpx.AsyncClient(base_url=api_url, timeout=30, headers=admin) as http:
            await asyncio.sleep(3)  # the proxy's reporter flushed at its stop; let the worker count it
            for key, trial in zip(keys, trials, strict=True):
                view = (await http.get(f"/v1/spend/key:{hashlib.sha256(key.encode()).hexdigest()}")).json()
                total = next(w for w in view["windows"] if w["window"] == "total")
                trial["recorded_usd"] = total["spend_usd"]
                trial["reserved_usd_after"] = total["reserved_usd"]
        out["trials"] = trials
        out["over_calls"] = summary([t["over_calls"] for t in trials])
        out["rate_calls_per_s"] = summary([t["rate_calls_per_s"] for t in trials])
        return out
    finally:
        stack.stop_child(api, 10)
        stack.stop_child(worker, 10)
