"""Bearer-token authentication from an in-memory ``TokenCache`` (no database on the check path).

The cache is fed from two places: the control plane applies every token it mints or revokes in
this process (``ControlService.subscribe``), and the gate's spend.config follower applies the
``TokenRecord``s other API processes published. ``SPENDGATE_ADMIN_TOKEN`` is the bootstrap
admin. Only sha256 hashes are held and they are compared in constant time.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from pydantic import SecretStr

from spendgate.api.errors import Unauthorized
from spendgate.domain.authority import Action, GateTarget, Principal, Role, authorize, require
from spendgate.domain.tokens import hash_token, hashes_match, token_id_of
from spendgate.records import TokenRecord

BOOTSTRAP_ADMIN_ID = "bootstrap-admin"


@dataclass(frozen=True, slots=True)
class _Entry:
    hash: str
    role: Role
    team_id: str | None
    revoked: bool
    version: int


class TokenCache:
    """Token id -> hash/role/team, versioned like every spend.config reader."""

    def __init__(self, admin_token: SecretStr | str | None = None) -> None:
        secret = admin_token.get_secret_value() if isinstance(admin_token, SecretStr) else admin_token
        self._admin_hash = hash_token(secret) if secret else None
        self._entries: dict[str, _Entry] = {}

    def apply(self, record: TokenRecord | None, token_id: str) -> None:
        """Apply a spend.config token record (``None`` = tombstone). Lower versions are ignored."""
        if record is None:
            self._entries.pop(token_id, None)
            return
        current = self._entries.get(record.token_id)
        if current is not None and current.version > record.version:
            return
        self._entries[record.token_id] = _Entry(
            record.hash, Role(record.role), record.team_id, record.revoked, record.version
        )

    def authenticate(self, bearer: str) -> Principal | None:
        """The principal of a bearer token, or ``None`` when it is unknown or revoked."""
        if not bearer:
            return None
        digest = hash_token(bearer)
        if self._admin_hash is not None and hashes_match(digest, self._admin_hash):
            return Principal(Role.ADMIN, None, BOOTSTRAP_ADMIN_ID)
        token_id = token_id_of(bearer)
        entry = self._entries.get(token_id) if token_id else None
        if entry is None or not hashes_match(digest, entry.hash) or entry.revoked:
            return None
        return Principal(entry.role, entry.team_id, token_id or "")

    def __len__(self) -> int:
        return len(self._entries)


def bearer_of(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def principal_of(request: Request, cache: TokenCache) -> Principal:
    """The caller's ``Principal``, or ``Unauthorized`` (401 in the error envelope)."""
    # The RequestGuard authenticated the caller before the body was read; reuse its answer.
    found = request.scope.get("state", {}).get("principal") or cache.authenticate(bearer_of(request))
    if found is None:
        raise Unauthorized()
    return found  # type: ignore[no-any-return]


def gate_caller(request: Request, cache: TokenCache, action: Action) -> Principal:
    """The caller, if allowed to ``check`` or ``ingest`` (gateway or admin); else 401 or 403."""
    found = principal_of(request, cache)
    require(authorize(found, action, GateTarget()))
    return found
