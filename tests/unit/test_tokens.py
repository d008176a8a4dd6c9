"""Tokens: random, shown once, held hashed; TokenCache authenticates in constant time."""

from __future__ import annotations

import base64

from pydantic import SecretStr

from spendgate.api.auth import BOOTSTRAP_ADMIN_ID, TokenCache
from spendgate.domain.authority import Principal, Role
from spendgate.domain.tokens import hash_token, hashes_match, issue_token, token_id_of
from spendgate.records import TokenRecord


def record(
    token: str, token_id: str, *, version: int = 1, role: str = "gateway", **kw: object
) -> TokenRecord:
    return TokenRecord(version=version, token_id=token_id, hash=hash_token(token), role=role, **kw)  # type: ignore[arg-type]


def test_issued_tokens_carry_at_least_128_random_bits_and_differ() -> None:
    tokens = [issue_token() for _ in range(200)]
    assert len({t.token for t in tokens}) == 200
    assert len({t.token_id for t in tokens}) == 200
    secret = tokens[0].token.split(".")[2]
    assert len(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))) * 8 >= 128


def test_issued_token_hash_is_sha256_of_the_token_and_id_is_recoverable() -> None:
    issued = issue_token()
    assert issued.hash == hash_token(issued.token)
    assert len(issued.hash) == 64
    assert token_id_of(issued.token) == issued.token_id
    assert issued.token not in issued.hash


def test_token_id_of_rejects_foreign_bearers() -> None:
    for bearer in ("", "abc", "sg..x", "sg.id.", "xx.id.secret", "sg.a.b.c"):
        assert token_id_of(bearer) is None


def test_hashes_match_is_exact() -> None:
    h = hash_token("a")
    assert hashes_match(h, hash_token("a"))
    assert not hashes_match(h, hash_token("b"))


def test_bootstrap_admin_token_authenticates_as_admin() -> None:
    cache = TokenCache(SecretStr("s3cret-admin"))
    assert cache.authenticate("s3cret-admin") == Principal(Role.ADMIN, None, BOOTSTRAP_ADMIN_ID)
    assert cache.authenticate("s3cret-admiN") is None
    assert cache.authenticate("") is None


def test_no_admin_token_means_no_bootstrap_admin() -> None:
    assert TokenCache(None).authenticate("") is None
    assert TokenCache("").authenticate("") is None


def test_minted_token_authenticates_with_its_role_and_team() -> None:
    cache = TokenCache(None)
    issued = issue_token()
    cache.apply(record(issued.token, issued.token_id, role="team_admin", team_id="t1"), issued.token_id)
    assert cache.authenticate(issued.token) == Principal(Role.TEAM_ADMIN, "t1", issued.token_id)


def test_right_id_with_wrong_secret_is_refused() -> None:
    cache = TokenCache(None)
    issued = issue_token()
    cache.apply(record(issued.token, issued.token_id), issued.token_id)
    forged = f"sg.{issued.token_id}.{'A' * 43}"
    assert cache.authenticate(forged) is None


def test_revoked_token_is_refused_and_an_older_version_cannot_unrevoke_it() -> None:
    cache = TokenCache(None)
    issued = issue_token()
    cache.apply(record(issued.token, issued.token_id, version=5, revoked=True), issued.token_id)
    cache.apply(record(issued.token, issued.token_id, version=3), issued.token_id)
    assert cache.authenticate(issued.token) is None


def test_tombstone_forgets_the_token() -> None:
    cache = TokenCache(None)
    issued = issue_token()
    cache.apply(record(issued.token, issued.token_id), issued.token_id)
    cache.apply(None, issued.token_id)
    assert cache.authenticate(issued.token) is None
    assert len(cache) == 0
