"""``SpendgateClient`` (sync) and ``AsyncSpendgateClient``: the gate's HTTP API over one pooled httpx client.

Both share the request building and answer parsing below, so they cannot drift apart; they
differ only in how the request is sent. A check that cannot reach the gate (timeout, refused,
5xx) answers per the fail policy and is counted; it never raises.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx

from spendgate.client.reporter import UsageReporter
from spendgate.client.types import (
    CheckResult,
    ClientSettings,
    EventsResult,
    FailMode,
    Rejection,
    SpendgateError,
    SpendView,
    exact_usd,
)

log = logging.getLogger("spendgate.client")

MAX_BATCH = 1000
RETRYABLE_STATUS = frozenset({401, 403, 408, 425, 429})
"""4xx answers that say nothing about the events themselves (auth, throttling): keep and retry them."""


@dataclass
class ClientStats:
    """Counters a gateway can export; updated under a lock (the reporter's thread shares them)."""

    checks: int = 0
    denied: int = 0
    fail_open: int = 0
    fail_closed: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def count(self, result: CheckResult) -> None:
        with self._lock:
            self.checks += 1
            if result.failed is not None:
                if result.allowed:
                    self.fail_open += 1
                else:
                    self.fail_closed += 1
            elif not result.allowed:
                self.denied += 1


def check_body(
    key_id: str,
    *,
    end_user_id: str | None = None,
    model: str | None = None,
    tags: Iterable[str] = (),
    user_id: str | None = None,
    team_id: str | None = None,
    org_id: str | None = None,
    estimated_cost_usd: float | int | str | Decimal | None = None,
    request_id: str | None = None,
    reserve: bool = False,
    hold_ttl_s: int | None = None,
) -> dict[str, Any]:
    """The body of ``POST /v1/check`` (CONTRACT §4); ``None`` fields are left out.

    ``reserve``: hold ``estimated_cost_usd`` for ``request_id`` when allowed (both needed); the
    usage event with the same ``request_id`` settles the hold, ``release_hold`` releases it.
    """
    body: dict[str, Any] = {"key_id": key_id}
    optional = {
        "end_user_id": end_user_id,
        "model": model,
        "user_id": user_id,
        "team_id": team_id,
        "org_id": org_id,
        "request_id": request_id,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    tag_list = sorted(set(tags))
    if tag_list:
        body["tags"] = tag_list
    if estimated_cost_usd is not None:
        body["estimated_cost_usd"] = exact_usd(estimated_cost_usd)
    if reserve:
        body["reserve"] = True
        if hold_ttl_s is not None:
            body["hold_ttl_s"] = hold_ttl_s
    return body


def hold_path(request_id: str) -> str:
    return "/v1/holds/" + quote(request_id, safe="")


def authorize_params(body: Mapping[str, Any]) -> dict[str, str]:
    params = {
        k: str(v) for k, v in body.items() if k not in ("tags", "request_id", "reserve", "hold_ttl_s")
    }
    if body.get("tags"):
        params["tags"] = ",".join(body["tags"])
    return params


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error") or {}
        return f"{response.status_code} {error.get('code')}: {error.get('message')}"
    except Exception:  # noqa: BLE001 - any body at all: show its start
        return f"{response.status_code}: {response.text[:200]}"


def parse_check(response: httpx.Response, *, authorize: bool = False) -> CheckResult:
    """A check's answer; raises ``SpendgateError`` for anything that is not one."""
    ok = response.status_code == 200 or (authorize and response.status_code == 429)
    if not ok:
        raise SpendgateError(
            _message(response), status=response.status_code, retryable=response.status_code >= 500
        )
    return CheckResult.from_json(response.json())


def parse_events(response: httpx.Response, events: Sequence[Mapping[str, Any]]) -> EventsResult:
    """``POST /v1/events``: accepted count and per-index rejections.

    Raises a retryable ``SpendgateError`` when the batch as a whole should be sent again (5xx,
    auth, throttling); a 4xx about the events themselves is returned as rejections, never raised.
    """
    status = response.status_code
    if status in (202, 207) or status == 422:
        try:
            body = response.json()
        except ValueError:
            body = {}
        results = body.get("results") or (body.get("error") or {}).get("details", {}).get("results")
        if results is not None:
            rejected = tuple(
                Rejection(r["index"], _event_id(events, r["index"]), r.get("errors"))
                for r in results
                if r.get("status") == "rejected"
            )
            return EventsResult(accepted=len(events) - len(rejected), rejected=rejected)
        if status in (202, 207):
            return EventsResult(accepted=len(events))
    if status >= 500 or status in RETRYABLE_STATUS:
        raise SpendgateError(_message(response), status=status, retryable=True)
    # 400/413/415/422 without per-index results: the batch itself was refused; resending won't help.
    reason = _message(response)
    return EventsResult(
        accepted=0, rejected=tuple(Rejection(i, _event_id(events, i), reason) for i in range(len(events)))
    )


def _event_id(events: Sequence[Mapping[str, Any]], index: int) -> str | None:
    if 0 <= index < len(events):
        value = events[index].get("event_id")
        return str(value) if value is not None else None
    return None


def spend_path(scope: str) -> str:
    """``/v1/spend/{scope}``: the scope as written in the contract (its ids already percent-encoded)."""
    return "/v1/spend/" + quote(scope, safe=":/%")


def _limits() -> httpx.Limits:
    return httpx.Limits(max_connections=32, max_keepalive_connections=16, keepalive_expiry=30)


class SpendgateClient:
    """Blocking client; thread-safe (httpx.Client is). Use as a context manager or call ``close()``."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        fail_mode: FailMode | str | None = None,
        check_timeout_s: float | None = None,
        timeout_s: float | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        self.settings = settings or ClientSettings.from_env(url, token, fail_mode, check_timeout_s, timeout_s)
        self.stats = ClientStats()
        self._http = httpx.Client(
            base_url=self.settings.url,
            headers=self.settings.headers(),
            timeout=self.settings.timeout_s,
            limits=_limits(),
        )

    def check(self, key_id: str, *, timeout_s: float | None = None, **fields: Any) -> CheckResult:
        """``POST /v1/check``; on a gate error the fail policy answers (``result.failed`` says why).

        The timeout applies to each phase (connect, write, read); the async client's is one
        deadline for the whole check.
        """
        return self._judge(False, check_body(key_id, **fields), timeout_s)

    def authorize(self, key_id: str, *, timeout_s: float | None = None, **fields: Any) -> CheckResult:
        """``GET /v1/authorize`` (200 allowed, 429 denied); gate errors as in ``check``."""
        return self._judge(True, check_body(key_id, **fields), timeout_s)

    def _judge(self, authorize: bool, body: dict[str, Any], timeout_s: float | None) -> CheckResult:
        timeout = self.settings.check_timeout_s if timeout_s is None else timeout_s
        try:
            if authorize:
                response = self._http.get("/v1/authorize", params=authorize_params(body), timeout=timeout)
            else:
                response = self._http.post("/v1/check", json=body, timeout=timeout)
            result = parse_check(response, authorize=authorize)
        except (httpx.HTTPError, SpendgateError, ValueError) as exc:
            result = CheckResult.by_policy(self.settings.fail_mode, _reason(exc))
            log.warning("spendgate check failed (%s): fail %s", result.failed, self.settings.fail_mode)
        self.stats.count(result)
        return result

    def release_hold(self, key_id: str, request_id: str) -> None:
        """``DELETE /v1/holds/{request_id}?key_id=…`` (idempotent); raises a ``SpendgateError``
        (retryable on 5xx and transport errors) unless 204. A hold never released expires."""
        try:
            response = self._http.delete(hold_path(request_id), params={"key_id": key_id})
        except httpx.HTTPError as exc:
            raise SpendgateError(_reason(exc), retryable=True) from exc
        if response.status_code != 204:
            raise SpendgateError(
                _message(response), status=response.status_code, retryable=response.status_code >= 500
            )

    def spend(self, scope: str) -> SpendView:
        """``GET /v1/spend/{scope}``; raises ``SpendgateError`` unless 200."""
        try:
            response = self._http.get(spend_path(scope))
        except httpx.HTTPError as exc:
            raise SpendgateError(_reason(exc)) from exc
        if response.status_code != 200:
            raise SpendgateError(_message(response), status=response.status_code, retryable=False)
        return SpendView.from_json(response.json())

    def send_events(
        self, events: Sequence[Mapping[str, Any]], *, timeout_s: float | None = None
    ) -> EventsResult:
        """``POST /v1/events`` (≤ 1000); raises a retryable ``SpendgateError`` on 5xx, timeouts, refusals."""
        if len(events) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} events per call")
        try:
            response = self._http.post(
                "/v1/events",
                json=list(events),
                timeout=self.settings.timeout_s if timeout_s is None else timeout_s,
            )
        except httpx.HTTPError as exc:
            raise SpendgateError(_reason(exc), retryable=True) from exc
        return parse_events(response, events)

    def reporter(self, **options: Any) -> UsageReporter:
        """A background ``UsageReporter`` sending through this client (see its options)."""
        return UsageReporter(self, **options)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SpendgateClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncSpendgateClient:
    """The asyncio twin of ``SpendgateClient`` (same answers, same fail policy)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        fail_mode: FailMode | str | None = None,
        check_timeout_s: float | None = None,
        timeout_s: float | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        self.settings = settings or ClientSettings.from_env(url, token, fail_mode, check_timeout_s, timeout_s)
        self.stats = ClientStats()
        self._http = httpx.AsyncClient(
            base_url=self.settings.url,
            headers=self.settings.headers(),
            timeout=self.settings.timeout_s,
            limits=_limits(),
        )

    async def check(self, key_id: str, *, timeout_s: float | None = None, **fields: Any) -> CheckResult:
        return await self._judge(False, check_body(key_id, **fields), timeout_s)

    async def authorize(self, key_id: str, *, timeout_s: float | None = None, **fields: Any) -> CheckResult:
        return await self._judge(True, check_body(key_id, **fields), timeout_s)

    async def _judge(self, authorize: bool, body: dict[str, Any], timeout_s: float | None) -> CheckResult:
        timeout = self.settings.check_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):  # one deadline for the whole check, not per phase
                if authorize:
                    response = await self._http.get(
                        "/v1/authorize", params=authorize_params(body), timeout=timeout
                    )
                else:
                    response = await self._http.post("/v1/check", json=body, timeout=timeout)
            result = parse_check(response, authorize=authorize)
        except (httpx.HTTPError, SpendgateError, ValueError, TimeoutError) as exc:
            result = CheckResult.by_policy(self.settings.fail_mode, _reason(exc))
            log.warning("spendgate check failed (%s): fail %s", result.failed, self.settings.fail_mode)
        self.stats.count(result)
        return result

    async def release_hold(self, key_id: str, request_id: str) -> None:
        """As ``SpendgateClient.release_hold``."""
        try:
            response = await self._http.delete(hold_path(request_id), params={"key_id": key_id})
        except httpx.HTTPError as exc:
            raise SpendgateError(_reason(exc), retryable=True) from exc
        if response.status_code != 204:
            raise SpendgateError(
                _message(response), status=response.status_code, retryable=response.status_code >= 500
            )

    async def spend(self, scope: str) -> SpendView:
        try:
            response = await self._http.get(spend_path(scope))
        except httpx.HTTPError as exc:
            raise SpendgateError(_reason(exc)) from exc
        if response.status_code != 200:
            raise SpendgateError(_message(response), status=response.status_code, retryable=False)
        return SpendView.from_json(response.json())

    async def send_events(
        self, events: Sequence[Mapping[str, Any]], *, timeout_s: float | None = None
    ) -> EventsResult:
        if len(events) > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} events per call")
        try:
            response = await self._http.post(
                "/v1/events",
                json=list(events),
                timeout=self.settings.timeout_s if timeout_s is None else timeout_s,
            )
        except httpx.HTTPError as exc:
            raise SpendgateError(_reason(exc), retryable=True) from exc
        return parse_events(response, events)

    def reporter(self, **options: Any) -> UsageReporter:
        """A background ``UsageReporter`` (its own thread and blocking connection pool, same settings).

        Reporting is ``reporter.report(event)``: a lock and an append, safe to call from a coroutine.
        """
        return UsageReporter(SpendgateClient(settings=self.settings), own_client=True, **options)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncSpendgateClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return "timeout"
    if isinstance(exc, httpx.ConnectError):
        return "unreachable"
    if isinstance(exc, SpendgateError):
        return f"status {exc.status}" if exc.status else str(exc)
    return type(exc).__name__
