"""Small shared helpers: summaries of repeated runs, logging, subprocess JSON."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from typing import Any

T0 = time.monotonic()


def log(message: str) -> None:
    sys.stderr.write(f"[bench {time.monotonic() - T0:7.1f}s] {message}\n")
    sys.stderr.flush()


def summary(values: list[float]) -> dict[str, Any]:
    """Median, min and max of several runs (NaNs dropped)."""
    clean = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not clean:
        return {"median": None, "min": None, "max": None, "n": 0, "runs": values}
    return {"median": statistics.median(clean), "min": min(clean), "max": max(clean), "n": len(clean), "runs": values}


def ratio(a: dict[str, Any] | float | None, b: dict[str, Any] | float | None) -> float | None:
    av = a["median"] if isinstance(a, dict) else a
    bv = b["median"] if isinstance(b, dict) else b
    if av is None or bv is None or bv == 0:
        return None
    return av / bv


def run_json(argv: list[str], timeout: float, cpu: int | None = None) -> dict[str, Any]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if cpu is not None:
        pin(proc.pid, cpu)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return json.loads(out.decode().strip().splitlines()[-1])


def pin(pid: int, cpu: int) -> None:
    import os

    try:
        if len(os.sched_getaffinity(0)) > cpu:
            os.sched_setaffinity(pid, {cpu})
    except OSError:
        pass


def fmt(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}"
