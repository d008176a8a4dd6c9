"""The pure parts of alert webhooks: patterns, authority, URLs, event ids, signatures, Slack
messages, the retry schedule and what an answer means (issue 18)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from spendgate.domain.authority import Principal, Role
from spendgate.domain.errors import InvalidInput
from spendgate.domain.scopes import Scope
from spendgate.domain.webhook_delivery import (
    RetryPolicy,
    Verdict,
    body_for,
    event_id,
    judge,
    retry_after_s,
    sign,
    slack_message,
    usd,
    verify,
)
from spendgate.domain.webhooks import (
    ScopePattern,
    authorize_webhook,
    forbidden_address,
    parse_kinds,
    parse_patterns,
    refused_target,
    subscription_matches,
    validate_url,
)

ALERT = {
    "v": 1,
    "scope": "team:t1",
    "kind": "soft_limit",
    "window": "1d",
    "spend_usd": "412.5",
    "limit_usd": "400",
    "resets_at": "2026-12-02T00:00:00Z",
    "as_of": "2026-12-01T10:00:00Z",
}


# --- patterns and matching ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "scope", "hit"),
    [
        ("team:*", "team:t1", True),
        ("team:t1", "team:t1", True),
        ("team:t1", "team:t2", False),
        ("team:*", "key:t1", False),
        ("member:T/*", "member:T/alice", True),
        ("member:T/*", "member:U/alice", False),
        ("member:*/alice", "member:U/alice", True),
        ("key_model:k1/*", "key_model:k1/openai%2Fgpt-4o", True),
        ("model:openai%2Fgpt-4o", "model:openai%2Fgpt-4o", True),
    ],
)
def test_patterns_match_scopes_part_by_part(pattern: str, scope: str, hit: bool) -> None:
    assert ScopePattern.parse(pattern).matches(Scope.parse(scope)) is hit


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("teams:*", "unknown scope kind"),
        ("member:T", "takes 2 id part"),
        ("team:a/b", "takes 1 id part"),
        ("team:", "non-empty"),
        ("key:" + "x" * 300, "at most 256"),
    ],
)
def test_bad_patterns_are_refused_with_the_reason(bad: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        ScopePattern.parse(bad)


def test_patterns_and_kinds_lists() -> None:
    assert [str(p) for p in parse_patterns(["team:*", "team:*", "key:k1"])] == ["team:*", "key:k1"]
    with pytest.raises(InvalidInput, match="at least one"):
        parse_patterns([])
    assert parse_kinds(None) == ("soft_limit", "blocked", "unblocked")
    assert parse_kinds(["blocked", "soft_limit"]) == ("soft_limit", "blocked")
    with pytest.raises(InvalidInput, match="unknown kind"):
        parse_kinds(["exploded"])


def test_a_subscription_gets_its_kinds_of_its_scopes_only() -> None:
    patterns = parse_patterns(["team:t1", "key:k1"])
    assert subscription_matches(patterns, ("soft_limit",), "team:t1", "soft_limit")
    assert not subscription_matches(patterns, ("soft_limit",), "team:t1", "blocked")
    assert subscription_matches(patterns, ("blocked",), "key:k1", "blocked")
    assert not subscription_matches(patterns, ("blocked",), "key:k2", "blocked")
    assert not subscription_matches(patterns, ("blocked",), "not a scope", "blocked")


# --- authority ----------------------------------------------------------------------------------

ADMIN = Principal(Role.ADMIN, token_id="a")
TA_T = Principal(Role.TEAM_ADMIN, team_id="T", token_id="t")


@pytest.mark.parametrize(
    ("patterns", "allowed"),
    [
        (["team:T"], True),
        (["member:T/*", "member:T/alice"], True),
        (["key:kT", "key_model:kT/*"], True),
        (["team:*"], False),
        (["team:U"], False),
        (["key:kU"], False),
        (["key:unregistered"], False),
        (["key:*"], False),
        (["user:alice"], False),
        (["org:O"], False),
        (["team:T", "team:U"], False),
    ],
)
def test_a_team_admin_watches_only_its_team(patterns: list[str], allowed: bool) -> None:
    facts = {"kT": "T", "kU": "U"}
    parsed = parse_patterns(patterns)
    assert bool(authorize_webhook(TA_T, parsed, facts)) is allowed
    assert authorize_webhook(ADMIN, parsed, facts)


@pytest.mark.parametrize("role", [Role.VIEWER, Role.GATEWAY])
def test_viewers_and_gateways_manage_no_webhook(role: Role) -> None:
    assert not authorize_webhook(Principal(role), parse_patterns(["team:T"]), {})


# --- URLs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/x", "only http"),
        ("file:///etc/passwd", "only http"),
        ("https://", "no host"),
        ("https://user:pw@example.com/", "credentials"),
        ("https://example.com:99999/", "not a valid URL"),
        ("https://exa mple.com/", "spaces"),
        ("example.com/hook", "only http"),
        ("https://example.com/#frag", "fragment"),
    ],
)
def test_bad_urls_are_refused_clearly(url: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        validate_url(url)


def test_good_urls_pass() -> None:
    assert (
        validate_url("https://hooks.slack.com/services/T/B/x?y=1")
        == "https://hooks.slack.com/services/T/B/x?y=1"
    )
    assert validate_url("http://127.0.0.1:8080/hook")


def test_link_local_and_metadata_targets_are_refused_unless_allowed() -> None:
    assert forbidden_address("169.254.169.254") is not None
    assert forbidden_address("fe80::1%eth0") is not None
    assert forbidden_address("::ffff:169.254.169.254") is not None
    assert forbidden_address("127.0.0.1") is None
    assert forbidden_address("93.184.216.34") is None
    assert refused_target("metadata.google.internal", ["10.0.0.1"]) is not None
    assert refused_target("evil.example", ["93.184.216.34", "169.254.169.254"]) is not None
    assert refused_target("evil.example", ["169.254.10.1"], ["169.254.0.0/16"]) is None
    assert refused_target("hooks.example", ["93.184.216.34"]) is None
    assert refused_target("nowhere.invalid", []) == "nowhere.invalid does not resolve"


# --- ids, signatures, bodies --------------------------------------------------------------------


def test_event_ids_are_stable_per_alert_and_subscription() -> None:
    same = event_id("w1", dict(reversed(list(ALERT.items()))))
    assert event_id("w1", ALERT) == same
    assert event_id("w2", ALERT) != same
    assert event_id("w1", {**ALERT, "as_of": "2026-12-01T10:00:01Z"}) != same
    assert same.startswith("evt_") and len(same) == 36


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    import hashlib
    import hmac

    body = b'{"a":1}'
    header = sign("s3cret-s3cret-s3cret", 1700000000, body)
    want = hmac.new(b"s3cret-s3cret-s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert header == f"t=1700000000,v1={want}"
    assert verify("s3cret-s3cret-s3cret", header, body, now=1700000100)
    assert not verify("s3cret-s3cret-s3cret", header, body + b" ", now=1700000100)
    assert not verify("another-secret-xx", header, body, now=1700000100)
    assert not verify("s3cret-s3cret-s3cret", header, body, now=1700001000)  # too old
    assert not verify("s3cret-s3cret-s3cret", "garbage", body, now=1700000000)


def test_slack_message_names_scope_window_amounts_and_reset() -> None:
    message = slack_message(ALERT)
    assert set(message) == {"text", "blocks"}
    text = message["text"]
    for part in ("team:t1", "soft limit", "1d", "$412.50", "$400.00", "2026-12-02T00:00:00Z"):
        assert part in text, (part, text)
    fields = [f["text"] for f in message["blocks"][1]["fields"]]
    assert "*Spend*\n$412.50" in fields and "*Limit*\n$400.00" in fields
    assert "is blocked" in slack_message({**ALERT, "kind": "blocked"})["text"]


def test_amounts_render_as_exact_decimals() -> None:
    assert usd("412.5") == "$412.50"
    assert usd("1234567") == "$1,234,567.00"
    assert usd("0.000125") == "$0.000125"
    assert usd(None) == "n/a"


def test_json_body_is_the_alert_itself() -> None:
    import json

    assert json.loads(body_for("json", ALERT)) == ALERT
    assert set(json.loads(body_for("slack", ALERT))) == {"text", "blocks"}


# --- retries ------------------------------------------------------------------------------------


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    policy = RetryPolicy(base_s=1, cap_s=60)
    rng = random.Random(7)
    for n in range(1, 12):
        ceiling = min(60, 2 ** (n - 1))
        delays = {policy.delay(n, rng) for _ in range(20)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1  # jittered: replicas do not retry in lockstep


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (None, Verdict.RETRY),
        (400, Verdict.GIVE_UP),
        (404, Verdict.GIVE_UP),
        (410, Verdict.GIVE_UP),
        (301, Verdict.GIVE_UP),
    ],
)
def test_what_an_answer_means(status: int | None, verdict: Verdict) -> None:
    outcome = judge(RetryPolicy(), attempts=1, age_s=0, status=status, error="timeout")
    assert outcome.verdict is verdict
    if verdict is Verdict.RETRY:
        assert outcome.retry_in_s is not None and 0.5 <= outcome.retry_in_s <= 1


def test_retries_are_bounded_by_attempts_and_by_age() -> None:
    policy = RetryPolicy(base_s=1, max_attempts=5, max_age_s=100)
    assert judge(policy, attempts=4, age_s=0, status=500).verdict is Verdict.RETRY
    gave_up = judge(policy, attempts=5, age_s=0, status=500)
    assert gave_up.verdict is Verdict.GIVE_UP and "after 5 attempts" in (gave_up.error or "")
    assert judge(policy, attempts=2, age_s=99.9, status=500).verdict is Verdict.GIVE_UP


def test_429_honours_retry_after_within_a_cap() -> None:
    policy = RetryPolicy(base_s=1, max_retry_after_s=600)
    now = datetime(2026, 12, 1, tzinfo=UTC)
    assert retry_after_s("120", now) == 120
    assert retry_after_s("Tue, 01 Dec 2026 00:00:30 GMT", now) == 30
    assert retry_after_s("soon", now) is None
    assert judge(policy, attempts=1, age_s=0, status=429, retry_after=120).retry_in_s == 120
    assert judge(policy, attempts=1, age_s=0, status=429, retry_after=10**6).retry_in_s == 600
    assert (judge(policy, attempts=1, age_s=0, status=503, retry_after=120).retry_in_s or 0) <= 1
