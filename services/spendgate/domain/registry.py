"""The registry as every reader holds it in memory: keys, teams, orgs, members, budgets, tokens.

Built only from ``spend.config`` records (the worker and the gate) or from Postgres rows (the
control plane), never from a usage event or a check request. ``apply`` is idempotent and
ignores stale versions, so replaying the topic, or a relay republishing everything, converges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote as _unquote

from spendgate.domain.budgets import NO_BUDGET, Budget, parse_budget_fields
from spendgate.domain.scopes import encode_id


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A registered key. A revoked one keeps its user and team: its spend (events are facts)
    is still charged to them, and the gate denies every check of it."""

    user_id: str | None = None
    team_id: str | None = None
    revoked: bool = False


@dataclass(frozen=True, slots=True)
class TokenInfo:
    token_id: str
    hash: str
    role: str
    team_id: str | None
    revoked: bool


@dataclass(frozen=True, slots=True)
class ConfigChange:
    """What one applied config record changed: its type and, for a budget, the scope."""

    type: str
    key: str
    scope: str | None = None


@dataclass
class RegistryView:
    keys: dict[str, KeyInfo] = field(default_factory=dict)
    team_orgs: dict[str, str | None] = field(default_factory=dict)
    orgs: set[str] = field(default_factory=set)
    members: set[tuple[str, str]] = field(default_factory=set)
    budgets: dict[str, Budget] = field(default_factory=dict)
    tokens: dict[str, TokenInfo] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)

    def budget(self, scope: str) -> Budget:
        return self.budgets.get(scope, NO_BUDGET)

    def apply(self, key: str, value: Mapping[str, Any] | None) -> ConfigChange | None:
        """Apply one ``spend.config`` record; ``None`` when it was stale or changed nothing.

        ``value`` is the decoded JSON (``None`` = deleted). The record type comes from the key
        prefix (``budget/…``, ``key/…``, …) so a tombstone can be applied too.
        """
        type_, _, ident = key.partition("/")
        version = -1
        if value is not None:
            version = int(value.get("version", 0))
            if version < self.versions.get(key, -1):
                return None
        handler = _HANDLERS.get(type_)
        # A malformed record raises (KeyError, InvalidInput …) before anything changes, and its
        # version must not become the floor either, or it would hide the valid records after it.
        change = handler(self, key, ident, value) if handler else None
        # A tombstone keeps the key's version as a floor: a stale record re-sent after the
        # delete (a relay retry) must not bring the entity back; a re-create has a higher one.
        if value is not None:
            self.versions[key] = version
        return change

    def _key(self, key: str, ident: str, value: Mapping[str, Any] | None) -> ConfigChange:
        key_id = value["key_id"] if value else _unquote(ident)
        if value is None:
            self.keys.pop(key_id, None)
        else:
            revoked = bool(value.get("revoked"))
            self.keys[key_id] = KeyInfo(value.get("user_id"), value.get("team_id"), revoked)
        return ConfigChange("key", key)

    def _team(self, key: str, ident: str, value: Mapping[str, Any] | None) -> ConfigChange:
        team_id = value["team_id"] if value else _unquote(ident)
        if value is None:
            self.team_orgs.pop(team_id, None)
        else:
            self.team_orgs[team_id] = value.get("org_id")
        return ConfigChange("team", key)

    def _org(self, key: str, ident: str, value: Mapping[str, Any] | None) -> ConfigChange:
        org_id = value["org_id"] if value else _unquote(ident)
        if value is None:
            self.orgs.discard(org_id)
        else:
            self.orgs.add(org_id)
        return ConfigChange("org", key)

    def _member(self, key: str, ident: str, value: Mapping[str, Any] | None) -> ConfigChange:
        if value is None:
            team_id, _, user_id = ident.partition("/")
            self.members.discard((_unquote(team_id), _unquote(user_id)))
        else:
            self.members.add((value["team_id"], value["user_id"]))
        return ConfigChange("member", key)

    def _budget(self, key: str, ident: str, value: Mapping[str, Any] | None) -> ConfigChange:
        scope = value["scope"] if value else ident
        if value is None:
            self.budgets.pop(scope, None)
        else:
            budget = parse_budget_fields(value.get("limits"), value.get("tz") or "UTC")
            if budget.is_unlimited:
                self.budgets.pop(scope, None)
            else:
                self.budgets[scope] = budget
        return ConfigChange("budget", key, scope)

    def _token(self, key: str, ident: str, value: Mapping[str, Any] | None) -> ConfigChange:
        token_id = value["token_id"] if value else _unquote(ident)
        if value is None:
            self.tokens.pop(token_id, None)
        else:
            self.tokens[token_id] = TokenInfo(
                token_id, value["hash"], value["role"], value.get("team_id"), bool(value.get("revoked"))
            )
        return ConfigChange("token", key)


_HANDLERS = {
    "key": RegistryView._key,
    "team": RegistryView._team,
    "org": RegistryView._org,
    "member": RegistryView._member,
    "budget": RegistryView._budget,
    "token": RegistryView._token,
}


def config_key(type_: str, *ids: str) -> str:
    """The ``spend.config`` key of an entity: ``key/k1``, ``member/t1/u1``, ``budget/team:t1``.

    Budget keys carry the scope text as it is (already encoded); entity ids are encoded.
    """
    if type_ == "budget":
        return f"budget/{ids[0]}"
    return f"{type_}/" + "/".join(encode_id(i) for i in ids)
