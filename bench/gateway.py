"""``--only litellm``: what the spendgate callback adds to a real LiteLLM proxy, and the client's event rate.

Two LiteLLM 1.109.1 proxies (``.venv-litellm``), identical but for
``callbacks: spendgate.integrations.litellm.proxy_handler``, in front of the same fake OpenAI
upstream on 127.0.0.1 (tests/litellm_helpers.py), with the spendgate worker + API of the bench
stack behind the callback. Both run at the same time and are driven in alternation, one run each
per repetition, at a fixed open-loop rate, so background load hits both alike. Latency is the
client's: send to full response, over plain HTTP/1.1 keep-alive connections.

The client's throughput: ``UsageReporter.report()`` of N events (its cost per call) and the time
until the API acknowledged them all (batches of 1000, ``POST /v1/events``, acks=all).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from tests.litellm_helpers import LITELLM_BIN, FakeOpenAI, LiteLLMProxy, write_config

from bench.common import log, summary
from bench.stack import ADMIN_TOKEN, Stack, wait_http
from spendgate.adapters.embedded import free_port
from spendgate.client import SpendgateClient, usage_event

KEYS = {"sk-bench-1": {"user_id": "u1", "team_id": "t1", "org_id": "o1", "tags": ["bench"]}}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def drive(urls: dict[str, str], rate: float, duration_s: float, warmup_s: float) -> dict[str, Any]:
    """Open loop over both proxies, interleaved: request i goes at start + i/rate to proxy i mod 2.

    Interleaving makes both see the same background load (this is a shared 2-core box); each
    gets ``rate / 2`` requests/s. Returns, per proxy, the latencies (ms) past the warm-up.
    """
    headers = {"Authorization": "Bearer sk-bench-1"}
    names = list(urls)
    latencies: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, dict[str, int]] = {n: {} for n in names}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:

        async def one(i: int, measured: bool) -> None:
            name = names[i % len(names)]
            body = {
                "model": "gpt-4o-mini",
                "user": f"bench-user-{i % 100}",
                "messages": [{"role": "user", "content": "Say hi in one word."}],
                "max_tokens": 16,
                "metadata": {"tags": ["bench-tag"]},
            }
            started = time.perf_counter()
            try:
                response = await http.post(urls[name] + "/v1/chat/completions", json=body, headers=headers)
            except httpx.HTTPError as exc:
                errors[name][type(exc).__name__] = errors[name].get(type(exc).__name__, 0) + 1
                return
            took = (time.perf_counter() - started) * 1000
            if response.status_code != 200:
                errors[name][str(response.status_code)] = errors[name].get(str(response.status_code), 0) + 1
            elif measured:
                latencies[name].append(took)

        total = int(rate * (warmup_s + duration_s))
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, i >= rate * warmup_s)))
        await asyncio.gather(*tasks)
    return {
        name: {
            "n": len(ls),
            "p50_ms": statistics.median(ls) if ls else None,
            "p99_ms": _pct(ls, 0.99) if ls else None,
            "errors": errors[name],
        }
        for name, ls in latencies.items()
    }


def hook_latency(api_url: str, token: str, n: int) -> dict[str, Any]:
    """The pre-call hook alone, in LiteLLM's venv: token count + estimate + ``POST /v1/check``, sequential."""
    env = {
        **os.environ,
        "SPENDGATE_URL": api_url,
        "SPENDGATE_TOKEN": token,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_OFFLINE_MODE": "true",
    }
    script = Path(__file__).with_name("litellm_hook.py")
    proc = subprocess.run(
        [str(LITELLM_BIN.parent / "python"), str(script), str(n)],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"litellm_hook.py failed: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def client_throughput(url: str, token: str, n: int) -> dict[str, Any]:
    events = [
        usage_event(key_id=f"bench-key-{i % 500}", cost_usd="0.000123", model="gpt-4o-mini", tags=["tp"])
        for i in range(n)
    ]
    with SpendgateClient(url, token, timeout_s=30) as client:
        reporter = client.reporter(max_buffer=n + 1000)
        started = time.perf_counter()
        for event in events:
            reporter.report(event)
        queued = time.perf_counter() - started
        done = reporter.flush(300)
        took = time.perf_counter() - started
        reporter.close()
    return {
        "events": n,
        "report_us_per_call": queued / n * 1e6,
        "acknowledged": reporter.stats.sent,
        "flushed": done,
        "seconds": took,
        "events_per_s": reporter.stats.sent / took,
        "retries": reporter.stats.retries,
    }


async def run_litellm_bench(stack: Stack, workdir: Path, quick: bool) -> dict[str, Any]:
    if not LITELLM_BIN.exists():
        raise RuntimeError("no .venv-litellm: run `make litellm-venv` (make bench depends on it)")
    prefix = "llm."
    await stack.topics(prefix)
    api_port = free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    stack.service("worker", prefix, "llm-worker.log")
    api = stack.service("api", prefix, "llm-api.log", SPENDGATE_API_PORT=str(api_port))
    wait_http(api_url + "/readyz", api, 180)
    async with httpx.AsyncClient(timeout=30) as http:
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        minted = await http.post(api_url + "/v1/tokens", json={"role": "gateway"}, headers=admin)
    token = minted.json()["token"]
    rate, duration, warmup, reps = (4.0, 10.0, 3.0, 2) if quick else (4.0, 20.0, 5.0, 3)
    out: dict[str, Any] = {"rate_per_s": rate, "duration_s": duration, "warmup_s": warmup, "reps": reps}
    out["load_avg_start"] = os.getloadavg()
    with FakeOpenAI() as upstream:
        proxies: dict[str, LiteLLMProxy] = {}
        for variant in ("without", "with"):
            with_callback = variant == "with"
            config = write_config(workdir / "litellm" / variant, upstream.base_url, callback=with_callback)
            env = {
                "SPENDGATE_URL": api_url,
                "SPENDGATE_TOKEN": token,
                "SPENDGATE_FAIL_MODE": "open",
                "E2E_KEYS": json.dumps(KEYS),
            }
            log_path = workdir / "logs" / f"litellm-{variant}.log"
            proxies[variant] = LiteLLMProxy(config, free_port(), log_path, env)
            proxies[variant].start()
        try:
            for variant, proxy in proxies.items():
                out[f"ready_s_{variant}"] = await asyncio.to_thread(proxy.wait_ready, 300.0)
                log(f"litellm ({variant} callback) ready in {out[f'ready_s_{variant}']:.1f} s")
            runs: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
            urls = {variant: proxy.url for variant, proxy in proxies.items()}
            for _ in range(reps):
                result = await drive(urls, rate, duration, warmup)
                for variant, r in result.items():
                    runs[variant].append(r)
                    log(f"litellm {variant} callback: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                        f"errors {r['errors']}")
            for variant, rs in runs.items():
                out[variant] = {
                    "p50_ms": summary([r["p50_ms"] for r in rs]),
                    "p99_ms": summary([r["p99_ms"] for r in rs]),
                    "runs": rs,
                }
            out["added_p50_ms"] = out["with"]["p50_ms"]["median"] - out["without"]["p50_ms"]["median"]
            out["added_p99_ms"] = out["with"]["p99_ms"]["median"] - out["without"]["p99_ms"]["median"]
        finally:
            for proxy in proxies.values():
                proxy.stop()
    out["hook"] = await asyncio.to_thread(hook_latency, api_url, token, 200 if quick else 500)
    log(f"pre-call hook alone: p50 {out['hook']['p50_ms']:.2f} ms, p99 {out['hook']['p99_ms']:.2f} ms")
    n = 20_000 if quick else 50_000
    out["client"] = await asyncio.to_thread(client_throughput, api_url, token, n)
    log(f"client: {out['client']['events_per_s']:.0f} events/s acknowledged")
    out["load_avg_end"] = os.getloadavg()
    return out
