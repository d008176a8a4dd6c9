"""Small factories for test data: build records through these, not copied JSON.

Each returns a valid object by default; keyword overrides replace (or, with ``None``, clear)
single fields, so a test states only what it is about.
"""

from __future__ import annotations

import itertools
from typing import Any

from spendgate.domain.budgets import Budget, parse_budget
from spendgate.records import UsageEvent

_ids = itertools.count(1)


def usage_event_body(**overrides: Any) -> dict[str, Any]:
    """The JSON body of a valid ``kind=cost`` usage event (before validation)."""
    body: dict[str, Any] = {
        "v": 1,
        "event_id": f"evt-{next(_ids)}",
        "kind": "cost",
        "occurred_at": "2026-11-23T10:00:00.123Z",
        "key_id": "k1",
        "cost_usd": "0.001230",
    }
    body.update(overrides)
    return body


def usage_event(**overrides: Any) -> UsageEvent:
    """A validated ``UsageEvent``; ``usage_event(end_user_id="alice", model="openai/gpt-4o")``."""
    return UsageEvent.model_validate(usage_event_body(**overrides))


def budget(*limits: tuple[str, str] | tuple[str, str, str], tz: str = "UTC") -> Budget:
    """``budget(("1h", "10"), ("1mo", "500", "400"))``: limits as (window, max[, soft])."""
    raw = []
    for lim in limits:
        item = {"window": lim[0], "max_usd": lim[1]}
        if len(lim) > 2:
            item["soft_usd"] = lim[2]  # type: ignore[misc]
        raw.append(item)
    return parse_budget({"limits": raw, "tz": tz})


def config_record(type_: str, version: int = 1, **fields: Any) -> dict[str, Any]:
    """A decoded ``spend.config`` value: ``config_record("key", 3, key_id="k1", team_id="t1")``."""
    defaults: dict[str, dict[str, Any]] = {
        "org": {"org_id": "o1"},
        "team": {"team_id": "t1", "org_id": None},
        "key": {"key_id": "k1", "user_id": None, "team_id": None},
        "member": {"team_id": "t1", "user_id": "u1"},
        "budget": {"scope": "team:t1", "limits": [{"window": "1d", "max_usd": "100"}], "tz": "UTC"},
        "token": {"token_id": "tok1", "hash": "0" * 64, "role": "viewer", "team_id": None, "revoked": False},
    }
    return {"v": 1, "type": type_, "version": version, **defaults[type_], **fields}
