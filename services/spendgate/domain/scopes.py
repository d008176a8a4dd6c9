"""Scopes: what spend is counted for and what a budget can be put on (CONTRACT §1).

Written ``kind:id`` or ``kind:a/b``; each id part is percent-encoded (RFC 3986, unreserved
characters kept) so ``model:openai%2Fgpt-4o`` is one model id, never two parts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import quote, unquote

from spendgate.domain.errors import InvalidInput

MAX_ID_LENGTH = 256


class ScopeKind(StrEnum):
    KEY = "key"
    USER = "user"
    TEAM = "team"
    MEMBER = "member"
    ORG = "org"
    END_USER = "end_user"
    MODEL = "model"
    KEY_MODEL = "key_model"
    TAG = "tag"

    @property
    def arity(self) -> int:
        return 2 if self in (ScopeKind.MEMBER, ScopeKind.KEY_MODEL) else 1


def encode_id(part: str) -> str:
    return quote(part, safe="")


_CONTROL = re.compile("[\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def validate_id(part: str, *, field: str = "id") -> str:
    """An id part: 1..256 characters, no control characters, valid Unicode.

    The one rule for every id: keys, users, teams, orgs, members, tokens, models, tags, end users,
    in paths, bodies and usage events alike (CONTRACT §1). Paths are decoded strictly before
    this (``api.limits``): invalid UTF-8 is refused there, never replaced by U+FFFD.
    """
    if not isinstance(part, str) or not part:
        raise InvalidInput("must be a non-empty string", field=field)
    if len(part) > MAX_ID_LENGTH:
        raise InvalidInput(f"at most {MAX_ID_LENGTH} characters", field=field)
    if _CONTROL.search(part):
        raise InvalidInput("must not contain control characters", field=field)
    if _SURROGATE.search(part):  # unencodable: Postgres and Kafka take UTF-8
        raise InvalidInput("must be valid Unicode (no lone surrogates)", field=field)
    return part


@dataclass(frozen=True, slots=True, order=True)
class Scope:
    kind: ScopeKind
    parts: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.parts) != self.kind.arity:
            raise InvalidInput(f"{self.kind} scope takes {self.kind.arity} id part(s)", field="scope")

    def __str__(self) -> str:
        return f"{self.kind}:{'/'.join(encode_id(p) for p in self.parts)}"

    @classmethod
    def of(cls, kind: ScopeKind | str, *parts: str) -> Scope:
        return cls(ScopeKind(kind), tuple(validate_id(p, field="scope") for p in parts))

    @classmethod
    def parse(cls, text: str) -> Scope:
        """Parse ``kind:id`` / ``kind:a/b``; raises ``InvalidInput`` naming what is wrong."""
        kind_text, sep, rest = text.partition(":")
        if not sep:
            raise InvalidInput("scope must look like kind:id", field="scope")
        try:
            kind = ScopeKind(kind_text)
        except ValueError:
            known = ", ".join(k.value for k in ScopeKind)
            raise InvalidInput(f"unknown scope kind {kind_text!r} (one of {known})", field="scope") from None
        raw_parts = rest.split("/")
        if len(raw_parts) != kind.arity:
            raise InvalidInput(f"{kind} scope takes {kind.arity} id part(s) separated by '/'", field="scope")
        try:
            parts = [unquote(p, errors="strict") for p in raw_parts]
        except UnicodeDecodeError:
            raise InvalidInput("scope id is not valid percent-encoded UTF-8", field="scope") from None
        return cls.of(kind, *parts)

