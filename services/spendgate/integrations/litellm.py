"""The LiteLLM proxy callback: ``callbacks: spendgate.integrations.litellm.proxy_handler``.

With ``SPENDGATE_URL`` and ``SPENDGATE_TOKEN`` (a ``gateway`` token) set, that line is the whole setup:

- before a call (``async_pre_call_hook``) the gate is asked with LiteLLM's identity — key = the
  hashed virtual key (``user_api_key_dict.token``; the raw key never leaves the proxy), user,
  team, org, end user, model group, tags from the request metadata — and an estimate: prompt
  tokens counted with litellm's token counter, plus ``max_tokens`` (or
  ``SPENDGATE_LITELLM_DEFAULT_MAX_TOKENS``, default 256) of output, priced from the deployment's
  entry in litellm's cost map. Denied: 429 with ``Retry-After`` and an OpenAI-style error that
  names the blocked scope, window, spend and limit. Gate unreachable: ``SPENDGATE_FAIL_MODE``
  (``open`` lets the call through, ``closed`` answers 503). When there is an estimate the check
  *reserves* it (a hold, CONTRACT §4) under a fresh ``request_id``, so concurrent calls see it
  at once (``SPENDGATE_LITELLM_RESERVE=0`` turns that off).
- after it (``async_log_success_event``, and ``async_log_failure_event`` when a failed call
  still cost money) one usage event: ``event_id`` is a uuid the pre-call hook wrote into the
  request metadata (never ``litellm_call_id``, which a client can set with
  ``x-litellm-call-id``), ``occurred_at`` is the call's start, ``cost_usd`` is LiteLLM's
  ``response_cost`` as an exact decimal, ``request_id`` the hold's (the event settles it). Calls
  the hook refused cost nothing and are not sent; a reserved call that failed for free has its
  hold released (``DELETE /v1/holds/…``; were that to fail, the hold expires).
- identity comes from LiteLLM's authentication only: the metadata stash is signed with a
  per-process secret, so a client that sends its own ``spendgate`` metadata gains nothing.

This module imports litellm (it runs inside the proxy); ``spendgate.client`` never does.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import uuid
from decimal import Decimal
from typing import Any

from fastapi import HTTPException
from litellm.integrations.custom_logger import CustomLogger

from spendgate.client import AsyncSpendgateClient, CheckResult, UsageReporter, usage_event

log = logging.getLogger("spendgate.integrations.litellm")

STASH = "spendgate"
"""The request-metadata key the pre-call hook writes to and the success hook reads."""


def _metadata_of(container: dict[str, Any]) -> dict[str, Any]:
    """The request's LiteLLM metadata: ``litellm_metadata`` (responses, messages) or ``metadata`` (chat)."""
    current = container.get("litellm_metadata")
    if isinstance(current, dict):
        return current
    current = container.get("metadata")
    if not isinstance(current, dict):
        current = {}
        container["metadata"] = current
    return current


def _tags(*sources: Any) -> list[str]:
    out: set[str] = set()
    for source in sources:
        if isinstance(source, list | tuple):
            out.update(str(t) for t in source if isinstance(t, str) and t and not t.startswith("User-Agent:"))
    return sorted(out)


def _clean(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def deny_detail(result: CheckResult) -> str:
    """The error message a denied caller reads: which scope, window, spend and limit blocked it."""
    if not result.blocked_by:
        return "spendgate: request denied (budget gate unavailable, fail mode closed)"
    parts = []
    for b in result.blocked_by:
        text = f"scope {b.scope}"
        if b.window:
            text += f", window {b.window}"
        if b.spend_usd is not None and b.limit_usd is not None:
            text += f": spend {b.spend_usd} USD of limit {b.limit_usd} USD"
        if b.code:
            text += f" ({b.code})"
        if b.resets_at:
            text += f", resets at {b.resets_at}"
        parts.append(text)
    return "spendgate: budget exceeded: " + "; ".join(parts)


class SpendgateLiteLLM(CustomLogger):
    """The callback; one module-level instance (``proxy_handler``) is what the proxy config names."""

    def __init__(self, **reporter_options: Any) -> None:
        super().__init__()
        self._reporter_options = reporter_options
        self._client: AsyncSpendgateClient | None = None
        self._reporter: UsageReporter | None = None
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(32)
        self._prices: dict[str, tuple[Decimal, Decimal] | None] = {}
        self.default_max_tokens = int(os.environ.get("SPENDGATE_LITELLM_DEFAULT_MAX_TOKENS", "256"))
        self.reserve = os.environ.get("SPENDGATE_LITELLM_RESERVE", "1") not in ("0", "false", "no")

    # -- wiring (lazy: the proxy imports this module before it reads its environment) ------------

    @property
    def client(self) -> AsyncSpendgateClient:
        if self._client is None:
            self._client = AsyncSpendgateClient()
        return self._client

    @property
    def reporter(self) -> UsageReporter:
        with self._lock:
            if self._reporter is None:
                options = dict(self._reporter_options)
                spill = os.environ.get("SPENDGATE_SPILL_PATH")
                if spill:
                    options.setdefault("spill_path", spill)
                self._reporter = self.client.reporter(**options)
                atexit.register(self.close)
            return self._reporter

    def close(self, timeout_s: float | None = None) -> None:
        """Flush buffered usage within the reporter's deadline (what is left is spilled or logged)."""
        reporter, self._reporter = self._reporter, None
        if reporter is not None:
            reporter.close(timeout_s)

    # -- before the call -------------------------------------------------------------------------

    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict[str, Any], call_type: Any
    ) -> dict[str, Any]:
        metadata = _metadata_of(data)
        identity = self._identity(user_api_key_dict, data, metadata)
        estimate = self.estimate(data, identity["model"])
        request_id = str(uuid.uuid4()) if self.reserve and estimate is not None else None
        result = await self.client.check(
            identity["key_id"],
            end_user_id=identity["end_user_id"],
            model=identity["model"],
            tags=identity["tags"],
            user_id=identity["user_id"],
            team_id=identity["team_id"],
            org_id=identity["org_id"],
            estimated_cost_usd=estimate,
            request_id=request_id,
            reserve=request_id is not None,
        )
        if not result.allowed:
            raise self._denied(result)
        stash = {**identity, "event_id": str(uuid.uuid4()), "request_id": request_id}
        stash["sig"] = self._sign(stash)
        metadata[STASH] = stash
        return data

    def _identity(self, auth: Any, data: dict[str, Any], metadata: dict[str, Any]) -> dict[str, Any]:
        key_meta = getattr(auth, "metadata", None) or {}
        return {
            "key_id": _clean(getattr(auth, "token", None)) or "litellm-unauthenticated",
            "user_id": _clean(getattr(auth, "user_id", None)),
            "team_id": _clean(getattr(auth, "team_id", None)),
            "org_id": _clean(getattr(auth, "org_id", None)),
            "end_user_id": _clean(getattr(auth, "end_user_id", None)) or _clean(data.get("user")),
            "model": _clean(data.get("model")),
            "tags": _tags(metadata.get("tags"), key_meta.get("tags") if isinstance(key_meta, dict) else None),
        }

    def _denied(self, result: CheckResult) -> HTTPException:
        if result.failed is not None:
            return HTTPException(
                status_code=503,
                detail={"error": f"spendgate: budget gate unavailable ({result.failed}); fail mode closed"},
                headers={"retry-after": "1"},
            )
        retry = result.retry_after_s if result.retry_after_s is not None else 60
        blocked = [
            {
                "scope": b.scope,
                "window": b.window,
                "spend_usd": None if b.spend_usd is None else str(b.spend_usd),
                "limit_usd": None if b.limit_usd is None else str(b.limit_usd),
                "resets_at": b.resets_at,
            }
            for b in result.blocked_by
        ]
        return HTTPException(
            status_code=429,
            detail={"error": deny_detail(result), "blocked_by": blocked, "retry_after_s": retry},
            headers={"retry-after": str(max(1, retry))},
        )

    def estimate(self, data: dict[str, Any], model: str | None) -> Decimal | None:
        """Prompt tokens (litellm's counter) + max output tokens, priced from litellm's cost map."""
        if model is None:
            return None
        price = self._price(model)
        if price is None:
            return None
        import litellm

        try:
            if isinstance(data.get("messages"), list):
                prompt = litellm.token_counter(model=self._deployments(model)[0], messages=data["messages"])
            else:
                text = data.get("input") if data.get("input") is not None else data.get("prompt", "")
                prompt = litellm.token_counter(model=self._deployments(model)[0], text=json.dumps(text))
        except Exception:  # noqa: BLE001 - an estimate is best effort; the charge is exact
            prompt = len(json.dumps(data.get("messages") or data.get("input") or "")) // 4
        output = (
            data.get("max_tokens")
            or data.get("max_completion_tokens")
            or data.get("max_output_tokens")
            or self.default_max_tokens
        )
        try:
            output = int(output)
        except (TypeError, ValueError):
            output = self.default_max_tokens
        return price[0] * prompt + price[1] * output

    def _deployments(self, model: str) -> list[str]:
        """The provider models behind a model group (its own name when the router doesn't know it)."""
        try:
            from litellm.proxy import proxy_server

            router = proxy_server.llm_router
            names = [
                d["litellm_params"]["model"]
                for d in (router.get_model_list(model_name=model) or [] if router else [])
            ]
        except Exception:  # noqa: BLE001 - no router (library use): price the name itself
            names = []
        return names or [model]

    def _price(self, model: str) -> tuple[Decimal, Decimal] | None:
        """(input, output) USD per token of the group's dearest deployment; cached per group."""
        if model not in self._prices:
            import litellm

            best: tuple[Decimal, Decimal] | None = None
            for name in self._deployments(model):
                info = litellm.model_cost.get(name) or litellm.model_cost.get(name.split("/", 1)[-1])
                if not info or info.get("input_cost_per_token") is None:
                    continue
                cost = (
                    Decimal(repr(float(info["input_cost_per_token"]))),
                    Decimal(repr(float(info.get("output_cost_per_token") or 0))),
                )
                if best is None or cost > best:
                    best = cost
            self._prices[model] = best
        return self._prices[model]

    # -- after the call --------------------------------------------------------------------------

    async def async_log_success_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        self._charge(kwargs, start_time, failed=False)

    async def async_log_failure_event(
        self, kwargs: dict[str, Any], response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        if not self._charge(kwargs, start_time, failed=True):
            await self._release(kwargs)

    def _charge(self, kwargs: dict[str, Any], start_time: Any, *, failed: bool) -> bool:
        """Report the call's usage event; False when there was nothing to charge."""
        try:
            event = self.usage_event_of(kwargs, start_time, failed=failed)
        except Exception:  # noqa: BLE001 - never break LiteLLM's logging worker; say what happened
            log.exception(
                "spendgate: could not build the usage event of call %s", kwargs.get("litellm_call_id")
            )
            return False
        if event is not None:
            self.reporter.report(event)
        return event is not None

    async def _release(self, kwargs: dict[str, Any]) -> None:
        """Release the hold of a reserved call that cost nothing (else it would wait for its TTL)."""
        stash = self._verified(kwargs.get("litellm_params") or {})
        if not stash or not stash.get("request_id"):
            return
        try:
            await self.client.release_hold(stash["key_id"], stash["request_id"])
        except Exception as exc:  # noqa: BLE001 - the hold expires anyway: say so, never raise here
            log.warning("spendgate: hold %s not released (%s); it expires", stash["request_id"], exc)

    def usage_event_of(
        self, kwargs: dict[str, Any], start_time: Any, *, failed: bool
    ) -> dict[str, Any] | None:
        """The usage event of a finished call, or ``None`` when there is nothing to charge."""
        slo = kwargs.get("standard_logging_object") or {}
        cost = kwargs.get("response_cost")
        if cost is None:
            cost = slo.get("response_cost")
        params = kwargs.get("litellm_params") or {}
        stash = self._verified(params)
        if failed and not cost:
            return None  # refused by the hook (or before it), or failed for free: nothing was spent
        if cost is None:
            log.warning("spendgate: call %s has no response_cost; charged 0", kwargs.get("litellm_call_id"))
            cost = 0
        identity = stash or self._identity_of_log(slo)
        return usage_event(
            event_id=(stash or {}).get("event_id") or str(uuid.uuid4()),
            key_id=identity["key_id"],
            cost_usd=cost,
            occurred_at=slo.get("startTime") or start_time,
            end_user_id=identity.get("end_user_id"),
            model=identity.get("model"),
            tags=identity.get("tags") or (),
            user_id=identity.get("user_id"),
            team_id=identity.get("team_id"),
            org_id=identity.get("org_id"),
            request_id=(stash or {}).get("request_id") or _clean(kwargs.get("litellm_call_id")),
            input_tokens=_int(slo.get("prompt_tokens")),
            output_tokens=_int(slo.get("completion_tokens")),
        )

    def _identity_of_log(self, slo: dict[str, Any]) -> dict[str, Any]:
        """Identity from LiteLLM's own logging object (the hook did not run for this call type)."""
        meta = slo.get("metadata") or {}
        return {
            "key_id": _clean(meta.get("user_api_key_hash")) or "litellm-unauthenticated",
            "user_id": _clean(meta.get("user_api_key_user_id")),
            "team_id": _clean(meta.get("user_api_key_team_id")),
            "org_id": _clean(meta.get("user_api_key_org_id")),
            "end_user_id": _clean(meta.get("user_api_key_end_user_id")) or _clean(slo.get("end_user")),
            "model": _clean(slo.get("model_group")) or _clean(slo.get("model")),
            "tags": _tags(meta.get("tags")),
        }

    def _sign(self, stash: dict[str, Any]) -> str:
        body = json.dumps({k: v for k, v in stash.items() if k != "sig"}, sort_keys=True).encode()
        return hmac.new(self._secret, body, hashlib.sha256).hexdigest()

    def _verified(self, params: dict[str, Any]) -> dict[str, Any] | None:
        for name in ("litellm_metadata", "metadata"):
            meta = params.get(name)
            stash = meta.get(STASH) if isinstance(meta, dict) else None
            if isinstance(stash, dict) and hmac.compare_digest(str(stash.get("sig", "")), self._sign(stash)):
                return stash
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


proxy_handler = SpendgateLiteLLM()
"""The instance a LiteLLM proxy config names: ``callbacks: spendgate.integrations.litellm.proxy_handler``."""
