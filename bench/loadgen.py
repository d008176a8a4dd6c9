"""Open-loop HTTP/1.1 load generator (run in its own process): fixed request rate, keep-alive.

``python -m bench.loadgen --port P --path /v1/check --bodies FILE --rate R --duration S [--warmup W]``

Requests are scheduled at ``start + i / rate`` whatever the server does (open loop); a request
whose connection is busy waits in a backlog, and its latency is measured from its *scheduled*
time, so queueing is counted (no coordinated omission). Prints one JSON line of results.
Callback-based (asyncio.Protocol on uvloop) so the generator itself stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import deque


class Conn(asyncio.Protocol):
    def __init__(self, gen: Gen) -> None:
        self.gen = gen
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.intended = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, intended: float) -> None:
        self.intended = intended
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end]).lower()
            at = head.find(b"content-length:")
            length = 0
            if at >= 0:
                stop = head.find(b"\r\n", at)
                length = int(head[at + 15 : stop if stop >= 0 else len(head)])
            total = end + 4 + length
            if len(buf) < total:
                return
            status = int(head[9:12])
            del buf[:total]
            self.gen.done(self, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.lost += 1


class Gen:
    def __init__(self, loop: asyncio.AbstractEventLoop, requests: list[bytes]) -> None:
        self.loop = loop
        self.requests = requests
        self.idle: deque[Conn] = deque()
        self.backlog: deque[tuple[bytes, float]] = deque()
        self.latencies: list[tuple[float, float]] = []  # (intended, latency)
        self.statuses: dict[int, int] = {}
        self.completed = 0
        self.lost = 0
        self.all_done: asyncio.Future[None] | None = None
        self.expected = 0

    def done(self, conn: Conn, status: int) -> None:
        now = time.perf_counter()
        self.latencies.append((conn.intended, now - conn.intended))
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.completed += 1
        if self.backlog:
            request, intended = self.backlog.popleft()
            conn.send(request, intended)
        else:
            self.idle.append(conn)
        if self.completed >= self.expected and self.all_done is not None and not self.all_done.done():
            self.all_done.set_result(None)

    def submit(self, request: bytes, intended: float) -> None:
        if self.idle:
            self.idle.pop().send(request, intended)
        else:
            self.backlog.append((request, intended))


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))
    return sorted_values[i]


async def run(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    bodies = [line.rstrip(b"\n") for line in open(args.bodies, "rb") if line.strip()] if args.bodies else [b""]
    headers = f"Host: 127.0.0.1:{args.port}\r\nConnection: keep-alive\r\n"
    if args.token:
        headers += f"Authorization: Bearer {args.token}\r\n"
    requests = []
    for body in bodies:
        if args.method == "GET":
            requests.append(f"GET {args.path} HTTP/1.1\r\n{headers}\r\n".encode())
        else:
            requests.append(
                f"POST {args.path} HTTP/1.1\r\n{headers}Content-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
    gen = Gen(loop, requests)
    for _ in range(args.connections):
        _, conn = await loop.create_connection(lambda: Conn(gen), "127.0.0.1", args.port)
        gen.idle.append(conn)
    rate, total = args.rate, int(args.rate * (args.duration + args.warmup))
    gen.expected = total
    gen.all_done = loop.create_future()
    start = time.perf_counter() + 0.02
    i = 0
    nreq = len(requests)
    while i < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        # latency counts from when the dispatcher hands the request over (a busy connection
        # makes it wait in the backlog, and that wait counts); the dispatcher's own timer
        # granularity (uvloop timers are 1 ms) is reported as schedule_lag_s, not as latency
        now = time.perf_counter()
        while i < due:
            gen.submit(requests[i % nreq], now)
            i += 1
        delay = start + i / rate - time.perf_counter()
        await asyncio.sleep(delay if delay > 0 else 0)
    sent_end = time.perf_counter()
    try:
        await asyncio.wait_for(gen.all_done, timeout=args.drain)
    except TimeoutError:
        pass
    end = time.perf_counter()
    measured = sorted(lat for intended, lat in gen.latencies if intended >= start + args.warmup)
    n_measured_expected = total - int(rate * args.warmup)
    first = min((t + lat for t, lat in gen.latencies), default=start)
    ok = sum(v for k, v in gen.statuses.items() if 200 <= k < 300)
    return {
        "rate": rate,
        "duration_s": args.duration,
        "sent": total,
        "completed": gen.completed,
        "measured": len(measured),
        "missing": total - gen.completed,
        "statuses": {str(k): v for k, v in gen.statuses.items()},
        "ok": ok,
        "achieved_rate": gen.completed / max(1e-9, max((t + lat for t, lat in gen.latencies), default=end) - start),
        "schedule_lag_s": sent_end - (start + total / rate),
        "first_s": first - start,
        "p50_ms": pct(measured, 0.50) * 1000,
        "p90_ms": pct(measured, 0.90) * 1000,
        "p99_ms": pct(measured, 0.99) * 1000,
        "p999_ms": pct(measured, 0.999) * 1000,
        "max_ms": (measured[-1] if measured else float("nan")) * 1000,
        "lost_connections": gen.lost,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/check")
    parser.add_argument("--method", default="POST")
    parser.add_argument("--bodies", default="")
    parser.add_argument("--token", default="")
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--drain", type=float, default=10.0)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
