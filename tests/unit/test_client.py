"""spendgate.client against a tiny real HTTP server on 127.0.0.1 (no mocks of httpx).

The server plays the gate: it records every request and answers what the test scripted
(an answer, a 5xx, a per-index rejection, a hang), so buffering, batching, retry, fail policy
and close() are exercised over real sockets.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from spendgate.adapters.embedded import free_port
from spendgate.client import (
    AsyncSpendgateClient,
    ClientSettings,
    FailMode,
    SpendgateClient,
    exact_usd,
    send_spill_file,
    usage_event,
)

Answer = tuple[int, Any]
LOADED = 2.0
"""Check timeout (s) for tests about answers, not timeouts: 50 ms is too short on a busy CI box."""


class Gate:
    """Records requests; ``respond(path, body) -> (status, json)`` decides the answer."""

    def __init__(self, respond: Callable[[str, Any], Answer]) -> None:
        self.respond = respond
        self.requests: list[tuple[str, Any]] = []
        self.lock = threading.Lock()
        gate = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _answer(self, body: Any) -> None:
                with gate.lock:
                    gate.requests.append((self.path, body))
                status, out = gate.respond(self.path, body)
                raw = json.dumps(out).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def do_POST(self) -> None:  # noqa: N802
                self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

            def do_GET(self) -> None:  # noqa: N802
                self._answer(None)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return [e for path, body in self.requests if path == "/v1/events" for e in body]

    def batches(self) -> list[int]:
        with self.lock:
            return [len(body) for path, body in self.requests if path == "/v1/events"]


@pytest.fixture
def gate_factory() -> Iterator[Callable[[Callable[[str, Any], Answer]], Gate]]:
    started: list[Gate] = []

    def make(respond: Callable[[str, Any], Answer]) -> Gate:
        started.append(Gate(respond))
        return started[-1]

    yield make
    for g in started:
        g.server.shutdown()
        g.server.server_close()


def accept_all(path: str, body: Any) -> Answer:
    if path == "/v1/events":
        return 202, {"accepted": len(body), "rejected": 0, "results": []}
    return 200, {
        "allowed": True,
        "blocked_by": [],
        "retry_after_s": None,
        "degraded": False,
        "state_lag_ms": 1,
    }


def events(n: int, prefix: str = "e") -> list[dict[str, Any]]:
    return [usage_event(event_id=f"{prefix}{i}", key_id="k1", cost_usd="0.001") for i in range(n)]


# -- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (0.00045, "0.00045"),
        (1.5e-07, "0.00000015"),
        (0.1 + 0.2, "0.3"),
        ("12.50", "12.5"),
        (3, "3"),
        (Decimal("0.0000000015"), "0.000000002"),
        (1e-10, "0"),
    ],
)
def test_exact_usd_keeps_the_float_a_gateway_meant(given: Any, expected: str) -> None:
    assert exact_usd(given) == expected


@pytest.mark.parametrize("bad", [-0.01, float("nan"), float("inf"), "abc", True])
def test_exact_usd_refuses_what_is_not_a_cost(bad: Any) -> None:
    with pytest.raises(ValueError):
        exact_usd(bad)


def test_settings_come_from_arguments_then_the_environment() -> None:
    env = {"SPENDGATE_URL": "http://gate:8080/", "SPENDGATE_TOKEN": "t", "SPENDGATE_FAIL_MODE": "CLOSED"}
    s = ClientSettings.from_env(env=env)
    assert (s.url, s.token, s.fail_mode, s.check_timeout_s) == (
        "http://gate:8080",
        "t",
        FailMode.CLOSED,
        0.05,
    )
    s = ClientSettings.from_env("http://other", "u", "open", env=env)
    assert (s.url, s.token, s.fail_mode) == ("http://other", "u", FailMode.OPEN)
    with pytest.raises(ValueError, match="SPENDGATE_URL"):
        ClientSettings.from_env(env={})
    with pytest.raises(ValueError, match="SPENDGATE_FAIL_MODE"):
        ClientSettings.from_env(env={**env, "SPENDGATE_FAIL_MODE": "maybe"})


def test_the_client_imports_neither_litellm_nor_the_server_stack() -> None:
    code = (
        "import sys, spendgate.client, spendgate.client.reporter\n"
        "heavy = {'litellm', 'faust', 'aiokafka', 'psycopg', 'pydantic', 'fastapi'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"


# -- check / authorize / spend -------------------------------------------------------------------


def test_check_sends_the_contract_body_and_reads_the_typed_answer(gate_factory: Any) -> None:
    def deny(path: str, body: Any) -> Answer:
        blocked = {
            "scope": "team:t1",
            "window": "1d",
            "spend_usd": "100.03",
            "limit_usd": "100",
            "resets_at": "2026-12-02T00:00:00Z",
        }
        return 200, {
            "allowed": False,
            "blocked_by": [blocked],
            "retry_after_s": 42,
            "degraded": False,
            "state_lag_ms": 7,
        }

    gate = gate_factory(deny)
    with SpendgateClient(gate.url, "tok", check_timeout_s=LOADED) as client:
        result = client.check("k1", team_id="t1", tags=["b", "a", "b"], estimated_cost_usd=0.00015)
    assert gate.requests == [
        ("/v1/check", {"key_id": "k1", "team_id": "t1", "tags": ["a", "b"], "estimated_cost_usd": "0.00015"})
    ]
    assert not result.allowed and result.retry_after_s == 42 and result.failed is None
    assert result.blocked_by[0].scope == "team:t1"
    assert result.blocked_by[0].spend_usd == Decimal("100.03") and result.blocked_by[0].limit_usd == Decimal(
        100
    )
    assert client.stats.denied == 1


def test_authorize_reads_429_as_a_denial_not_an_error(gate_factory: Any) -> None:
    gate = gate_factory(
        lambda p, b: (
            429,
            {"allowed": False, "blocked_by": [], "retry_after_s": 5, "degraded": False, "state_lag_ms": 0},
        )
    )
    with SpendgateClient(gate.url, check_timeout_s=LOADED) as client:
        result = client.authorize("k1", model="m", tags=["x", "y"])
    assert not result.allowed and result.failed is None and result.retry_after_s == 5
    assert gate.requests[0][0] == "/v1/authorize?key_id=k1&model=m&tags=x%2Cy"


@pytest.mark.parametrize("mode", [FailMode.OPEN, FailMode.CLOSED])
def test_gate_errors_follow_the_fail_policy(gate_factory: Any, mode: FailMode) -> None:
    broken = gate_factory(lambda p, b: (503, {"error": {"code": "not_ready", "message": "x"}}))
    slow = gate_factory(lambda p, b: (time.sleep(0.5), accept_all(p, b))[1])
    refused = f"http://127.0.0.1:{free_port()}"
    # Only the slow gate runs on the default 50 ms check timeout: on a loaded machine a 503 or a
    # refused connection can itself take longer than 50 ms, and would then read as a timeout.
    cases = ((broken.url, "status 503", 2.0), (slow.url, "timeout", None), (refused, "unreachable", 2.0))
    for url, reason, check_timeout_s in cases:
        with SpendgateClient(url, fail_mode=mode, check_timeout_s=check_timeout_s) as client:
            started = time.monotonic()
            result = client.check("k1")
            took = time.monotonic() - started
        assert result.allowed is (mode is FailMode.OPEN), reason
        assert result.degraded and result.failed == reason
        if check_timeout_s is None:
            assert took < 0.4, f"{reason}: the 50 ms check timeout did not hold ({took:.3f} s)"
        assert (client.stats.fail_open, client.stats.fail_closed) == (
            (1, 0) if mode is FailMode.OPEN else (0, 1)
        )


async def test_the_async_client_answers_like_the_sync_one(gate_factory: Any) -> None:
    gate = gate_factory(accept_all)
    async with AsyncSpendgateClient(gate.url, fail_mode="closed", check_timeout_s=LOADED) as client:
        assert (await client.check("k1", model="gpt-4o")).allowed
        result = await client.send_events(events(3))
        assert result.accepted == 3 and not result.rejected
    async with AsyncSpendgateClient(f"http://127.0.0.1:{free_port()}", fail_mode="closed") as down:
        result = await down.check("k1")
        assert not result.allowed and result.failed == "unreachable"


def test_spend_reads_the_view_with_its_encoded_scope(gate_factory: Any) -> None:
    view = {
        "scope": "model:openai%2Fgpt-4o",
        "blocked": False,
        "windows": [
            {
                "window": "total",
                "spend_usd": "1.25",
                "limit_usd": None,
                "remaining_usd": None,
                "soft_usd": None,
                "resets_at": None,
            }
        ],
    }
    gate = gate_factory(lambda p, b: (200, view))
    with SpendgateClient(gate.url) as client:
        got = client.spend("model:openai%2Fgpt-4o")
    assert gate.requests[0][0] == "/v1/spend/model:openai%2Fgpt-4o"
    assert got.spend() == Decimal("1.25") and got.spend("1d") == 0


def test_a_reserving_check_sends_reserve_and_its_request_and_spend_reads_reserved() -> None:
    from spendgate.client.http import authorize_params, check_body
    from spendgate.client.types import SpendView

    body = check_body("k1", estimated_cost_usd=0.01, request_id="r1", reserve=True, hold_ttl_s=60)
    assert body == {
        "key_id": "k1",
        "request_id": "r1",
        "estimated_cost_usd": "0.01",
        "reserve": True,
        "hold_ttl_s": 60,
    }
    assert authorize_params(body) == {"key_id": "k1", "estimated_cost_usd": "0.01"}
    assert "reserve" not in check_body("k1", request_id="r1")
    window = {"window": "total", "spend_usd": "1", "reserved_usd": "0.5"}
    view = SpendView.from_json({"scope": "key:k1", "blocked": False, "windows": [window]})
    assert view.windows[0].reserved_usd == Decimal("0.5")


# -- the usage reporter --------------------------------------------------------------------------


def test_reporter_sends_batches_of_at_most_batch_size_and_everything_once(gate_factory: Any) -> None:
    gate = gate_factory(accept_all)
    with SpendgateClient(gate.url) as client:
        reporter = client.reporter(batch_size=1000, interval_s=0.05)
        for e in events(2500):
            reporter.report(e)
        assert reporter.flush(10)
        assert reporter.close() == []
    assert max(gate.batches()) <= 1000 and sum(gate.batches()) == 2500
    assert sorted(e["event_id"] for e in gate.events()) == sorted(f"e{i}" for i in range(2500))
    assert reporter.stats.sent == 2500


def test_reporter_flushes_a_small_buffer_within_the_interval(gate_factory: Any) -> None:
    gate = gate_factory(accept_all)
    with SpendgateClient(gate.url) as client:
        reporter = client.reporter(interval_s=0.2)
        started = time.monotonic()
        reporter.report(events(1)[0])
        while not gate.events() and time.monotonic() - started < 3:
            time.sleep(0.01)
        took = time.monotonic() - started
        reporter.close()
    assert gate.batches() == [1] and took < 0.6, took


def test_reporter_retries_5xx_with_backoff_until_acknowledged(gate_factory: Any) -> None:
    failures = {"left": 3}

    def flaky(path: str, body: Any) -> Answer:
        if failures["left"] > 0:
            failures["left"] -= 1
            return 503, {"error": {"code": "broker_unavailable", "message": "retry"}}
        return accept_all(path, body)

    gate = gate_factory(flaky)
    with SpendgateClient(gate.url) as client:
        reporter = client.reporter(interval_s=0.02, backoff_base_s=0.02, backoff_max_s=0.1)
        for e in events(5):
            reporter.report(e)
        assert reporter.flush(10)
        reporter.close()
    assert gate.batches() == [5, 5, 5, 5]  # the same batch, until it was taken
    assert reporter.stats.retries == 3 and reporter.stats.sent == 5


def test_rejected_events_are_logged_and_counted_never_retried(
    gate_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def reject_second(path: str, body: Any) -> Answer:
        results = [{"index": i, "status": "accepted", "event_id": e["event_id"]} for i, e in enumerate(body)]
        results[1] = {"index": 1, "status": "rejected", "errors": [{"field": "cost_usd", "message": "bad"}]}
        return 207, {"accepted": len(body) - 1, "rejected": 1, "results": results}

    gate = gate_factory(reject_second)
    with caplog.at_level(logging.ERROR, "spendgate"), SpendgateClient(gate.url) as client:
        reporter = client.reporter(interval_s=0.02)
        for e in events(3):
            reporter.report(e)
        assert reporter.flush(5)
        reporter.close()
    assert gate.batches() == [3]
    assert (reporter.stats.sent, reporter.stats.rejected, reporter.stats.retries) == (2, 1, 0)
    assert "event e1 rejected" in caplog.text


def test_close_keeps_its_deadline_and_spills_what_it_could_not_send(
    gate_factory: Any, tmp_path: Path
) -> None:
    gate = gate_factory(lambda p, b: (503, {"error": {"code": "broker_unavailable", "message": "down"}}))
    spill = tmp_path / "unsent.jsonl"
    with SpendgateClient(gate.url) as client:
        reporter = client.reporter(interval_s=0.02, backoff_base_s=0.05, spill_path=spill)
        for e in events(4):
            reporter.report(e)
        time.sleep(0.2)
        started = time.monotonic()
        left = reporter.close(timeout_s=0.5)
        took = time.monotonic() - started
    assert took < 1.5, took
    assert [e["event_id"] for e in left] == ["e0", "e1", "e2", "e3"]
    assert [json.loads(line)["event_id"] for line in spill.read_text().splitlines()] == [
        "e0",
        "e1",
        "e2",
        "e3",
    ]
    assert reporter.stats.unsent == 4 and reporter.stats.retries >= 1
    # The spill file is sent later as it is; the gate deduplicates by event_id.
    up = gate_factory(accept_all)
    with SpendgateClient(up.url) as client:
        assert send_spill_file(client, spill).accepted == 4
    assert [e["event_id"] for e in up.events()] == ["e0", "e1", "e2", "e3"]


def test_without_a_spill_file_unsent_events_are_logged_with_their_ids(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        caplog.at_level(logging.ERROR, "spendgate"),
        SpendgateClient(f"http://127.0.0.1:{free_port()}") as client,
    ):
        reporter = client.reporter(interval_s=0.02, backoff_base_s=0.02)
        reporter.report(events(1, "lost-")[0])
        left = reporter.close(timeout_s=0.3)
    assert [e["event_id"] for e in left] == ["lost-0"]
    assert "NOT sent; ids ['lost-0']" in caplog.text
    assert '"event_id":"lost-0"' in caplog.text  # the whole event, to be re-sent by hand


def test_a_full_buffer_never_blocks_and_spills_the_overflow(gate_factory: Any, tmp_path: Path) -> None:
    release = threading.Event()

    def hang(path: str, body: Any) -> Answer:
        release.wait(5)
        return accept_all(path, body)

    gate = gate_factory(hang)
    spill = tmp_path / "overflow.jsonl"
    with SpendgateClient(gate.url) as client:
        reporter = client.reporter(max_buffer=10, batch_size=5, interval_s=0.01, spill_path=spill)
        started = time.monotonic()
        accepted = [reporter.report(e) for e in events(30)]
        took = time.monotonic() - started
        release.set()
        assert reporter.flush(10)
        reporter.close()
    assert took < 0.1, f"report() blocked for {took:.3f} s"
    overflow = [e["event_id"] for e, ok in zip(events(30), accepted, strict=True) if not ok]
    assert len(overflow) >= 20 and reporter.stats.overflowed == len(overflow)
    assert [json.loads(line)["event_id"] for line in spill.read_text().splitlines()] == overflow
    sent = {e["event_id"] for e in gate.events()}
    assert sent | set(overflow) == {f"e{i}" for i in range(30)} and not sent & set(overflow)
