"""What the client sends and gets back (CONTRACT §4), as plain typed values.

Standard library only: a gateway imports this without spendgate's server stack (Faust, Kafka,
Postgres drivers) and without pydantic.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from spendgate.domain.windows import rfc3339

iso_utc = rfc3339  # the client's public name for it

NANO = Decimal("0.000000001")


class FailMode(StrEnum):
    """What a check answers when the gate cannot be asked (timeout, refused, 5xx)."""

    OPEN = "open"
    CLOSED = "closed"


class SpendgateError(Exception):
    """The gate could not be asked, or answered something unusable."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """Where the gate is and how to talk to it; ``from_env`` fills what was not given."""

    url: str
    token: str | None = None
    fail_mode: FailMode = FailMode.OPEN
    check_timeout_s: float = 0.050
    timeout_s: float = 10.0

    @classmethod
    def from_env(
        cls,
        url: str | None = None,
        token: str | None = None,
        fail_mode: FailMode | str | None = None,
        check_timeout_s: float | None = None,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> ClientSettings:
        """Arguments first, then ``SPENDGATE_URL`` / ``_TOKEN`` / ``_FAIL_MODE`` / ``_CHECK_TIMEOUT_MS``."""
        env = os.environ if env is None else env
        url = url or env.get("SPENDGATE_URL")
        if not url:
            raise ValueError("spendgate client: pass url= or set SPENDGATE_URL (e.g. http://127.0.0.1:8080)")
        mode = fail_mode or env.get("SPENDGATE_FAIL_MODE") or FailMode.OPEN
        try:
            mode = FailMode(str(mode).strip().lower())
        except ValueError:
            raise ValueError(f"SPENDGATE_FAIL_MODE must be 'open' or 'closed', not {mode!r}") from None
        if check_timeout_s is None:
            check_timeout_s = float(env.get("SPENDGATE_CHECK_TIMEOUT_MS", "50")) / 1000
        return cls(
            url=url.rstrip("/"),
            token=token or env.get("SPENDGATE_TOKEN") or None,
            fail_mode=mode,
            check_timeout_s=check_timeout_s,
            timeout_s=10.0 if timeout_s is None else timeout_s,
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@dataclass(frozen=True, slots=True)
class Blocked:
    """One binding limit: the scope, its window, spend so far and the limit (CONTRACT ``blocked_by``)."""

    scope: str
    window: str | None
    spend_usd: Decimal | None
    limit_usd: Decimal | None
    resets_at: str | None
    code: str | None = None

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> Blocked:
        return cls(
            scope=str(item.get("scope")),
            window=item.get("window"),
            spend_usd=_dec(item.get("spend_usd")),
            limit_usd=_dec(item.get("limit_usd")),
            resets_at=item.get("resets_at"),
            code=item.get("code"),
        )


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The gate's answer, or the fail policy's when the gate could not be asked (``failed``)."""

    allowed: bool
    blocked_by: tuple[Blocked, ...] = ()
    retry_after_s: int | None = None
    degraded: bool = False
    state_lag_ms: int | None = None
    failed: str | None = None
    """Why the gate could not be asked (then ``allowed`` is the fail policy's answer)."""

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> CheckResult:
        return cls(
            allowed=bool(body["allowed"]),
            blocked_by=tuple(Blocked.from_json(b) for b in body.get("blocked_by") or ()),
            retry_after_s=body.get("retry_after_s"),
            degraded=bool(body.get("degraded", False)),
            state_lag_ms=body.get("state_lag_ms"),
        )

    @classmethod
    def by_policy(cls, mode: FailMode, reason: str) -> CheckResult:
        return cls(allowed=mode is FailMode.OPEN, degraded=True, failed=reason)


@dataclass(frozen=True, slots=True)
class SpendWindow:
    window: str
    spend_usd: Decimal
    limit_usd: Decimal | None
    remaining_usd: Decimal | None
    soft_usd: Decimal | None
    resets_at: str | None
    reserved_usd: Decimal = Decimal(0)
    """What outstanding holds keep in this window (``remaining_usd`` is net of it)."""


@dataclass(frozen=True, slots=True)
class SpendView:
    """``GET /v1/spend/{scope}``."""

    scope: str
    blocked: bool
    windows: tuple[SpendWindow, ...]

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> SpendView:
        return cls(
            scope=body["scope"],
            blocked=bool(body["blocked"]),
            windows=tuple(
                SpendWindow(
                    window=w["window"],
                    spend_usd=Decimal(w["spend_usd"]),
                    limit_usd=_dec(w.get("limit_usd")),
                    remaining_usd=_dec(w.get("remaining_usd")),
                    soft_usd=_dec(w.get("soft_usd")),
                    resets_at=w.get("resets_at"),
                    reserved_usd=Decimal(str(w.get("reserved_usd", "0"))),
                )
                for w in body.get("windows", ())
            ),
        )

    def spend(self, window: str = "total") -> Decimal:
        """Spend in ``window`` (0 when the scope has none there)."""
        return next((w.spend_usd for w in self.windows if w.window == window), Decimal(0))


@dataclass(frozen=True, slots=True)
class Rejection:
    """An event the API refused (4xx): never retried, logged and counted."""

    index: int
    event_id: str | None
    errors: Any


@dataclass(frozen=True, slots=True)
class EventsResult:
    """``POST /v1/events``: how many were accepted and which were rejected, by index."""

    accepted: int
    rejected: tuple[Rejection, ...] = field(default_factory=tuple)


def _dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(str(value))


def exact_usd(value: float | int | str | Decimal) -> str:
    """A cost as the contract's decimal string, from what a gateway has (often a float).

    A float goes through its shortest repr (``0.00045`` stays ``0.00045``, never
    ``0.000449999…``); more than nine decimals are rounded half-up to nano-dollars.
    """
    if isinstance(value, bool):
        raise ValueError("a cost is not a boolean")
    try:
        amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"not a number: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"a cost must be finite and >= 0, not {value!r}")
    amount = amount.quantize(NANO, rounding=ROUND_HALF_UP).normalize()
    return format(amount, "f")


def usage_event(
    *,
    key_id: str,
    cost_usd: float | int | str | Decimal,
    occurred_at: datetime | float | None = None,
    event_id: str | None = None,
    end_user_id: str | None = None,
    model: str | None = None,
    tags: Iterable[str] = (),
    user_id: str | None = None,
    team_id: str | None = None,
    org_id: str | None = None,
    request_id: str | None = None,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
) -> dict[str, Any]:
    """A ``kind: cost`` usage event (CONTRACT §2) with a fresh uuid unless ``event_id`` is given."""
    event: dict[str, Any] = {
        "v": 1,
        "event_id": event_id or str(uuid.uuid4()),
        "kind": "cost",
        "occurred_at": iso_utc(occurred_at),
        "key_id": key_id,
        "cost_usd": exact_usd(cost_usd),
        "tags": sorted(set(tags)),
    }
    optional = {
        "end_user_id": end_user_id,
        "model": model,
        "user_id": user_id,
        "team_id": team_id,
        "org_id": org_id,
        "request_id": request_id,
    }
    event.update({k: v for k, v in optional.items() if v is not None})
    if input_tokens is not None or output_tokens is not None:
        event["tokens"] = {"input": input_tokens, "output": output_tokens}
    return event
