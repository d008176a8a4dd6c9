"""Alert webhooks, the pure parts of subscribing: scope patterns, alert kinds, who may subscribe
to what, and which URLs are webhook targets (``domain.webhook_delivery``: what is sent, how often).

The notifier (``spendgate.notifier``) and the control plane (``api.webhooks``) do the I/O; every
decision they take is a function here, so it is tested without a broker, a database or a socket.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from spendgate.domain.authority import Allowed, Denied, Principal, Role
from spendgate.domain.errors import InvalidInput
from spendgate.domain.scopes import Scope, ScopeKind, encode_id, validate_id

KINDS: tuple[str, ...] = ("soft_limit", "blocked", "unblocked")
FORMATS: tuple[str, ...] = ("json", "slack")
WILDCARD = "*"
MAX_PATTERNS = 100
MAX_URL_LENGTH = 2048
MIN_SECRET_LENGTH = 16
MAX_SECRET_LENGTH = 256

# --- scope patterns ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScopePattern:
    """A scope with ``*`` allowed for any id part: ``team:*``, ``member:T/*``, ``key:k1``."""

    kind: ScopeKind
    parts: tuple[str, ...]  # decoded ids, or WILDCARD

    @classmethod
    def parse(cls, text: str) -> ScopePattern:
        if not isinstance(text, str):
            raise InvalidInput("a scope pattern must be a string", field="scopes")
        kind_text, sep, rest = text.partition(":")
        try:
            kind = ScopeKind(kind_text)
        except ValueError:
            kinds = ", ".join(k.value for k in ScopeKind)
            raise InvalidInput(f"{text!r}: unknown scope kind (one of {kinds})", field="scopes") from None
        raw = rest.split("/") if sep else []
        if len(raw) != kind.arity:
            raise InvalidInput(f"{text!r}: a {kind} scope takes {kind.arity} id part(s)", field="scopes")
        parts = tuple(
            WILDCARD if p == WILDCARD else validate_id(unquote(p, errors="strict"), field="scopes")
            for p in raw
        )
        return cls(kind, parts)

    def __str__(self) -> str:
        return f"{self.kind}:{'/'.join(p if p == WILDCARD else encode_id(p) for p in self.parts)}"

    def matches(self, scope: Scope) -> bool:
        return scope.kind == self.kind and all(
            want in (WILDCARD, got) for want, got in zip(self.parts, scope.parts, strict=True)
        )


def parse_patterns(values: Sequence[str]) -> tuple[ScopePattern, ...]:
    """1..100 distinct patterns, kept in the order given (duplicates dropped)."""
    if not values:
        raise InvalidInput("at least one scope pattern (e.g. team:*)", field="scopes")
    if len(values) > MAX_PATTERNS:
        raise InvalidInput(f"at most {MAX_PATTERNS} scope patterns", field="scopes")
    seen: dict[str, ScopePattern] = {}
    for value in values:
        pattern = ScopePattern.parse(value)
        seen.setdefault(str(pattern), pattern)
    return tuple(seen.values())


def subscription_matches(
    patterns: Iterable[ScopePattern], kinds: Iterable[str], alert_scope: str, alert_kind: str
) -> bool:
    """Does a subscription to ``patterns`` x ``kinds`` receive this alert?"""
    if alert_kind not in kinds:
        return False
    try:
        scope = Scope.parse(alert_scope)
    except InvalidInput:
        return False
    return any(p.matches(scope) for p in patterns)


def parse_kinds(values: Sequence[str] | None) -> tuple[str, ...]:
    """The alert kinds to deliver; ``None`` = all of them."""
    if values is None:
        return KINDS
    if not values:
        raise InvalidInput(f"at least one kind ({', '.join(KINDS)})", field="kinds")
    unknown = [v for v in values if v not in KINDS]
    if unknown:
        raise InvalidInput(f"unknown kind(s) {unknown}; known: {', '.join(KINDS)}", field="kinds")
    return tuple(k for k in KINDS if k in values)


# --- authority ----------------------------------------------------------------------------------


def pattern_team(pattern: ScopePattern, key_teams: Mapping[str, str | None]) -> str | None:
    """The one team whose admin may watch ``pattern``, or ``None`` (admin only).

    ``team:T``, ``member:T/…`` are T's; ``key:K`` and ``key_model:K/…`` are the team of K when K
    is registered (``key_teams``: the current team of each key named). Wildcard ids of teams and
    keys, users, orgs, models, tags and end users reach beyond one team.
    """
    first = pattern.parts[0]
    if first == WILDCARD:
        return None
    if pattern.kind in (ScopeKind.TEAM, ScopeKind.MEMBER):
        return first
    if pattern.kind in (ScopeKind.KEY, ScopeKind.KEY_MODEL):
        return key_teams.get(first)
    return None


def keys_named(patterns: Iterable[ScopePattern]) -> set[str]:
    """The key ids whose team ``pattern_team`` needs to know."""
    return {
        p.parts[0]
        for p in patterns
        if p.kind in (ScopeKind.KEY, ScopeKind.KEY_MODEL) and p.parts[0] != WILDCARD
    }


def authorize_webhook(
    actor: Principal, patterns: Iterable[ScopePattern], key_teams: Mapping[str, str | None]
) -> Allowed | Denied:
    """May ``actor`` manage (read, change, delete) a webhook watching ``patterns``?

    Admins: any. A team admin of T: only when every pattern lies inside T. Others: never (a
    webhook carries a signing secret and sends spend out of spendgate).
    """
    if actor.role is Role.ADMIN:
        return Allowed()
    if actor.role is not Role.TEAM_ADMIN or actor.team_id is None:
        return Denied("only admins and team admins manage webhooks")
    outside = [str(p) for p in patterns if pattern_team(p, key_teams) != actor.team_id]
    if outside:
        return Denied(f"scope(s) {', '.join(outside)} lie outside team {actor.team_id}")
    return Allowed()


# --- URLs ---------------------------------------------------------------------------------------

#: Cloud metadata endpoints: never a webhook target unless allow-listed.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "169.254.170.2")
)
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata", "instance-data"})


def validate_url(url: str) -> str:
    """An absolute ``http``/``https`` URL with a host and no credentials; else ``InvalidInput``."""
    if not isinstance(url, str) or not url:
        raise InvalidInput("must be a non-empty URL", field="url")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidInput(f"at most {MAX_URL_LENGTH} characters", field="url")
    if any(ord(c) <= 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidInput("must not contain spaces or control characters", field="url")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidInput(f"not a valid URL ({exc})", field="url") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput("only http:// and https:// URLs are delivered to", field="url")
    if not parts.hostname:
        raise InvalidInput("the URL has no host", field="url")
    if parts.username is not None or parts.password is not None:
        raise InvalidInput("credentials in the URL are not allowed (use the signing secret)", field="url")
    if port == 0:
        raise InvalidInput("port 0 is not a valid port", field="url")
    if parts.fragment:
        raise InvalidInput("a URL fragment is never sent; remove it", field="url")
    return url


def url_host(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def forbidden_address(address: str) -> str | None:
    """Why delivering to ``address`` (an IP) is refused: link-local or a metadata service."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    if ip.is_link_local:
        return f"{ip} is a link-local address"
    if ip.is_unspecified or ip.is_multicast:
        return f"{ip} is not a unicast address"
    return None


def refused_target(host: str, addresses: Iterable[str], allow_hosts: Iterable[str] = ()) -> str | None:
    """Why ``host`` (resolving to ``addresses``) may not be a webhook target, or ``None``.

    ``allow_hosts`` (``SPENDGATE_WEBHOOK_ALLOW_HOSTS``) lists hosts or IPs/CIDRs allowed anyway.
    """
    host = host.lower().strip("[]")
    allowed = [a.strip().lower() for a in allow_hosts if a.strip()]
    addresses = list(addresses)

    def listed(value: str) -> bool:
        for entry in allowed:
            if entry == value:
                return True
            try:
                if ipaddress.ip_address(value) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
        return False

    if listed(host):
        return None
    if host in METADATA_HOSTS:
        return f"{host} is a cloud metadata host"
    if not addresses:
        return f"{host} does not resolve"
    for address in addresses:
        reason = forbidden_address(address)
        if reason is not None and not listed(address):
            return reason
    return None
