"""Attribution: the scope set one event (or one check request) is charged to / judged by.

CONTRACT §1: registry first, the request's own fields second. Per-request fields
(``end_user_id``, ``model``, ``tags``) are read from the argument only and never stored, so one
end user's budget can never be applied to the next request on the same key.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Protocol
from urllib.parse import quote

from spendgate.domain.registry import RegistryView


class ScopeFields(Protocol):
    """What attribution reads: a usage event and a check request both have these."""

    @property
    def key_id(self) -> str: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def team_id(self) -> str | None: ...
    @property
    def org_id(self) -> str | None: ...
    @property
    def end_user_id(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def tags(self) -> Sequence[str] | None: ...


@lru_cache(maxsize=262_144)
def _enc(part: str) -> str:
    return quote(part, safe="")


def scopes_for(fields: ScopeFields, registry: RegistryView) -> list[str]:
    """Every scope string ``fields`` is charged to, without duplicates, in a stable order."""
    key_id = fields.key_id
    registered = registry.keys.get(key_id)
    user_id = (registered.user_id if registered else None) or fields.user_id
    team_id = (registered.team_id if registered else None) or fields.team_id
    org_id = (registry.team_orgs.get(team_id) if team_id else None) or fields.org_id
    key = _enc(key_id)
    scopes = [f"key:{key}"]
    if user_id:
        scopes.append(f"user:{_enc(user_id)}")
    if team_id:
        scopes.append(f"team:{_enc(team_id)}")
        if user_id:
            scopes.append(f"member:{_enc(team_id)}/{_enc(user_id)}")
    if org_id:
        scopes.append(f"org:{_enc(org_id)}")
    if fields.end_user_id:
        scopes.append(f"end_user:{_enc(fields.end_user_id)}")
    if fields.model:
        model = _enc(fields.model)
        scopes.append(f"model:{model}")
        scopes.append(f"key_model:{key}/{model}")
    for tag in fields.tags or ():
        scope = f"tag:{_enc(tag)}"
        if scope not in scopes:
            scopes.append(scope)
    return scopes
