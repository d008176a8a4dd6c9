"""``--only dashboard``: latency of the dashboard's endpoints (issue 17) with 100,000 budgeted scopes.

A `spendgate api` child follows topics holding the gate data set (100,000 budgeted keys and
1,000 budgeted teams, each with spend: ``bench.data``). Sequential requests on one keep-alive
connection, each endpoint ``n`` times after 3 warm-up calls:

- ``GET /v1/spend/overview`` cold (the first call sorts every budgeted scope), then warm pages
  at offsets 0 and 50,000, and filtered (``q=``), as the page asks every 3 s;
- ``GET /v1/spend/top?kind=key&window=1d&limit=25`` (every key's history summed and ranked);
- ``GET /v1/spend/{scope}/series`` hourly (48 points) and daily (90 points);
- ``POST /v1/check`` latency alone, then while a client polls the overview and top every
  second (what a dashboard left open costs the gate).
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import log
from bench.gate import load_gate_topics
from bench.stack import ADMIN_TOKEN, Stack, rss_mib, wait_http
from spendgate.adapters.embedded import free_port

PREFIX = "dash."
ROOT = Path(__file__).resolve().parent.parent


def _ms(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def _time(client: httpx.Client, method: str, path: str, n: int, body: Any = None) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        resp = client.request(method, path, json=body)
        out.append(time.perf_counter() - started)
        assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
    return out


async def run_dashboard_bench(stack: Stack, quick: bool) -> dict[str, Any]:
    keys, teams = (20_000, 200) if quick else (100_000, 1_000)
    data = await load_gate_topics(stack, PREFIX, keys, teams, 10)
    port = free_port()
    api = stack.service("api", PREFIX, "dash-api.log", SPENDGATE_API_PORT=str(port))
    try:
        ready_s = wait_http(f"http://127.0.0.1:{port}/readyz", api, 300)
        log(f"dashboard API ready in {ready_s:.1f}s (rss {rss_mib(api.pid):.0f} MiB)")
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        n = 30 if quick else 100
        out: dict[str, Any] = {"budgeted_scopes": data["budgeted_scopes"], "api_ready_s": ready_s, "n": n}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as client:
            started = time.perf_counter()
            first = client.get("/v1/spend/overview?limit=50")  # noqa: ASYNC212 - measured alone, sequentially
            out["overview_cold_ms"] = round((time.perf_counter() - started) * 1000, 1)
            assert first.status_code == 200 and first.json()["total"] == data["budgeted_scopes"], first.text[
                :300
            ]
            paths = {
                "overview, first page": "/v1/spend/overview?limit=50",
                "overview, offset 50,000": "/v1/spend/overview?offset=50000&limit=50",
                "overview, filtered (q=k9999)": "/v1/spend/overview?q=k9999&limit=50",
                "top keys, 1d": "/v1/spend/top?kind=key&window=1d&limit=25",
                "top teams, total": "/v1/spend/top?kind=team&window=total&limit=25",
                "series key 1h (48 points)": "/v1/spend/key:k42/series?bucket=1h",
                "series team 1d (90 points)": "/v1/spend/team:t7/series?bucket=1d",
            }
            rows: dict[str, Any] = {}
            for name, path in paths.items():
                _time(client, "GET", path, 3)
                rows[name] = _ms(_time(client, "GET", path, n))
                log(f"dashboard: {name}: {rows[name]}")
            out["endpoints"] = rows
            check = {"key_id": "k42", "model": "m1"}
            _time(client, "POST", "/v1/check", 50, check)
            out["check_alone"] = _ms(_time(client, "POST", "/v1/check", 2000, check))
            stop = threading.Event()

            def poll() -> None:  # a dashboard left open: overview + top every second
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as c:
                    while not stop.is_set():
                        c.get("/v1/spend/overview?limit=50")
                        c.get("/v1/spend/top?kind=key&window=1d&limit=25")
                        stop.wait(1.0)

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            try:
                out["check_with_dashboard"] = _ms(_time(client, "POST", "/v1/check", 2000, check))
            finally:
                stop.set()
                poller.join(30)
            alone, busy = out["check_alone"], out["check_with_dashboard"]
            log(f"dashboard: check alone {alone}, with a dashboard open {busy}")
        out["api_rss_mib"] = round(rss_mib(api.pid))
        return out
    finally:
        stack.stop_child(api, 10)


def section(res: dict[str, Any]) -> list[str]:
    """The BENCHMARKS.md section (called by bench.report)."""
    d = res.get("dashboard")
    if not d:
        return []
    lines = [
        "## Dashboard endpoints (issue 17)",
        "",
        f"`python -m bench --only dashboard`: a `spendgate api` following {d['budgeted_scopes']:,} budgeted "
        f"scopes with spend; sequential requests on one connection, {d['n']} each after 3 warm-up calls "
        f"(bench/dashboard.py). API ready in {d['api_ready_s']:.1f} s, RSS {d['api_rss_mib']} MiB. The first "
        "overview (sorting every budgeted scope, in slices on the event loop) took "
        f"{d['overview_cold_ms']} ms; "
        "later ones answer from the last sort while the next is computed (its order at most 5 s old, the "
        "page's rows current); top lists likewise.",
        "",
        "| request | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|",
    ]
    for name, r in d["endpoints"].items():
        lines.append(f"| `{name}` | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} |")
    for label, key in (
        ("`POST /v1/check` alone", "check_alone"),
        ("`POST /v1/check` while a dashboard polls overview + top every second", "check_with_dashboard"),
    ):
        r = d[key]
        lines.append(f"| {label} | {r['p50_ms']} | {r['p99_ms']} | {r['max_ms']} |")
    lines.append("")
    browser = ROOT / "docs" / "dashboard-100k-timings.json"
    if browser.exists():
        b = json.loads(browser.read_text())
        lines.append(
            "In the browser (`tests/e2e/test_dashboard_browser.py`, headless Chromium, 100,000 budgeted "
            f"scopes in one API; {b['measured_at']}, load average {b['load_avg'][0]:.1f} on 2 cores; "
            f"the test fails above {b['bound_s']:g} s):\n"
        )
        lines += ["| step | seconds |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in b["seconds"].items()]
        lines.append("")
    return lines
