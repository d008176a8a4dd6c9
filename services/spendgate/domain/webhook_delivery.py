"""Alert webhook delivery, the pure parts: event ids, signatures, the Slack message, the retry
schedule and what an HTTP answer means (the notifier does the I/O)."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

EVENT_ID_HEADER = "Spendgate-Event-Id"
SIGNATURE_HEADER = "Spendgate-Signature"


# --- event ids, bodies, signatures -------------------------------------------------------------


def canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def event_id(webhook_id: str, alert: Mapping[str, Any]) -> str:
    """Stable per alert x subscription: the same alert record read twice (a restart, a duplicate
    produced by a retry) gets the same id, so a receiver deduplicates on it."""
    digest = hashlib.sha256(webhook_id.encode() + b"\n" + canonical(alert)).hexdigest()
    return f"evt_{digest[:32]}"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """``t=<unix>,v1=<hex hmac-sha256 of "t.body">`` (the ``Spendgate-Signature`` header)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, *, now: float, tolerance_s: float = 300) -> bool:
    """What a receiver does: a v1 signature of this body by ``secret``, made within the tolerance."""
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return any(hmac.compare_digest(expected, got) for got in fields.get("v1", []))


def usd(text: str | None) -> str:
    """A decimal string as dollars for people: ``$412.50``, ``$0.000125`` (never a float)."""
    if text is None:
        return "n/a"
    try:
        amount = Decimal(text)
    except InvalidOperation:
        return text
    exponent = amount.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        amount = amount.quantize(Decimal("0.01"))
    return f"${amount:,}"


_HEADLINE = {
    "soft_limit": "{scope} crossed its soft limit",
    "blocked": "{scope} is blocked: it reached its limit",
    "unblocked": "{scope} is unblocked",
}


def slack_message(alert: Mapping[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook body ``{"text", "blocks"}`` naming scope, window, spend, limit,
    reset time."""
    scope, kind = str(alert["scope"]), str(alert["kind"])
    headline = _HEADLINE.get(kind, "{scope}: " + kind).format(scope=scope)
    window = alert.get("window") or "n/a"
    resets = alert.get("resets_at") or "never"
    spend, limit = usd(alert.get("spend_usd")), usd(alert.get("limit_usd"))
    text = f"spendgate: {headline} ({window} window: {spend} of {limit}; resets {resets})"
    fields = [
        ("Scope", f"`{scope}`"),
        ("Window", str(window)),
        ("Spend", spend),
        ("Limit", limit),
        ("Resets", str(resets)),
        ("As of", str(alert.get("as_of"))),
    ]
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*spendgate:* {headline}"}},
            {"type": "section", "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{v}"} for k, v in fields]},
        ],
    }


def body_for(fmt: str, alert: Mapping[str, Any]) -> bytes:
    """The exact bytes POSTed (and signed): the alert record itself, or the Slack message."""
    return canonical(slack_message(alert) if fmt == "slack" else dict(alert))


# --- retries ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by attempts and by age (24 h by default)."""

    base_s: float = 1.0
    cap_s: float = 3600.0
    max_attempts: int = 40
    max_age_s: float = 86400.0
    max_retry_after_s: float = 3600.0

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt: half fixed, half jitter."""
        ceiling = min(self.cap_s, self.base_s * 2 ** max(attempts - 1, 0))
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)

    def schedule(self, attempts: int, rng: random.Random | None = None) -> list[float]:
        return [self.delay(n, rng) for n in range(1, attempts + 1)]


class Verdict(StrEnum):
    DELIVERED = "delivered"
    RETRY = "retry"
    GIVE_UP = "give_up"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    retry_in_s: float | None = None  # set for RETRY
    error: str | None = None


def retry_after_s(value: str | None, now: datetime) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) as seconds from ``now``."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def judge(
    policy: RetryPolicy,
    *,
    attempts: int,
    age_s: float,
    status: int | None,
    error: str | None = None,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> Outcome:
    """What one attempt's result means. ``attempts`` counts it; ``status`` None = no answer
    (timeout, refused connection: ``error`` says which).

    2xx: delivered. 408, 429, 5xx and no answer: retry (429 honours ``Retry-After``, capped)
    until ``max_attempts`` or ``max_age_s``. Any other status (e.g. 400, 404, 410): the
    receiver refused it for good; no retry.
    """
    if status is not None and 200 <= status < 300:
        return Outcome(Verdict.DELIVERED)
    reason = error if status is None else f"HTTP {status}"
    if status is not None and not (status in (408, 429) or status >= 500):
        return Outcome(Verdict.GIVE_UP, error=f"{reason} (not retried)")
    wait = policy.delay(attempts, rng)
    if status == 429 and retry_after is not None:
        wait = max(wait, min(retry_after, policy.max_retry_after_s))
    if attempts >= policy.max_attempts or age_s + wait > policy.max_age_s:
        return Outcome(Verdict.GIVE_UP, error=f"{reason} (gave up after {attempts} attempts)")
    return Outcome(Verdict.RETRY, retry_in_s=wait, error=reason)
