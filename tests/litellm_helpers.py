"""A real LiteLLM proxy for tests and the bench: a fake OpenAI upstream, the config, the process.

The proxy runs from ``.venv-litellm/`` (``make litellm-venv``: litellm 1.109.1 and its proxy
dependencies pinned in deploy/litellm/requirements.txt, spendgate installed with --no-deps).
Identity comes from a ``custom_auth`` function (``CUSTOM_AUTH`` below, written next to the
config): LiteLLM's own virtual keys need its Postgres database and Prisma, whose engine binaries
are downloaded at run time — impossible offline. ``custom_auth`` yields the same
``UserAPIKeyAuth`` object (hashed ``token``, user, team, org, key tags) the hook reads either way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = ROOT / ".venv-litellm"
LITELLM_BIN = LITELLM_VENV / "bin" / "litellm"
MASTER_KEY = "sk-e2e-master-" + "0" * 8
PROMPT_TOKENS, COMPLETION_TOKENS = 1000, 500
"""What the fake upstream reports for every call: 0.00045 USD of gpt-4o-mini at the bundled prices."""


class _FakeOpenAI(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class' name
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        length = int(self.headers.get("Content-Length") or 0)
        request = json.loads(self.rfile.read(length) or b"{}")
        self.server.calls += 1  # type: ignore[attr-defined]
        model = request.get("model", "gpt-4o-mini")
        usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": COMPLETION_TOKENS,
            "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
        }
        if self.path.endswith("/responses"):
            body = {
                "id": "resp_" + uuid.uuid4().hex,
                "object": "response",
                "created_at": int(time.time()),
                "status": "completed",
                "model": model,
                "output": [
                    {
                        "type": "message",
                        "id": "msg_" + uuid.uuid4().hex,
                        "status": "completed",
                        "role": "assistant",
                        "content": [{"type": "output_text", "text": "hi", "annotations": []}],
                    }
                ],
                "usage": {
                    "input_tokens": PROMPT_TOKENS,
                    "output_tokens": COMPLETION_TOKENS,
                    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
                },
            }
            self._send(200, json.dumps(body).encode())
            return
        ident = "chatcmpl-" + uuid.uuid4().hex
        if request.get("stream"):
            chunks: list[dict[str, Any]] = [
                {
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": "h"}, "finish_reason": None}
                    ]
                },
                {"choices": [{"index": 0, "delta": {"content": "i"}, "finish_reason": None}]},
                {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                {"choices": [], "usage": usage},
            ]
            payload = b"".join(
                b"data: "
                + json.dumps(
                    {
                        "id": ident,
                        "object": "chat.completion.chunk",
                        "created": int(time.time()),
                        "model": model,
                        **c,
                    }
                ).encode()
                + b"\n\n"
                for c in chunks
            )
            self._send(200, payload + b"data: [DONE]\n\n", "text/event-stream")
            return
        body = {
            "id": ident,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
            ],
            "usage": usage,
        }
        self._send(200, json.dumps(body).encode())


class FakeOpenAI:
    """An OpenAI-compatible upstream on 127.0.0.1 (chat, streaming, responses) reporting fixed usage."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOpenAI)
        self.server.daemon_threads = True
        self.server.calls = 0  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @property
    def calls(self) -> int:
        return int(self.server.calls)  # type: ignore[attr-defined]

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


CUSTOM_AUTH = '''
"""custom_auth for the test proxy: API keys -> identity (E2E_KEYS, JSON)."""
import json, os
from fastapi import HTTPException, Request
from litellm.proxy._types import UserAPIKeyAuth

KEYS = json.loads(os.environ.get("E2E_KEYS", "{}"))

async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    who = KEYS.get(api_key.removeprefix("Bearer ").strip())
    if who is None:
        raise HTTPException(status_code=401, detail={"error": "unknown key"})
    return UserAPIKeyAuth(
        api_key=api_key.removeprefix("Bearer ").strip(),
        user_id=who.get("user_id"),
        team_id=who.get("team_id"),
        org_id=who.get("org_id"),
        metadata={"tags": who.get("tags", [])},
    )
'''


def write_config(directory: Path, upstream: str, *, callback: bool, custom_auth: bool = True) -> Path:
    """config.yaml (+ custom_auth.py) for a proxy serving ``gpt-4o-mini`` from ``upstream``."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "model_list:",
        "  - model_name: gpt-4o-mini",
        f"    litellm_params: {{model: openai/gpt-4o-mini, api_key: sk-fake, api_base: '{upstream}'}}",
        "litellm_settings:",
        "  disable_add_user_agent_to_request_tags: true",
    ]
    if callback:
        lines.append("  callbacks: spendgate.integrations.litellm.proxy_handler")
    lines += ["general_settings:", f"  master_key: {MASTER_KEY}"]
    if custom_auth:
        lines.append("  custom_auth: custom_auth.user_api_key_auth")
        (directory / "custom_auth.py").write_text(CUSTOM_AUTH)
    path = directory / "config.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


class LiteLLMProxy:
    """``litellm --config …`` on 127.0.0.1:port, offline; stopped by pid."""

    def __init__(self, config: Path, port: int, log_path: Path, env: Mapping[str, str]) -> None:
        self.config, self.port, self.log_path = config, port, log_path
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SPENDGATE_", "LITELLM_", "DATABASE_URL", "OPENAI_"))
        }
        self.env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_OFFLINE_MODE="true", **env)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LiteLLMProxy:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [str(LITELLM_BIN), "--config", str(self.config), "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=self.config.parent,
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        """Seconds until ``/health/liveliness`` answered; raises with the log tail if it never does."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"litellm exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health/liveliness", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"litellm not ready after {timeout_s} s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path.exists() else ""
