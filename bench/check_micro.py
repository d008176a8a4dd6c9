"""Micro-benchmark of the gate's pure check: 100,000 scopes in memory, a 10-scope request.

Run: ``.venv/bin/python bench/check_micro.py [--scopes N] [--number N]``. Prints microseconds per
``check()`` for an allowed request and for a blocked one, and the time to apply the records.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import gc
import time
import timeit
import tracemalloc
from datetime import UTC, datetime

from spendgate.domain.check import CheckRequest, check
from spendgate.domain.gate_state import GateState
from spendgate.domain.windows import iso

NOW = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC).timestamp()
DAY_START = int(datetime(2026, 11, 23, tzinfo=UTC).timestamp())
DAY_END = DAY_START + 86400


def build(scopes: int) -> GateState:
    """``scopes`` scopes over keys/users/teams/members/end users/models/tags, each budgeted."""
    gs = GateState()
    teams = max(1, scopes // 100)
    per_kind = scopes // 10
    version = 0
    names: list[str] = []
    for i in range(per_kind):
        team = f"t{i % teams}"
        version += 1
        gs.apply_config(
            f"key/k{i}",
            {
                "v": 1,
                "type": "key",
                "version": version,
                "key_id": f"k{i}",
                "user_id": f"u{i}",
                "team_id": team,
            },
        )
        names += [
            f"key:k{i}",
            f"user:u{i}",
            f"member:{team}/u{i}",
            f"end_user:e{i}",
            f"model:m{i}",
            f"key_model:k{i}/m{i}",
            f"tag:a{i}",
            f"tag:b{i}",
            f"tag:c{i}",
            f"org:o{i}",
        ]
    for i in range(teams):
        names.append(f"team:t{i}")
    day = {"start": iso(DAY_START), "resets_at": iso(DAY_END)}
    for n, scope in enumerate(names):
        version += 1
        gs.apply_config(
            f"budget/{scope}",
            {
                "v": 1,
                "type": "budget",
                "version": version,
                "scope": scope,
                "limits": [{"window": "1d", "max_usd": "100"}, {"window": "total", "max_usd": "100000"}],
                "tz": "UTC",
            },
        )
        gs.apply_state(
            {
                "v": 1,
                "scope": scope,
                "as_of": iso(int(NOW)),
                "windows": [
                    {"window": "1d", **day, "spend_usd": f"{n % 90}.123456"},
                    {"window": "total", "start": None, "resets_at": None, "spend_usd": f"{n % 900}.5"},
                ],
            }
        )
        gs.apply_decision(
            {"v": 1, "scope": scope, "blocked": False, "seq": n + 1, "as_of": iso(int(NOW)), "windows": []}
        )
    return gs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scopes", type=int, default=100_000)
    parser.add_argument("--number", type=int, default=100_000)
    parser.add_argument("--memory", action="store_true", help="trace memory while building (slow)")
    args = parser.parse_args()

    gc.collect()
    if args.memory:
        tracemalloc.start()
    started = time.perf_counter()
    gs = build(args.scopes)
    build_s = time.perf_counter() - started
    total = len(gs.states)
    print(
        f"built {total:,} scopes (budget + state + decision each) in {build_s:.2f}s "
        f"({build_s / (3 * total) * 1e6:.1f} us per record applied)"
    )
    if args.memory:
        current, _peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"memory held: {current / 2**20:.0f} MiB ({current / total:.0f} bytes per scope)")

    i = 7
    allowed = CheckRequest(
        f"k{i}",
        end_user_id=f"e{i}",
        model=f"m{i}",
        tags=[f"a{i}", f"b{i}", f"c{i}"],
        org_id=f"o{i}",
        estimated_cost_nanos=1_000_000,
    )
    scope_count = 0
    from spendgate.domain.attribution import scopes_for

    scope_count = len(scopes_for(allowed, gs.registry))
    assert check(allowed, gs, NOW).allowed, check(allowed, gs, NOW)
    gs.apply_decision(
        {
            "v": 1,
            "scope": f"tag:c{i}",
            "blocked": True,
            "seq": 10**9,
            "as_of": iso(int(NOW)),
            "windows": [
                {"window": "1d", "spend_usd": "100.5", "limit_usd": "100", "resets_at": iso(DAY_END)}
            ],
        }
    )
    blocked = CheckRequest(
        f"k{i}", end_user_id=f"e{i}", model=f"m{i}", tags=[f"a{i}", f"b{i}", f"c{i}"], org_id=f"o{i}"
    )
    assert not check(blocked, gs, NOW).allowed

    for label, request in (("allowed", allowed), ("blocked", blocked)):
        timer = timeit.Timer(lambda r=request: check(r, gs, NOW))
        best = min(timer.repeat(repeat=5, number=args.number)) / args.number
        print(
            f"check() {label:7s} {scope_count}-scope request: {best * 1e6:.2f} us per check "
            f"(best of 5 x {args.number:,})"
        )


if __name__ == "__main__":
    main()
