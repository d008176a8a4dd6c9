"""domain.registry.RegistryView: built from spend.config records, idempotent, ignores stale ones."""

from __future__ import annotations

import pytest

from factories import budget, config_record
from spendgate.domain.budgets import NO_BUDGET
from spendgate.domain.registry import KeyInfo, RegistryView, config_key


def test_key_record_registers_user_and_team() -> None:
    reg = RegistryView()
    change = reg.apply("key/k1", config_record("key", 1, user_id="u1", team_id="t1"))
    assert reg.keys["k1"] == KeyInfo("u1", "t1")
    assert change is not None and change.type == "key"


def test_stale_version_is_ignored() -> None:
    reg = RegistryView()
    reg.apply("key/k1", config_record("key", 5, team_id="t-new"))
    assert reg.apply("key/k1", config_record("key", 4, team_id="t-old")) is None
    assert reg.keys["k1"].team_id == "t-new"


def test_newer_version_replaces() -> None:
    reg = RegistryView()
    reg.apply("key/k1", config_record("key", 1, team_id="t1"))
    reg.apply("key/k1", config_record("key", 2, team_id="t2"))
    assert reg.keys["k1"].team_id == "t2"


def test_stale_budget_never_overrides_a_newer_one() -> None:
    reg = RegistryView()
    reg.apply("budget/team:t1", config_record("budget", 7, limits=[{"window": "1d", "max_usd": "50"}]))
    reg.apply("budget/team:t1", config_record("budget", 3, limits=[{"window": "1d", "max_usd": "5"}]))
    assert reg.budget("team:t1") == budget(("1d", "50"))


def test_reapplying_the_same_records_is_idempotent() -> None:
    records = [
        ("org/o1", config_record("org", 1)),
        ("team/t1", config_record("team", 2, org_id="o1")),
        ("key/k1", config_record("key", 3, user_id="u1", team_id="t1")),
        ("member/t1/u1", config_record("member", 4)),
        ("budget/team:t1", config_record("budget", 5)),
        ("token/tok1", config_record("token", 6)),
    ]
    once, twice = RegistryView(), RegistryView()
    for k, v in records:
        once.apply(k, v)
    for k, v in records + records:
        twice.apply(k, v)
    assert once == twice
    assert once.orgs == {"o1"} and once.team_orgs == {"t1": "o1"} and once.members == {("t1", "u1")}
    assert once.tokens["tok1"].role == "viewer"


def test_tombstones_remove_every_kind() -> None:
    reg = RegistryView()
    reg.apply("org/o1", config_record("org", 1))
    reg.apply("team/t1", config_record("team", 1, org_id="o1"))
    reg.apply("key/k1", config_record("key", 1, team_id="t1"))
    reg.apply("member/t1/u1", config_record("member", 1))
    reg.apply("budget/team:t1", config_record("budget", 1))
    reg.apply("token/tok1", config_record("token", 1))
    for k in ["org/o1", "team/t1", "key/k1", "member/t1/u1", "budget/team:t1", "token/tok1"]:
        change = reg.apply(k, None)
        assert change is not None
    assert not reg.orgs and not reg.team_orgs and not reg.keys and not reg.members
    assert not reg.budgets and not reg.tokens
    assert reg.budget("team:t1") == NO_BUDGET


def test_tombstone_of_an_encoded_id_removes_the_decoded_entity() -> None:
    reg = RegistryView()
    key = config_key("key", "k/1 é")
    reg.apply(key, config_record("key", 1, key_id="k/1 é"))
    reg.apply(key, None)
    assert "k/1 é" not in reg.keys
    mkey = config_key("member", "t/1", "u 1")
    reg.apply(mkey, config_record("member", 1, team_id="t/1", user_id="u 1"))
    reg.apply(mkey, None)
    assert not reg.members


def test_budget_tombstone_change_names_the_scope() -> None:
    reg = RegistryView()
    reg.apply("budget/member:t1/u1", config_record("budget", 1, scope="member:t1/u1"))
    change = reg.apply("budget/member:t1/u1", None)
    assert change is not None and change.scope == "member:t1/u1"
    assert reg.budget("member:t1/u1") == NO_BUDGET


def test_budget_with_empty_limits_is_no_budget() -> None:
    reg = RegistryView()
    reg.apply("budget/team:t1", config_record("budget", 1))
    reg.apply("budget/team:t1", config_record("budget", 2, limits=[]))
    assert "team:t1" not in reg.budgets and reg.budget("team:t1") == NO_BUDGET


def test_budget_with_null_limits_is_no_budget_not_an_error() -> None:
    """Seed 004: clearing a member's budget to null must leave the member usable."""
    reg = RegistryView()
    reg.apply("budget/member:t1/u1", config_record("budget", 1, scope="member:t1/u1"))
    change = reg.apply("budget/member:t1/u1", config_record("budget", 2, scope="member:t1/u1", limits=None))
    assert change is not None and change.scope == "member:t1/u1"
    assert reg.budget("member:t1/u1") == NO_BUDGET


def test_budget_keeps_its_time_zone() -> None:
    reg = RegistryView()
    reg.apply("budget/team:t1", config_record("budget", 1, tz="Asia/Kolkata"))
    assert reg.budget("team:t1").tz == "Asia/Kolkata"


def test_unknown_record_type_is_ignored() -> None:
    reg = RegistryView()
    assert reg.apply("gadget/x", {"v": 1, "version": 1}) is None
    assert reg == RegistryView(versions={"gadget/x": 1})


def test_config_keys_encode_entity_ids_but_not_budget_scopes() -> None:
    assert config_key("key", "k1") == "key/k1"
    assert config_key("member", "t/1", "u1") == "member/t%2F1/u1"
    assert config_key("budget", "model:openai%2Fgpt-4o") == "budget/model:openai%2Fgpt-4o"


def test_key_moved_to_another_team_is_attributed_to_the_new_team_only() -> None:
    reg = RegistryView()
    reg.apply("key/k1", config_record("key", 1, team_id="t1"))
    reg.apply("key/k1", config_record("key", 2, team_id="t2"))
    assert reg.keys["k1"] == KeyInfo(None, "t2")


def test_a_stale_record_resent_after_a_delete_does_not_resurrect_the_entity() -> None:
    from spendgate.domain.registry import RegistryView

    view = RegistryView()
    view.apply("key/k1", {"type": "key", "version": 5, "key_id": "k1", "team_id": "t1"})
    view.apply("key/k1", None)
    view.apply("key/k1", {"type": "key", "version": 3, "key_id": "k1", "team_id": "t0"})
    assert "k1" not in view.keys
    view.apply("key/k1", {"type": "key", "version": 6, "key_id": "k1", "team_id": "t2"})
    assert view.keys["k1"].team_id == "t2"


@pytest.mark.parametrize(
    ("key", "bad", "good"),
    [
        (
            "key/k1",
            {"type": "key", "version": 9},  # no key_id
            {"type": "key", "version": 2, "key_id": "k1", "team_id": "t1"},
        ),
        (
            "budget/key:k1",
            {"type": "budget", "version": 9, "scope": "key:k1", "limits": [{"window": "1x", "max_usd": "1"}]},
            {"type": "budget", "version": 2, "scope": "key:k1", "limits": [{"window": "1d", "max_usd": "1"}]},
        ),
    ],
)
def test_a_malformed_record_changes_nothing_and_sets_no_version_floor(
    key: str, bad: dict, good: dict
) -> None:
    view = RegistryView()
    with pytest.raises((KeyError, ValueError)):
        view.apply(key, bad)
    assert view == RegistryView()
    assert view.apply(key, good) is not None  # a lower version after the bad one still applies


def test_revoked_key_keeps_its_user_and_team_and_re_registration_clears_it() -> None:
    reg = RegistryView()
    reg.apply("key/k1", config_record("key", 1, user_id="u1", team_id="t1"))
    reg.apply("key/k1", config_record("key", 2, user_id="u1", team_id="t1", revoked=True))
    assert reg.keys["k1"] == KeyInfo("u1", "t1", revoked=True)
    reg.apply("key/k1", config_record("key", 3, user_id="u1", team_id="t2"))
    assert reg.keys["k1"] == KeyInfo("u1", "t2", revoked=False)


def test_a_revoked_keys_spend_is_still_charged_to_its_user_and_team() -> None:
    from factories import usage_event
    from spendgate.domain.attribution import scopes_for

    reg = RegistryView()
    reg.apply("team/t1", config_record("team", 1, team_id="t1", org_id="o1"))
    reg.apply("key/k1", config_record("key", 2, user_id="dave", team_id="t1", revoked=True))
    event = usage_event(key_id="k1", team_id="elsewhere", user_id="nobody")
    assert scopes_for(event, reg) == ["key:k1", "user:dave", "team:t1", "member:t1/dave", "org:o1"]
