"""domain.attribution.scopes_for: every row of CONTRACT §1, registry first, nothing remembered."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from factories import config_record, usage_event
from spendgate.domain.attribution import scopes_for
from spendgate.domain.registry import RegistryView
from spendgate.domain.scopes import Scope


@dataclass(frozen=True)
class Request:
    """A check request: the same fields as a usage event, nothing else."""

    key_id: str
    user_id: str | None = None
    team_id: str | None = None
    org_id: str | None = None
    end_user_id: str | None = None
    model: str | None = None
    tags: Sequence[str] | None = None


def _registry(*records: tuple[str, dict[str, object]]) -> RegistryView:
    reg = RegistryView()
    for k, v in records:
        reg.apply(k, v)
    return reg


EMPTY = RegistryView()
REG = _registry(
    ("key/k1", config_record("key", 1, user_id="u1", team_id="t1")),
    ("team/t1", config_record("team", 1, org_id="o1")),
)


def test_bare_event_is_charged_to_its_key_only() -> None:
    assert scopes_for(Request("k1"), EMPTY) == ["key:k1"]


def test_key_user_team_org_come_from_the_registry() -> None:
    assert scopes_for(Request("k1"), REG) == ["key:k1", "user:u1", "team:t1", "member:t1/u1", "org:o1"]


def test_unregistered_key_uses_the_event_user_team_and_org() -> None:
    assert scopes_for(Request("k9", user_id="u", team_id="t", org_id="o"), EMPTY) == [
        "key:k9",
        "user:u",
        "team:t",
        "member:t/u",
        "org:o",
    ]


def test_registry_beats_event_fields() -> None:
    got = scopes_for(Request("k1", user_id="evil", team_id="other", org_id="o-other"), REG)
    assert got == ["key:k1", "user:u1", "team:t1", "member:t1/u1", "org:o1"]


def test_registered_team_org_beats_event_org_even_when_key_is_not_registered() -> None:
    assert "org:o1" in scopes_for(Request("k9", team_id="t1", org_id="o2"), REG)
    assert "org:o2" not in scopes_for(Request("k9", team_id="t1", org_id="o2"), REG)


def test_team_without_registered_org_falls_back_to_event_org() -> None:
    reg = _registry(("team/t1", config_record("team", 1, org_id=None)))
    assert "org:o2" in scopes_for(Request("k1", team_id="t1", org_id="o2"), reg)


def test_registered_key_without_user_falls_back_to_event_user() -> None:
    reg = _registry(("key/k1", config_record("key", 1, team_id="t1")))
    assert scopes_for(Request("k1", user_id="u7"), reg) == ["key:k1", "user:u7", "team:t1", "member:t1/u7"]


def test_member_needs_both_team_and_user() -> None:
    assert not any(s.startswith("member:") for s in scopes_for(Request("k", user_id="u"), EMPTY))
    assert not any(s.startswith("member:") for s in scopes_for(Request("k", team_id="t"), EMPTY))


def test_end_user_scope_comes_from_the_event() -> None:
    assert "end_user:alice" in scopes_for(Request("k1", end_user_id="alice"), REG)


def test_model_gives_model_and_key_model_scopes_encoded() -> None:
    got = scopes_for(Request("k1", model="openai/gpt-4o"), EMPTY)
    assert got == ["key:k1", "model:openai%2Fgpt-4o", "key_model:k1/openai%2Fgpt-4o"]
    assert Scope.parse(got[2]).parts == ("k1", "openai/gpt-4o")


def test_each_tag_is_a_scope_and_duplicates_count_once() -> None:
    got = scopes_for(Request("k1", tags=["prod", "b/c", "prod"]), EMPTY)
    assert got == ["key:k1", "tag:prod", "tag:b%2Fc"]


def test_two_calls_with_different_end_users_on_one_key_do_not_leak() -> None:
    """Seed 002: a per-request end user is never remembered on the shared key."""
    alice = scopes_for(Request("k1", end_user_id="alice", model="m-a", tags=["x"]), REG)
    bob = scopes_for(Request("k1", end_user_id="bob"), REG)
    assert "end_user:alice" in alice and "end_user:bob" in bob
    assert not any(s in bob for s in ("end_user:alice", "model:m-a", "key_model:k1/m-a", "tag:x"))
    assert scopes_for(Request("k1"), REG) == ["key:k1", "user:u1", "team:t1", "member:t1/u1", "org:o1"]
    assert REG.keys["k1"].user_id == "u1"  # the registry was not touched


def test_usage_event_is_attributed_like_a_request() -> None:
    event = usage_event(key_id="k1", end_user_id="alice", model="openai/gpt-4o", tags=["prod"])
    assert scopes_for(event, REG) == [
        "key:k1",
        "user:u1",
        "team:t1",
        "member:t1/u1",
        "org:o1",
        "end_user:alice",
        "model:openai%2Fgpt-4o",
        "key_model:k1/openai%2Fgpt-4o",
        "tag:prod",
    ]


@pytest.mark.parametrize("field", ["end_user_id", "model", "user_id", "team_id", "org_id"])
def test_empty_strings_add_no_scope(field: str) -> None:
    assert scopes_for(Request("k", **{field: ""}), EMPTY) == ["key:k"]


ids = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)


@given(
    st.builds(
        Request,
        ids,
        st.none() | ids,
        st.none() | ids,
        st.none() | ids,
        st.none() | ids,
        st.none() | ids,
        st.none() | st.lists(ids, max_size=5),
    )
)
def test_every_scope_is_valid_canonical_and_unique(req: Request) -> None:
    got = scopes_for(req, EMPTY)
    assert len(got) == len(set(got))
    for text in got:
        assert str(Scope.parse(text)) == text
    assert got[0] == str(Scope.of("key", req.key_id))
