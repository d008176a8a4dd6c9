"""domain.authority.authorize: every role x action x target kind, plus the budget ceiling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from spendgate.domain.authority import (
    Action,
    Allowed,
    AuditTarget,
    BudgetTarget,
    CollectionTarget,
    Denied,
    GateTarget,
    KeyTarget,
    MemberTarget,
    OrgTarget,
    Principal,
    Role,
    Target,
    TeamTarget,
    TokenTarget,
    authorize,
)
from spendgate.domain.budgets import Budget, parse_budget
from spendgate.domain.scopes import Scope

R, W, D, C, IN = Action.READ, Action.WRITE, Action.DELETE, Action.CHECK, Action.INGEST
ALL = frozenset(Action)
NONE: frozenset[Action] = frozenset()
RWD = frozenset({R, W, D})

ADMIN = Principal(Role.ADMIN, None, "adm")
TEAM_ADMIN = Principal(Role.TEAM_ADMIN, "t1", "ta")  # of team t1
VIEWER = Principal(Role.VIEWER, None, "v")
GATEWAY = Principal(Role.GATEWAY, None, "g")


def budget(**limits: str) -> Budget:
    return parse_budget(
        {"limits": [{"window": w.removeprefix("w"), "max_usd": v} for w, v in limits.items()]}
    )


@dataclass(frozen=True)
class Case:
    name: str
    target: Target
    team_admin: frozenset[Action]  # what team_admin of t1 may do
    viewer_reads: bool = True
    ctx: dict[str, Any] = field(default_factory=dict)


def bscope(text: str, *, team_admin: frozenset[Action], **ctx: Any) -> Case:
    return Case(f"budget {text}", BudgetTarget(Scope.parse(text), budget(w1mo="10")), team_admin, ctx=ctx)


OWN_KEY = {"team_of_key": "t1", "key_exists": True}
OTHER_KEY = {"team_of_key": "t2", "key_exists": True}

CASES = [
    Case("org", OrgTarget("o1"), NONE),
    Case("own team", TeamTarget("t1"), frozenset({R})),
    Case("other team", TeamTarget("t2"), NONE),
    Case("key in own team", KeyTarget("k1", "t1"), RWD, ctx=OWN_KEY),
    Case("new key into own team", KeyTarget("k9", "t1"), frozenset({W})),
    Case("key in other team", KeyTarget("k2", "t2"), NONE, ctx=OTHER_KEY),
    Case("moving other team's key into own", KeyTarget("k2", "t1"), NONE, ctx=OTHER_KEY),
    Case("moving own key to other team", KeyTarget("k1", "t2"), frozenset({R, D}), ctx=OWN_KEY),
    Case("claiming a teamless key", KeyTarget("k3", "t1"), NONE, ctx={"key_exists": True}),
    Case("member of own team", MemberTarget("t1", "u1"), RWD),
    Case("member of other team", MemberTarget("t2", "u1"), NONE),
    bscope("key:k1", team_admin=RWD, **OWN_KEY),
    bscope("key:k2", team_admin=NONE, **OTHER_KEY),
    bscope("key:unknown", team_admin=NONE),
    bscope("key_model:k1/openai%2Fgpt-4o", team_admin=RWD, **OWN_KEY),
    bscope("key_model:k2/openai%2Fgpt-4o", team_admin=NONE, **OTHER_KEY),
    bscope("member:t1/u1", team_admin=RWD),
    bscope("member:t2/u1", team_admin=NONE),
    bscope("team:t1", team_admin=frozenset({R})),
    bscope("team:t2", team_admin=NONE),
    bscope("user:u1", team_admin=NONE),
    bscope("org:o1", team_admin=NONE),
    bscope("end_user:alice", team_admin=NONE),
    bscope("model:openai%2Fgpt-4o", team_admin=NONE),
    bscope("tag:prod", team_admin=NONE),
    Case("token", TokenTarget(Role.GATEWAY), NONE, viewer_reads=False),
    Case("team_admin token for own team", TokenTarget(Role.TEAM_ADMIN, "t1"), NONE, viewer_reads=False),
    Case("audit log", AuditTarget(), NONE, viewer_reads=False),
    Case("all keys", CollectionTarget("keys"), NONE),
    Case("gate", GateTarget(), NONE, viewer_reads=False),
]


def expected(principal: Principal, case: Case) -> frozenset[Action]:
    if principal.role is Role.ADMIN:
        return ALL
    if principal.role is Role.GATEWAY:
        return frozenset({C, IN}) if isinstance(case.target, GateTarget) else NONE
    if principal.role is Role.VIEWER:
        return frozenset({R}) if case.viewer_reads else NONE
    return case.team_admin


@pytest.mark.parametrize("principal", [ADMIN, TEAM_ADMIN, VIEWER, GATEWAY], ids=lambda p: p.role.value)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("action", list(Action), ids=lambda a: a.value)
def test_authority_table(principal: Principal, case: Case, action: Action) -> None:
    decision = authorize(principal, action, case.target, **case.ctx)
    should = action in expected(principal, case)
    assert isinstance(decision, Allowed if should else Denied), (principal.role, action, case.name, decision)
    if isinstance(decision, Denied):
        assert decision.reason


def test_team_admin_key_budget_within_team_limit_is_allowed() -> None:
    team = budget(w1mo="1000")
    decision = authorize(
        TEAM_ADMIN, W, BudgetTarget(Scope.parse("key:k1"), budget(w1mo="100")), parent_budget=team, **OWN_KEY
    )
    assert decision == Allowed()


def test_team_admin_key_budget_above_team_limit_is_refused_naming_the_ceiling() -> None:
    team = budget(w1mo="1000")
    decision = authorize(
        TEAM_ADMIN, W, BudgetTarget(Scope.parse("key:k1"), budget(w1mo="2000")), parent_budget=team, **OWN_KEY
    )
    assert isinstance(decision, Denied)
    assert decision.code == "ceiling_exceeded"
    assert decision.reason == "limit 2000 for window 1mo exceeds team t1's limit 1000"


def test_ceiling_is_the_parent_team_budget_not_the_callers_token() -> None:
    # A session-like principal carries no budget at all: only the team's budget can bind
    # (seed 000 in docs/FAILURE-MODES.md).
    team = budget(w1mo="1000")
    for amount in ("0.01", "100", "999.999999999", "1000"):
        target = BudgetTarget(Scope.parse("member:t1/alice"), budget(w1mo=amount))
        assert authorize(TEAM_ADMIN, W, target, parent_budget=team) == Allowed()


def test_ceiling_only_applies_to_windows_the_team_limits() -> None:
    team = budget(w1mo="1000")
    target = BudgetTarget(Scope.parse("key:k1"), budget(w1d="5000"))
    assert authorize(TEAM_ADMIN, W, target, parent_budget=team, **OWN_KEY) == Allowed()


def test_team_without_budget_sets_no_ceiling() -> None:
    target = BudgetTarget(Scope.parse("key:k1"), budget(w1mo="1000000"))
    assert authorize(TEAM_ADMIN, W, target, parent_budget=None, **OWN_KEY) == Allowed()
    assert authorize(TEAM_ADMIN, W, target, parent_budget=Budget(), **OWN_KEY) == Allowed()


def test_member_budget_without_limits_is_allowed() -> None:
    team = budget(w1mo="1000")
    for body in ({"limits": None}, {"limits": []}):
        target = BudgetTarget(Scope.parse("member:t1/alice"), parse_budget(body))
        assert authorize(TEAM_ADMIN, W, target, parent_budget=team) == Allowed()


def test_admin_is_not_bound_by_the_team_ceiling() -> None:
    target = BudgetTarget(Scope.parse("key:k1"), budget(w1mo="2000"))
    assert authorize(ADMIN, W, target, parent_budget=budget(w1mo="1000"), **OWN_KEY) == Allowed()


def test_team_admin_token_without_team_may_do_nothing() -> None:
    lost = Principal(Role.TEAM_ADMIN, None, "x")
    assert isinstance(authorize(lost, R, TeamTarget("t1")), Denied)


# --- registering keys as a team admin (issue 11: claiming keys, escaping a user budget) -------


def put_key(key: str = "k1", team: str | None = "t1", user: str | None = None, **facts: Any) -> Any:
    return authorize(TEAM_ADMIN, W, KeyTarget(key, team, user), **facts)


def test_team_admin_may_register_a_key_new_to_spendgate() -> None:
    assert put_key("k9", key_in_use=False) == Allowed()


@pytest.mark.parametrize(
    ("in_use", "reason"),
    [
        (
            True,
            "key k9 is not new to spendgate (it has recorded spend or a budget); "
            "claiming a key in use takes an admin",
        ),
        (
            None,
            "cannot tell yet whether key k9 has recorded spend (the gate is still catching up); "
            "retry, or ask an admin",
        ),
    ],
)
def test_team_admin_may_not_claim_an_unregistered_key_in_use(in_use: bool | None, reason: str) -> None:
    decision = put_key("k9", key_in_use=in_use)
    assert decision == Denied(reason)
    assert authorize(ADMIN, W, KeyTarget("k9", "t1"), key_in_use=in_use) == Allowed()


def test_team_admin_may_not_take_a_key_registered_in_another_team() -> None:
    decision = put_key("k2", team_of_key="t2", key_exists=True)
    assert decision == Denied("key k2 is registered outside team t1; claiming a key in use takes an admin")


def test_team_admin_may_not_un_revoke_a_key_of_its_team() -> None:
    decision = put_key(team_of_key="t1", key_exists=True, key_revoked=True)
    assert decision == Denied("key k1 is revoked; only an admin may re-register it")
    assert authorize(ADMIN, W, KeyTarget("k1", "t1"), team_of_key="t1", key_exists=True, key_revoked=True)
    # revoking again and reading it stay the team admin's
    for action in (R, D):
        assert authorize(
            TEAM_ADMIN, action, KeyTarget("k1"), team_of_key="t1", key_exists=True, key_revoked=True
        )


@pytest.mark.parametrize(("registered", "new"), [("dave", "nobody"), ("dave", None), (None, "dave")])
def test_team_admin_may_not_change_the_user_of_an_existing_key(
    registered: str | None, new: str | None
) -> None:
    decision = put_key(user=new, team_of_key="t1", key_exists=True, key_user=registered, user_is_member=True)
    assert isinstance(decision, Denied)
    assert decision.reason == (
        "a team_admin may not change the user of key k1 "
        f"(registered user: {registered or 'none'}); ask an admin"
    )
    same = put_key(user=registered, team_of_key="t1", key_exists=True, key_user=registered)
    assert same == Allowed()


def test_team_admin_sets_a_new_keys_user_only_to_a_member_of_its_team() -> None:
    assert put_key("k9", user="alice", user_is_member=True) == Allowed()
    decision = put_key("k9", user="mallory", user_is_member=False)
    assert decision == Denied(
        "user mallory is not a member of team t1; "
        "a team_admin may set a new key's user only to a member of team t1"
    )


def test_denials_name_the_action_they_refuse() -> None:
    team_budget = BudgetTarget(Scope.parse("team:t1"))
    assert authorize(TEAM_ADMIN, W, team_budget) == Denied("only an admin may set the budget of team t1")
    assert authorize(TEAM_ADMIN, D, team_budget) == Denied("only an admin may remove the budget of team t1")
    org = BudgetTarget(Scope.parse("org:o1"))
    assert authorize(TEAM_ADMIN, R, org) == Denied(
        "a team_admin may not read org scopes, only those of its own team"
    )
    assert authorize(TEAM_ADMIN, W, org) == Denied("a team_admin may not set org budgets")
    assert authorize(TEAM_ADMIN, D, org) == Denied("a team_admin may not remove org budgets")
    assert authorize(TEAM_ADMIN, R, TokenTarget()) == Denied("only an admin may list tokens")
    assert authorize(TEAM_ADMIN, D, TokenTarget()) == Denied("only an admin may mint or revoke tokens")
