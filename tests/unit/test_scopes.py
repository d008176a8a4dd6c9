"""domain.scopes: ``kind:id`` / ``kind:a/b`` with RFC 3986 percent-encoded id parts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spendgate.domain.errors import InvalidInput
from spendgate.domain.scopes import Scope, ScopeKind, encode_id

# id parts as a scope can hold them: no control characters, no lone surrogates, 1..256 chars
id_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=256)


@given(st.sampled_from(list(ScopeKind)), st.data())
def test_format_then_parse_round_trips_any_ids(kind: ScopeKind, data: st.DataObject) -> None:
    parts = [data.draw(id_text) for _ in range(kind.arity)]
    scope = Scope.of(kind, *parts)
    assert Scope.parse(str(scope)) == scope
    assert list(Scope.parse(str(scope)).parts) == parts


@given(id_text)
def test_encoded_id_keeps_only_unreserved_characters(part: str) -> None:
    encoded = encode_id(part)
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~%")
    assert set(encoded) <= allowed
    assert "/" not in encoded and ":" not in encoded


def test_model_with_slash_is_one_part() -> None:
    scope = Scope.parse("model:openai%2Fgpt-4o")
    assert scope == Scope(ScopeKind.MODEL, ("openai/gpt-4o",))
    assert str(Scope.of("model", "openai/gpt-4o")) == "model:openai%2Fgpt-4o"


def test_unencoded_slash_in_one_part_kind_is_rejected() -> None:
    with pytest.raises(InvalidInput):
        Scope.parse("model:openai/gpt-4o")


def test_lowercase_percent_encoding_parses_to_the_canonical_scope() -> None:
    assert str(Scope.parse("model:openai%2fgpt-4o")) == "model:openai%2Fgpt-4o"


def test_unreserved_characters_are_not_encoded() -> None:
    assert str(Scope.of("key", "a-b_c.d~e")) == "key:a-b_c.d~e"


def test_non_ascii_id_is_utf8_percent_encoded() -> None:
    assert str(Scope.of("end_user", "é")) == "end_user:%C3%A9"


@pytest.mark.parametrize("text", ["member:t1/u1", "key_model:k1/openai%2Fgpt-4o"])
def test_two_part_kinds_parse_two_parts(text: str) -> None:
    assert len(Scope.parse(text).parts) == 2
    assert str(Scope.parse(text)) == text


@pytest.mark.parametrize("text", ["member:t1", "key_model:k1", "member:t1/u1/x", "key_model:a/b/c"])
def test_member_and_key_model_need_exactly_two_parts(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        Scope.parse(text)
    assert info.value.field == "scope"


def test_two_part_scope_cannot_be_built_with_one_part() -> None:
    with pytest.raises(InvalidInput):
        Scope.of("member", "t1")


@pytest.mark.parametrize(
    "text",
    [
        "nope:x",
        "Key:x",
        "keyx",
        "",
        ":x",  # unknown kind / no separator
        "key:",
        "member:/u1",
        "member:t1/",
        "key_model:/",  # empty id part
        "key:a%00b",
        "key:a%0Ab",
        "key:a%7Fb",
        "team:\x01",  # control characters
        "key:%FF",  # not UTF-8
        "key:" + "a" * 257,  # too long
    ],
)
def test_invalid_scope_text_is_rejected_with_invalid_input(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        Scope.parse(text)
    assert info.value.field == "scope"


def test_every_kind_of_the_contract_exists() -> None:
    assert {k.value for k in ScopeKind} == {
        "key",
        "user",
        "team",
        "member",
        "org",
        "end_user",
        "model",
        "key_model",
        "tag",
    }


def test_scopes_sort_and_hash_as_values() -> None:
    a, b = Scope.parse("team:t1"), Scope.of("team", "t1")
    assert a == b and hash(a) == hash(b)
    assert sorted([Scope.parse("team:b"), Scope.parse("key:z"), Scope.parse("team:a")])[0] == Scope.parse(
        "key:z"
    )
