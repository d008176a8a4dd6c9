"""3. Enforcement delay and 4. overshoot, against a live worker + API (prefix ``live.``)."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from typing import Any

import httpx

from bench import data
from bench.common import log, summary
from bench.stack import ADMIN_TOKEN, PYTHON, Stack, wait_http
from spendgate.adapters.embedded import free_port

KEYS, TEAMS, ORGS = 10_000, 100, 10
HEADERS = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
ONE_DOLLAR = [{"window": "1d", "max_usd": "1.00"}]


class Live:
    def __init__(self, stack: Stack, prefix: str = "live.") -> None:
        self.stack, self.prefix = stack, prefix
        self.port = 0
        self.api: subprocess.Popen | None = None
        self.worker: subprocess.Popen | None = None
        self.bg: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, trial_keys: list[str]) -> None:
        s = await self.stack.topics(self.prefix)
        config = data.registry_records(KEYS, TEAMS, ORGS)
        config += [data.budget_record(f"team:t{t}", data.TEAM_LIMITS) for t in range(TEAMS)]
        for k in trial_keys:
            config += [data.key_record(k, f"u-{k}", "tx"), data.budget_record(f"key:{k}", ONE_DOLLAR)]
        await data.produce(self.stack.bootstrap, s.topic("config"), config)
        self.worker = self.stack.service("worker", self.prefix, "live-worker.log")
        self.port = free_port()
        self.api = self.stack.service("api", self.prefix, "live-api.log", SPENDGATE_API_PORT=str(self.port))
        wait_http(f"{self.url}/readyz", self.api, 120)
        # the worker is up once an event's spend shows in the state the API serves
        async with httpx.AsyncClient(headers=HEADERS, timeout=10) as client:
            probe = f"k{KEYS - 1}"
            await post_events(client, self.url, [data.usage_event(probe, "0.000001")])
            await wait_spend(client, self.url, f"key:{probe}", lambda v: v > 0, 90)

    def background(self, rate: float) -> None:
        self.stop_background()
        topic = self.stack.settings(self.prefix).topic("usage")
        self.bg = self.stack.spawn([PYTHON, "-m", "bench.bgload", "--bootstrap", self.stack.bootstrap, "--topic", topic,
                                    "--rate", str(rate), "--keys", str(KEYS)], "bgload.log")

    def stop_background(self) -> None:
        if self.bg is not None:
            self.stack.stop_child(self.bg, 10)
            self.bg = None

    def stop(self) -> None:
        self.stop_background()
        for p in (self.api, self.worker):
            if p is not None:
                self.stack.stop_child(p, 10)


async def post_events(client: httpx.AsyncClient, url: str, events: list[dict[str, Any]]) -> None:
    r = await client.post(f"{url}/v1/events", json=events)
    if r.status_code != 202:
        raise RuntimeError(f"POST /v1/events: {r.status_code} {r.text[:300]}")


async def spend_1d(client: httpx.AsyncClient, url: str, scope: str) -> int:
    r = await client.get(f"{url}/v1/spend/{scope}")
    r.raise_for_status()
    body = r.json()
    for w in body["windows"]:
        if w["window"] == "1d":
            return data.nanos_of(w["spend_usd"])
    for w in body["windows"]:
        if w["window"] == "total":
            return data.nanos_of(w["spend_usd"])
    return 0


async def wait_spend(client: httpx.AsyncClient, url: str, scope: str, ok: Any, timeout_s: float) -> float:
    started = time.monotonic()
    while True:
        if ok(await spend_1d(client, url, scope)):
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{scope}: spend condition not met in {timeout_s}s")
        await asyncio.sleep(0.02)


async def check(
    client: httpx.AsyncClient, url: str, key: str, estimate: str | None = None, request_id: str | None = None
) -> bool:
    """One check; with ``request_id`` a reserving one (holds ``estimate`` when allowed)."""
    body: dict[str, Any] = {"key_id": key}
    if estimate is not None:
        body["estimated_cost_usd"] = estimate
    if request_id is not None:
        body.update(reserve=True, request_id=request_id)
    r = await client.post(f"{url}/v1/check", json=body)
    r.raise_for_status()
    answer = r.json()
    if answer.get("degraded"):
        raise RuntimeError(f"degraded answer: {answer}")
    return bool(answer["allowed"])


async def enforcement_trial(client: httpx.AsyncClient, url: str, key: str, timeout_s: float = 30) -> dict[str, Any]:
    await post_events(client, url, [data.usage_event(key, "0.99", model=None)])
    settle = await wait_spend(client, url, f"key:{key}", lambda v: v >= 990_000_000, timeout_s)
    assert await check(client, url, key), "allowed before the crossing event"
    await post_events(client, url, [data.usage_event(key, "0.02", model=None)])
    acked = time.monotonic()
    checks = 0
    while True:
        checks += 1
        if not await check(client, url, key):
            return {"delay_ms": (time.monotonic() - acked) * 1000, "checks": checks, "first_settle_s": settle}
        if time.monotonic() - acked > timeout_s:
            return {"delay_ms": None, "checks": checks, "first_settle_s": settle, "timeout": True}


async def run_enforcement_overload(live: Live, keys: list[str], background_rate: float) -> dict[str, Any]:
    return await run_enforcement(live, keys, background_rate, timeout_s=15)


async def run_enforcement(live: Live, keys: list[str], background_rate: float, timeout_s: float = 30) -> dict[str, Any]:
    live.background(background_rate)
    await asyncio.sleep(2.0)
    trials = []
    try:
        async with httpx.AsyncClient(headers=HEADERS, timeout=10) as client:
            for k in keys:
                try:
                    t = await enforcement_trial(client, live.url, k, timeout_s)
                except TimeoutError as exc:
                    t = {"delay_ms": None, "timeout": True, "error": str(exc)}
                trials.append(t)
    finally:
        live.stop_background()
    delays = sorted(t["delay_ms"] for t in trials if t["delay_ms"] is not None)
    out = {"background_rate": background_rate, "trials": trials, "n": len(delays),
           "timeouts": sum(1 for t in trials if t.get("timeout"))}
    if delays:
        out["p50_ms"] = delays[len(delays) // 2]
        out["p99_ms"] = delays[min(len(delays) - 1, int(round(0.99 * (len(delays) - 1))))]
        out["max_ms"] = delays[-1]
        out["min_ms"] = delays[0]
    log(f"enforcement @ {background_rate:.0f} ev/s: p50 {out.get('p50_ms')} ms, p99 {out.get('p99_ms')} ms over {len(delays)} trials")
    return out


async def overshoot_trial(url: str, key: str, with_estimate: bool, clients: int = 20, timeout_s: float = 60) -> dict[str, Any]:
    admitted = 0
    errors = 0
    started = time.monotonic()

    async def one(client: httpx.AsyncClient) -> None:
        nonlocal admitted, errors
        while time.monotonic() - started < timeout_s:
            if not await check(client, url, key, "0.01" if with_estimate else None):
                return
            try:
                await post_events(client, url, [data.usage_event(key, "0.01", model=None)])
                admitted += 1
            except RuntimeError:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(headers=HEADERS, timeout=10, limits=limits) as client:
        await asyncio.gather(*(one(client) for _ in range(clients)))
        took = time.monotonic() - started
        await asyncio.sleep(1.5)
        recorded = await spend_1d(client, url, f"key:{key}")
    return {"admitted_calls": admitted, "admitted_usd": admitted / 100, "over_calls": admitted - 100,
            "over_usd": round(admitted / 100 - 1.0, 2), "recorded_usd": recorded / 1e9, "errors": errors,
            "duration_s": took}


async def run_overshoot(live: Live, keys: dict[bool, list[str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for with_estimate, ks in keys.items():
        trials = []
        for k in ks:
            trials.append(await overshoot_trial(live.url, k, with_estimate))
            await asyncio.sleep(0.5)
        name = "with_estimate" if with_estimate else "without_estimate"
        out[name] = {"trials": trials, "over_calls": summary([t["over_calls"] for t in trials]),
                     "over_usd": summary([t["over_usd"] for t in trials])}
        log(f"overshoot {name}: {[t['over_calls'] for t in trials]} calls over")
    return out


def trial_keys(n_enforce: int, n_over: int) -> tuple[list[str], dict[bool, list[str]]]:
    tag = uuid.uuid4().hex[:6]
    enforce = [f"ke{tag}{i}" for i in range(n_enforce)]
    over = {False: [f"ko{tag}n{i}" for i in range(n_over)], True: [f"ko{tag}e{i}" for i in range(n_over)]}
    return enforce, over
