"""Ids and scopes read from the raw (still percent-encoded) path, so an encoded ``/`` stays inside
its id: ``/v1/budgets/key_model:k1/openai%2Fgpt-4o`` is the scope ``key_model:k1/openai/gpt-4o``
with two parts, not three. The router's decoded path parameters lose that distinction."""

from __future__ import annotations

import re
from urllib.parse import unquote

from fastapi import Request

from spendgate.domain.errors import InvalidInput
from spendgate.domain.scopes import Scope, validate_id

_SCOPE_HEAD = re.compile(r"^([a-z_]+)(?::|%3[aA])(.*)$")


def raw_tail(request: Request, marker: str, *, suffix: str = "") -> str:
    """The still-encoded path after ``marker`` (e.g. ``/v1/budgets/``), without ``suffix``."""
    raw: bytes = request.scope.get("raw_path") or request.url.path.encode()
    text = raw.decode("latin-1").split("?", 1)[0]
    index = text.find(marker)
    tail = text[index + len(marker) :] if index >= 0 else ""
    return tail.removesuffix(suffix) if suffix else tail


def scope_in_path(request: Request, marker: str, *, suffix: str = "") -> Scope:
    """The scope after ``marker``; its kind's ``:`` may itself be encoded (``%3A``)."""
    tail = raw_tail(request, marker, suffix=suffix)
    match = _SCOPE_HEAD.match(tail)
    return Scope.parse(f"{match.group(1)}:{match.group(2)}" if match else unquote(tail))


def id_in_path(request: Request, marker: str, field: str) -> str:
    """One id after ``marker`` (a key id may hold ``/``), decoded strictly and validated."""
    try:
        value = unquote(raw_tail(request, marker), errors="strict")
    except UnicodeDecodeError:
        raise InvalidInput("not valid percent-encoded UTF-8", field=field) from None
    return validate_id(value, field=field)
