"""Reading ``spend.usage`` records: a fast path for the common shape, the model for the rest.

:class:`~spendgate.records.UsageEvent` (pydantic) is the definition: the JSON Schema is
generated from it and its errors are the dead letters' reasons. Validating every event through
it cost about half of stage A, so :func:`parse_usage` first tries :func:`_fast`, one
hand-written check of the shape gateways send (string money, RFC 3339 ``occurred_at`` with a
``T``, ids as plain strings, ...). The fast path only *accepts*: anything it is not sure of
(a JSON number for a cost, a space in a timestamp, a wrong type, any rule broken) goes to the
model, which accepts it or explains why not. So the fast path never decides a rejection, and
what it accepts the model accepts with the same values: ``tests/unit/test_usage_fast_path.py``
feeds both paths the same random valid, near-valid and garbage records and checks that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson
from pydantic import ValidationError

from spendgate.domain.errors import InvalidInput
from spendgate.domain.money import parse_cost
from spendgate.domain.scopes import MAX_ID_LENGTH
from spendgate.records import UsageEvent

_KINDS = frozenset(("cost", "request", "hold", "release"))
#: ids: 1..256 characters, no control characters, no lone surrogates (``domain.scopes.validate_id``)
_BAD_ID = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
#: what the fast path reads itself; anything else (``2026-01-01 00:00Z``, ``...t...``, 7+
#: fraction digits, odd offsets) is left to the model
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])",
    re.ASCII,
)
_ID_FIELDS = ("end_user_id", "model", "user_id", "team_id", "org_id")


@dataclass(frozen=True, slots=True)
class Usage:
    """A valid usage event, as stage A reads it (the fields of ``records.UsageEvent``)."""

    event_id: str
    occurred_at: datetime
    key_id: str
    kind: str = "cost"
    end_user_id: str | None = None
    model: str | None = None
    tags: list[str] = field(default_factory=list)
    cost_usd: int | None = None
    estimated_cost_usd: int | None = None
    request_id: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    org_id: str | None = None
    hold_ttl_s: int | None = None

    @property
    def charge_nanos(self) -> int:
        """What this event adds to spend: its cost, or nothing for a ``request`` announcement."""
        return self.cost_usd or 0 if self.kind == "cost" else 0

    @classmethod
    def of(cls, event: UsageEvent) -> Usage:
        return cls(
            event.event_id,
            event.occurred_at,
            event.key_id,
            event.kind,
            event.end_user_id,
            event.model,
            list(event.tags),
            event.cost_usd,
            event.estimated_cost_usd,
            event.request_id,
            event.user_id,
            event.team_id,
            event.org_id,
            event.hold_ttl_s,
        )


def parse_usage(value: bytes | None) -> Usage:
    """Validate one raw record; raises ``ValueError`` with a readable reason when invalid."""
    fast = _fast(value) if value is not None else None
    return fast if fast is not None else Usage.of(parse_usage_model(value))


def parse_usage_model(value: bytes | None) -> UsageEvent:
    """The model's verdict (the slow path): the event, or ``ValueError`` with the reason."""
    if value is None:
        raise ValueError("empty record (null value)")
    try:
        return UsageEvent.model_validate_json(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "record"
        if first.get("type") == "json_invalid":
            raise ValueError(f"invalid JSON: {first.get('msg')}") from None
        raise ValueError(f"{where}: {first.get('msg')}") from None


def _fast(value: bytes) -> Usage | None:
    """The event when ``value`` has the common shape and breaks no rule; None: ask the model."""
    try:
        data = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict:
        return None
    get = data.get
    version, event_id, key_id = get("v", 1), get("event_id"), get("key_id")
    kind, at = get("kind", "cost"), get("occurred_at")
    if not (
        type(version) is int
        and version == 1
        and type(event_id) is str
        and 0 < len(event_id) <= 128
        and _is_id(key_id)
        and type(at) is str
        and kind in _KINDS
        and _RFC3339.fullmatch(at)
        and all(_is_id(get(name)) or get(name) is None for name in _ID_FIELDS)
    ):
        return None
    tags, request_id, ttl = get("tags", []), get("request_id"), get("hold_ttl_s")
    if type(tags) is not list or len(tags) > 64 or not all(_is_id(tag) for tag in tags):
        return None
    if not (request_id is None or (type(request_id) is str and len(request_id) <= 256)):
        return None
    if not (ttl is None or (type(ttl) is int and 1 <= ttl <= 3600)):
        return None
    if not _tokens_ok(get("tokens")):
        return None
    cost, estimate = _money(get("cost_usd")), _money(get("estimated_cost_usd"))
    if cost is False or estimate is False:
        return None
    if kind == "cost" and cost is None:
        return None
    if kind in ("hold", "release") and not request_id:
        return None
    if kind == "hold" and estimate is None:
        return None
    try:
        occurred_at = datetime.fromisoformat(at)
    except ValueError:  # e.g. February 30th: the model says so
        return None
    return Usage(
        event_id,
        occurred_at,
        key_id,  # type: ignore[arg-type]
        kind,  # type: ignore[arg-type]
        get("end_user_id"),
        get("model"),
        tags,
        cost,  # type: ignore[arg-type]
        estimate,  # type: ignore[arg-type]
        request_id,
        get("user_id"),
        get("team_id"),
        get("org_id"),
        ttl,
    )


def _is_id(value: Any) -> bool:
    return type(value) is str and 0 < len(value) <= MAX_ID_LENGTH and not _BAD_ID.search(value)


def _money(value: Any) -> int | None | bool:
    """Nano-dollars of a decimal string (``money.parse_cost``, as the model reads it); None
    when absent; False when the model must judge it (a JSON number, an invalid amount)."""
    if value is None:
        return None
    if type(value) is not str:
        return False
    try:
        return parse_cost(value)  # what the model's validator calls
    except InvalidInput:
        return False


def _tokens_ok(tokens: Any) -> bool:
    if tokens is None:
        return True
    if type(tokens) is not dict:
        return False
    counts = (tokens.get("input"), tokens.get("output"))
    return all(n is None or (type(n) is int and n >= 0) for n in counts)
