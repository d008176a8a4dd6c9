"""Run by bench/gateway.py with LiteLLM's venv: the spendgate pre-call hook alone, N sequential calls.

Prints one JSON line: p50/p99/mean (ms) of ``async_pre_call_hook`` (token count, estimate from
litellm's cost map, ``POST /v1/check`` to SPENDGATE_URL), and the same for the token-count +
estimate step by itself. Needs SPENDGATE_URL and SPENDGATE_TOKEN.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

from litellm.proxy._types import UserAPIKeyAuth

from spendgate.integrations.litellm import SpendgateLiteLLM


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": statistics.median(ordered),
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "mean_ms": statistics.fmean(ordered),
    }


def _request(i: int) -> dict[str, object]:
    return {
        "model": "gpt-4o-mini",
        "user": f"bench-user-{i % 100}",
        "messages": [{"role": "user", "content": "Say hi in one word."}],
        "max_tokens": 16,
        "metadata": {"tags": ["bench-tag"]},
    }


async def main(n: int) -> None:
    handler = SpendgateLiteLLM()
    auth = UserAPIKeyAuth(
        api_key="sk-bench-1", user_id="u1", team_id="t1", org_id="o1", metadata={"tags": ["t"]}
    )
    for i in range(20):  # warm-up: connection pool, tokenizer, cost-map lookups
        await handler.async_pre_call_hook(auth, None, _request(i), "acompletion")
    hook, estimate = [], []
    for i in range(n):
        data = _request(i)
        started = time.perf_counter()
        handler.estimate(data, "gpt-4o-mini")
        estimate.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        await handler.async_pre_call_hook(auth, None, data, "acompletion")
        hook.append((time.perf_counter() - started) * 1000)
    stats = handler.client.stats
    print(json.dumps({"n": n, **_stats(hook), "estimate": _stats(estimate),
                      "denied": stats.denied, "fail_open": stats.fail_open}))
    await handler.client.aclose()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 500))
