"""Bearer tokens: 256 random bits, shown once, stored and published only as a sha256 hash.

A token reads ``sg.<token_id>.<secret>``: the id lets a reader find the stored hash without
scanning, the secret (32 random bytes, base64url) is what makes it unguessable. Hashes are
compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

TOKEN_BYTES = 32
PREFIX = "sg"


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token_id: str
    token: str  # the bearer value; returned to the caller once, never stored
    hash: str  # sha256 hex of ``token``


def hash_token(token: str) -> str:
    """sha256 hex of the bearer value (what Postgres and spend.config hold)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def hashes_match(a: str, b: str) -> bool:
    """Constant-time equality of two hex digests."""
    return hmac.compare_digest(a.encode("ascii", "replace"), b.encode("ascii", "replace"))


def issue_token() -> IssuedToken:
    """A fresh token with a random 64-bit id and a 256-bit secret."""
    token_id = f"t-{secrets.token_hex(8)}"
    token = f"{PREFIX}.{token_id}.{secrets.token_urlsafe(TOKEN_BYTES)}"
    return IssuedToken(token_id, token, hash_token(token))


def token_id_of(token: str) -> str | None:
    """The id part of a well-formed token, else ``None`` (a foreign or mistyped bearer)."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != PREFIX or not parts[1] or not parts[2]:
        return None
    return parts[1]
