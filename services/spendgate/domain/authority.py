"""Who may do what on the control plane and the gate (CONTRACT §4), as one pure function.

``authorize`` takes everything it needs as arguments (the caller's principal, the action, the
target, and the registry facts the rule depends on) and answers ``Allowed`` or
``Denied(reason, code)``; a deny is data, never an exception. The adapter that calls it reads
those facts in the same transaction as the write they guard.

Rules:
- ``admin`` may do anything.
- ``team_admin`` of team T may read T (the team, its members, keys and budgets), add/remove
  members of T, revoke (DELETE) keys of T, and set or remove budgets on ``key:K`` (K in T),
  ``member:T/U`` and ``key_model:K/M`` (K in T). Every limit it sets must be <= team T's limit
  for the same window when T's budget has one; the ceiling is always the parent team's budget,
  never anything about the caller's own token (seed 000 in docs/FAILURE-MODES.md). It may not
  mint or revoke tokens: a gateway token can ingest spend for any key and a viewer token can
  read every team, both beyond T's authority.
- Registering a key (PUT) as ``team_admin`` of T, so that no constraint an admin set can be
  escaped (issue 11):
  - into T only; a key already registered must be in T and not revoked (un-revoking takes an
    admin), and its user may not change (that would leave the user's budget);
  - a key not registered must be new to spendgate: no recorded spend and no budget on it
    (``key_in_use``); claiming a key in use, or one whose use is unknown yet, takes an admin;
  - a new key's user, if any, must be a member of T.
- ``viewer`` reads everything but tokens and the audit log.
- ``gateway`` may only check and ingest.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from spendgate.domain.budgets import Budget
from spendgate.domain.errors import Forbidden
from spendgate.domain.money import format_usd
from spendgate.domain.scopes import Scope, ScopeKind


class Role(StrEnum):
    ADMIN = "admin"
    TEAM_ADMIN = "team_admin"
    VIEWER = "viewer"
    GATEWAY = "gateway"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``team_id`` is set for ``team_admin`` (and team-bound tokens)."""

    role: Role
    team_id: str | None = None
    token_id: str = "anonymous"


class Action(StrEnum):
    READ = "read"
    WRITE = "write"  # PUT of a registry entity or budget; minting a token
    DELETE = "delete"  # DELETE of an entity or budget; revoking a token
    CHECK = "check"  # gate: /v1/check, /v1/authorize, /v1/spend
    INGEST = "ingest"  # gate: /v1/events


@dataclass(frozen=True, slots=True)
class OrgTarget:
    org_id: str


@dataclass(frozen=True, slots=True)
class TeamTarget:
    """Team T itself; also what listing T's members, keys or budgets reads."""

    team_id: str


@dataclass(frozen=True, slots=True)
class KeyTarget:
    """Key K; ``team_id``, ``user_id``: what a WRITE sets (the current ones come as facts)."""

    key_id: str
    team_id: str | None = None
    user_id: str | None = None


@dataclass(frozen=True, slots=True)
class MemberTarget:
    team_id: str
    user_id: str


@dataclass(frozen=True, slots=True)
class BudgetTarget:
    """The budget on ``scope``; ``budget`` is the one a WRITE sets."""

    scope: Scope
    budget: Budget | None = None


@dataclass(frozen=True, slots=True)
class TokenTarget:
    """A token being minted (``role``, ``team_id``) or revoked."""

    role: Role | None = None
    team_id: str | None = None


@dataclass(frozen=True, slots=True)
class AuditTarget:
    pass


@dataclass(frozen=True, slots=True)
class CollectionTarget:
    """Every entity of a kind (``orgs``, ``teams``, ``keys``, ``budgets``), across all teams."""

    kind: str


@dataclass(frozen=True, slots=True)
class GateTarget:
    pass


Target = (
    OrgTarget
    | TeamTarget
    | KeyTarget
    | MemberTarget
    | BudgetTarget
    | TokenTarget
    | AuditTarget
    | CollectionTarget
    | GateTarget
)


@dataclass(frozen=True, slots=True)
class Allowed:
    def __bool__(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Denied:
    """``code`` is ``forbidden`` or ``ceiling_exceeded`` (both answered 403)."""

    reason: str
    code: str = "forbidden"

    def __bool__(self) -> bool:
        return False


Decision = Allowed | Denied

ALLOWED = Allowed()


def require(decision: Decision) -> None:
    """Raise ``Forbidden`` (with the denial's code) unless ``decision`` allows."""
    if isinstance(decision, Denied):
        raise Forbidden(decision.reason, code=decision.code)


def authorize(
    principal: Principal,
    action: Action,
    target: Target,
    *,
    team_of_key: str | None = None,
    key_exists: bool = False,
    parent_budget: Budget | None = None,
    key_user: str | None = None,
    key_revoked: bool = False,
    key_in_use: bool | None = False,
    user_is_member: bool = False,
) -> Decision:
    """May ``principal`` do ``action`` on ``target``?

    - ``team_of_key``: the registry team of the key the target names (``KeyTarget``, or a
      ``key:K`` / ``key_model:K/M`` budget scope); ``None`` when the key has no team or is unknown.
      A revoked key keeps its team.
    - ``key_exists``: whether that key is registered at all (revoked keys are).
    - ``parent_budget``: the budget of the team that owns the target scope (for a budget WRITE
      by a team admin); ``None`` or no limits means no ceiling.
    - For a key WRITE: ``key_user`` (its registered user), ``key_revoked``, ``key_in_use``
      (an unregistered key has recorded spend or a budget; ``None`` = cannot tell yet) and
      ``user_is_member`` (the user the WRITE sets is a member of the target team).

    Pure: no I/O, same answer for the same arguments.
    """
    role = principal.role
    if role is Role.ADMIN:
        return ALLOWED
    if role is Role.GATEWAY:
        if isinstance(target, GateTarget) and action in (Action.CHECK, Action.INGEST):
            return ALLOWED
        return Denied("a gateway token may only check and ingest")
    if isinstance(target, GateTarget):
        return Denied(f"role {role} may not check or ingest; use a gateway token")
    if role is Role.VIEWER:
        if action is not Action.READ:
            return Denied("a viewer token is read-only")
        if isinstance(target, TokenTarget | AuditTarget):
            return Denied("only an admin may read tokens and the audit log")
        return ALLOWED
    if role is Role.TEAM_ADMIN:
        if isinstance(target, KeyTarget) and action is Action.WRITE:
            facts = _KeyFacts(team_of_key, key_exists, key_user, key_revoked, key_in_use, user_is_member)
            return _team_admin_key_write(principal.team_id, target, facts)
        return _team_admin(principal, action, target, team_of_key, parent_budget)
    return Denied(f"unknown role {role}")  # pragma: no cover - Role is closed


def _team_admin(
    principal: Principal,
    action: Action,
    target: Target,
    team_of_key: str | None,
    parent_budget: Budget | None,
) -> Decision:
    team = principal.team_id
    if team is None:
        return Denied("this team_admin token is bound to no team")
    if action not in (Action.READ, Action.WRITE, Action.DELETE):
        return Denied(f"a team_admin may not {action}")
    not_yours = f"team_admin of team {team} may only act on team {team}"
    match target:
        case TeamTarget(team_id=t):
            if t != team:
                return Denied(not_yours)
            if action is Action.READ:
                return ALLOWED
            return Denied("only an admin may create, change or delete teams")
        case KeyTarget(key_id=k):
            if team_of_key != team:
                return Denied(f"key {k} is not in team {team}")
            return ALLOWED
        case MemberTarget(team_id=t):
            return ALLOWED if t == team else Denied(not_yours)
        case BudgetTarget(scope=scope, budget=budget):
            return _team_admin_budget(team, action, scope, budget, team_of_key, parent_budget)
        case OrgTarget():
            if action is Action.READ:
                return Denied("only an admin or a viewer may read orgs")
            return Denied("only an admin may create or delete orgs")
        case TokenTarget():
            if action is Action.READ:
                return Denied("only an admin may list tokens")
            return Denied("only an admin may mint or revoke tokens")
        case AuditTarget():
            return Denied("only an admin may read the audit log")
        case CollectionTarget(kind=kind):
            return Denied(f"a team_admin lists {kind} of its own team only (filter by team_id={team})")
    return Denied(not_yours)


def team_admin_may_read(team: str, kind: str, owner: str, team_of_key: str | None) -> bool:
    """The team-admin rule on a scope: its own team, a member of it, or one of its keys (by the
    scope's kind and first id part, decoded); never a user, model, tag, end user or org scope.
    ``authorize`` applies it, and so does the dashboard's filter over 100,000 scope texts."""
    if kind in (ScopeKind.TEAM, ScopeKind.MEMBER):
        return owner == team
    if kind in (ScopeKind.KEY, ScopeKind.KEY_MODEL):
        return team_of_key == team
    return False


def _team_admin_budget(
    team: str,
    action: Action,
    scope: Scope,
    budget: Budget | None,
    team_of_key: str | None,
    parent_budget: Budget | None,
) -> Decision:
    if not team_admin_may_read(team, scope.kind, scope.parts[0], team_of_key):
        return Denied(_outside_team(team, action, scope))
    if scope.kind is ScopeKind.TEAM and action is not Action.READ:
        return Denied(f"only an admin may {_VERB[action]} the budget of team {team}")
    if action is Action.WRITE and budget is not None:
        return within_ceiling(budget, parent_budget, team)
    return ALLOWED


def _outside_team(team: str, action: Action, scope: Scope) -> str:
    kind = scope.kind
    if kind is ScopeKind.TEAM:
        return f"team_admin of team {team} may only act on team {team}"
    if kind is ScopeKind.MEMBER:
        return f"member scope {scope} is not in team {team}"
    if kind in (ScopeKind.KEY, ScopeKind.KEY_MODEL):
        return f"key {scope.parts[0]} is not in team {team}"
    if action is Action.READ:
        return f"a team_admin may not read {kind} scopes, only those of its own team"
    return f"a team_admin may not {_VERB[action]} {kind} budgets"


_VERB = {Action.READ: "read", Action.WRITE: "set", Action.DELETE: "remove"}


@dataclass(frozen=True, slots=True)
class _KeyFacts:
    team: str | None
    exists: bool
    user: str | None
    revoked: bool
    in_use: bool | None
    user_is_member: bool


def _team_admin_key_write(team: str | None, target: KeyTarget, facts: _KeyFacts) -> Decision:
    """PUT /v1/keys/K by a team admin: new keys into T, or keys of T without escaping anything."""
    if team is None:
        return Denied("this team_admin token is bound to no team")
    k, new_team, new_user = target.key_id, target.team_id, target.user_id
    if new_team != team:
        return Denied(f"team_admin of team {team} may only register keys into team {team}")
    if facts.exists:
        if facts.team != team:
            return Denied(f"key {k} is registered outside team {team}; claiming a key in use takes an admin")
        if facts.revoked:
            return Denied(f"key {k} is revoked; only an admin may re-register it")
        if new_user != facts.user:
            return Denied(
                f"a team_admin may not change the user of key {k} "
                f"(registered user: {facts.user or 'none'}); ask an admin"
            )
        return ALLOWED
    if facts.in_use is None:
        return Denied(
            f"cannot tell yet whether key {k} has recorded spend (the gate is still catching up); "
            "retry, or ask an admin"
        )
    if facts.in_use:
        return Denied(
            f"key {k} is not new to spendgate (it has recorded spend or a budget); "
            "claiming a key in use takes an admin"
        )
    if new_user is not None and not facts.user_is_member:
        return Denied(
            f"user {new_user} is not a member of team {team}; "
            f"a team_admin may set a new key's user only to a member of team {team}"
        )
    return ALLOWED


def within_ceiling(budget: Budget, parent_budget: Budget | None, team: str) -> Decision:
    """Each limit of ``budget`` must be <= the parent team's limit for the same window, if any."""
    if parent_budget is None:
        return ALLOWED
    for lim in budget.limits:
        ceiling = parent_budget.limit_for(lim.window)
        if ceiling is not None and lim.max_nanos > ceiling.max_nanos:
            return Denied(
                f"limit {format_usd(lim.max_nanos)} for window {lim.window} exceeds "
                f"team {team}'s limit {format_usd(ceiling.max_nanos)}",
                code="ceiling_exceeded",
            )
    return ALLOWED
