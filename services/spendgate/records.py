"""Wire records of every public topic (CONTRACT §2): frozen pydantic models, ``"v": 1``.

Money fields hold integer nano-dollars in Python and travel as decimal strings; the JSON
Schemas in ``schemas/`` are generated from these models (``make schemas``) and a test fails
when they drift.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)

from spendgate.domain.errors import InvalidInput
from spendgate.domain.money import format_usd, parse_cost, parse_usd
from spendgate.domain.registry import config_key
from spendgate.domain.scopes import validate_id

_MONEY_SCHEMA = {
    "type": "string",
    "pattern": r"^[0-9]+(\.[0-9]{1,9})?$",
    "description": "US dollars as a decimal string (a JSON number is accepted on input)",
}


def _cost(value: object) -> int:
    try:
        return parse_cost(value)
    except InvalidInput as exc:
        raise ValueError(exc.reason) from None


def _usd(value: object) -> int:
    try:
        return parse_usd(value)
    except InvalidInput as exc:
        raise ValueError(exc.reason) from None


CostUsd = Annotated[
    int,
    BeforeValidator(_cost),
    PlainSerializer(format_usd, return_type=str),
    WithJsonSchema({**_MONEY_SCHEMA, "type": ["string", "number"]}, mode="validation"),
    WithJsonSchema(_MONEY_SCHEMA, mode="serialization"),
]
"""A cost: 0..1,000,000 USD, nine decimals at most; nano-dollars in Python."""

Usd = Annotated[
    int,
    BeforeValidator(_usd),
    PlainSerializer(format_usd, return_type=str),
    WithJsonSchema(_MONEY_SCHEMA),
]
"""Any non-negative dollar amount (spend, limits); nano-dollars in Python.

Validation reads dollars (a decimal string, or a JSON number), so Python code building a
record passes ``format_usd(nanos)``, never a bare int of nano-dollars."""


def _id(value: str) -> str:
    try:
        return validate_id(value)
    except InvalidInput as exc:
        raise ValueError(exc.reason) from None


Id = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_id)]
"""An id: the one rule of ``domain.scopes.validate_id`` (no control characters, valid Unicode)."""
Timestamp = Annotated[datetime, PlainSerializer(lambda d: d.isoformat().replace("+00:00", "Z"))]


class Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    v: Literal[1] = 1


class Tokens(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    input: int | None = Field(default=None, ge=0)
    output: int | None = Field(default=None, ge=0)


class UsageEvent(Record):
    """One gateway event on ``spend.usage``. Unknown extra fields are ignored, not rejected.

    ``kind``: ``cost`` (the default) charges ``cost_usd`` and settles the hold of its
    ``request_id`` if one is outstanding; ``request`` charges nothing; ``hold`` reserves
    ``estimated_cost_usd`` for ``request_id`` until settled, released or ``hold_ttl_s`` after
    ``occurred_at``; ``release`` ends the hold of ``request_id`` (CONTRACT §2, holds).
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    event_id: Annotated[str, Field(min_length=1, max_length=128)]
    kind: Literal["cost", "request", "hold", "release"] = "cost"
    occurred_at: AwareDatetime
    key_id: Id
    end_user_id: Id | None = None
    model: Id | None = None
    tags: Annotated[list[Id], Field(max_length=64)] = Field(default_factory=list)
    cost_usd: CostUsd | None = None
    estimated_cost_usd: CostUsd | None = None
    request_id: Annotated[str, Field(max_length=256)] | None = None
    tokens: Tokens | None = None
    user_id: Id | None = None
    team_id: Id | None = None
    org_id: Id | None = None
    hold_ttl_s: Annotated[int, Field(ge=1, le=3600)] | None = Field(
        default=None, description="kind hold: seconds after occurred_at the hold expires (default 600)"
    )

    def model_post_init(self, _context: Any) -> None:
        if self.kind == "cost" and self.cost_usd is None:
            raise ValueError("cost_usd is required when kind is 'cost'")
        if self.kind in ("hold", "release") and not self.request_id:
            raise ValueError(f"request_id is required when kind is '{self.kind}'")
        if self.kind == "hold" and self.estimated_cost_usd is None:
            raise ValueError("estimated_cost_usd is required when kind is 'hold'")

    @property
    def charge_nanos(self) -> int:
        """What this event adds to spend: its cost, or nothing for a ``request`` announcement."""
        return self.cost_usd or 0 if self.kind == "cost" else 0


class DeadLetter(Record):
    """A record of ``spend.usage.dlq``: why a usage record was refused, and its raw bytes."""

    error: str
    raw: str = Field(description="the refused record's value, base64")
    topic: str
    partition: int
    offset: int


class Source(BaseModel):
    """Provenance: the last usage event (or config change) a record reflects."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    partition: int
    offset: int


@lru_cache(maxsize=4096)
def source_at(partition: int, offset: int) -> Source:
    """A shared (frozen) ``Source``: every scope a batch touches in one usage partition has the
    same last offset, and building a model per scope was ~3 µs of the worker's hot loop."""
    return Source(partition=partition, offset=offset)


Watermarks = Annotated[
    dict[Annotated[str, Field(pattern=r"^(0|[1-9][0-9]*)$")], Annotated[int, Field(ge=0)]],
    Field(
        description="usage partition (decimal string) -> last spend.usage offset applied to the scope: "
        "readers keep the record that reflects more usage (CONTRACT §2)"
    ),
]


class DecisionWindow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    window: str
    spend_usd: Usd
    limit_usd: Usd
    resets_at: Timestamp | None


class Decision(Record):
    """``spend.decisions``: a scope is blocked while some window has spend >= limit."""

    scope: str
    blocked: bool
    seq: int
    as_of: Timestamp
    windows: list[DecisionWindow] = Field(default_factory=list)
    source: Source | None = None
    watermarks: Watermarks | None = None


class StateWindow(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    window: str
    start: Timestamp | None
    resets_at: Timestamp | None
    spend_usd: Usd
    reserved_usd: Usd = Field(
        default=0, description="held by outstanding holds at as_of (counts until holds_expire_at at most)"
    )


class State(Record):
    """``spend.state``: the scope's spend in each window of its budget, plus ``total``."""

    scope: str
    as_of: Timestamp
    source: Source | None = None
    watermarks: Watermarks | None = None
    holds_expire_at: Timestamp | None = Field(
        default=None,
        description="when the last hold counted in reserved_usd expires: a reader counts reserved_usd "
        "only before it (a worker that stopped can never leave money held past the TTL)",
    )
    windows: list[StateWindow]


class Alert(Record):
    """``spend.alerts``: a soft limit crossed, a block, an unblock (once per window each)."""

    scope: str
    kind: Literal["soft_limit", "blocked", "unblocked"]
    window: str | None
    spend_usd: Usd | None = None
    limit_usd: Usd | None = None
    resets_at: Timestamp | None = None
    as_of: Timestamp


class _Config(Record):
    version: int = Field(ge=0, description="outbox sequence; readers ignore lower versions")


class OrgRecord(_Config):
    type: Literal["org"] = "org"
    org_id: Id


class TeamRecord(_Config):
    type: Literal["team"] = "team"
    team_id: Id
    org_id: Id | None = None


class KeyRecord(_Config):
    """A registered key. ``DELETE /v1/keys/K`` revokes: the record stays, with ``revoked: true``
    and its team and user, and the gate denies the key until an admin registers it again."""

    type: Literal["key"] = "key"
    key_id: Id
    user_id: Id | None = None
    team_id: Id | None = None
    revoked: bool = Field(default=False, description="deleted: every check of this key is denied")


class MemberRecord(_Config):
    type: Literal["member"] = "member"
    team_id: Id
    user_id: Id


class LimitBody(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    window: str
    max_usd: Usd
    soft_usd: Usd | None = None


class BudgetRecord(_Config):
    type: Literal["budget"] = "budget"
    scope: str
    limits: list[LimitBody] | None = None
    tz: str = "UTC"

    def limits_json(self) -> list[dict[str, Any]] | None:
        """The limits as a budget body writes them (no ``soft_usd`` when unset); ``None``: null."""
        return (
            None
            if self.limits is None
            else [lim.model_dump(mode="json", exclude_none=True) for lim in self.limits]
        )


class TokenRecord(_Config):
    type: Literal["token"] = "token"
    token_id: Id
    hash: str = Field(description="sha256 hex of the token")
    role: Literal["admin", "team_admin", "viewer", "gateway"]
    team_id: Id | None = None
    revoked: bool = False


ConfigRecord = Annotated[
    OrgRecord | TeamRecord | KeyRecord | MemberRecord | BudgetRecord | TokenRecord,
    Field(discriminator="type"),
]

AnyConfigRecord = OrgRecord | TeamRecord | KeyRecord | MemberRecord | BudgetRecord | TokenRecord


def config_ids(record: AnyConfigRecord) -> tuple[str, ...]:
    """The ids that name the record's entity (a member: team then user; a budget: its scope)."""
    if isinstance(record, OrgRecord):
        return (record.org_id,)
    if isinstance(record, TeamRecord):
        return (record.team_id,)
    if isinstance(record, KeyRecord):
        return (record.key_id,)
    if isinstance(record, MemberRecord):
        return (record.team_id, record.user_id)
    if isinstance(record, BudgetRecord):
        return (record.scope,)
    return (record.token_id,)


def config_key_of(record: AnyConfigRecord) -> str:
    """The record's ``spend.config`` key (``domain.registry.config_key``)."""
    return config_key(record.type, *config_ids(record))


def public(record: BaseModel | None) -> dict[str, Any] | None:
    """The HTTP / audit view of a config record: no envelope fields, never a token hash."""
    if record is None:
        return None
    exclude = {"v", "type", "hash"} if isinstance(record, TokenRecord) else {"v", "type"}
    return record.model_dump(mode="json", exclude=exclude)


SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "usage": UsageEvent,
    "usage.dlq": DeadLetter,
    "decision": Decision,
    "state": State,
    "alert": Alert,
    "config.org": OrgRecord,
    "config.team": TeamRecord,
    "config.key": KeyRecord,
    "config.member": MemberRecord,
    "config.budget": BudgetRecord,
    "config.token": TokenRecord,
}


def schema_documents() -> dict[str, dict[str, Any]]:
    """File name -> JSON Schema of every record (validation mode for inputs)."""
    docs: dict[str, dict[str, Any]] = {}
    for name, model in SCHEMA_MODELS.items():
        mode: Literal["validation", "serialization"] = (
            "validation" if model is UsageEvent else "serialization"
        )
        doc = model.model_json_schema(mode=mode)
        doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        doc["$id"] = f"https://spendgate.dev/schemas/{name}.schema.json"
        docs[f"{name}.schema.json"] = doc
    return docs


def export_schemas(directory: Path) -> list[Path]:
    """Write ``schemas/*.schema.json``; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_name, doc in schema_documents().items():
        path = directory / file_name
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
