"""domain.check: which windows bind a request, from the materialized state only."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from factories import config_record
from spendgate.domain.check import CheckRequest, check, degraded, retry_after
from spendgate.domain.gate_state import GateState
from spendgate.domain.money import NANOS_PER_USD
from spendgate.domain.windows import iso

NOW = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC).timestamp()
DAY_START = datetime(2026, 11, 23, tzinfo=UTC).timestamp()
DAY_END = datetime(2026, 11, 24, tzinfo=UTC).timestamp()
_seq = itertools.count(1)


def ts(epoch: float | None) -> str | None:
    return None if epoch is None else iso(int(epoch))


def state_record(
    scope: str, *windows: tuple[str, str], as_of: float = NOW, day: tuple[float, float] = (DAY_START, DAY_END)
) -> dict[str, Any]:
    """A ``spend.state`` value: windows as (window, spend); ``1d`` uses ``day``, ``total`` no bounds."""
    out = []
    for window, spend in windows:
        start, end = (None, None) if window == "total" else day
        out.append({"window": window, "start": ts(start), "resets_at": ts(end), "spend_usd": spend})
    return {"v": 1, "scope": scope, "as_of": ts(as_of), "source": None, "windows": out}


def decision_record(
    scope: str, blocked: bool = True, *windows: tuple[str, str, str, float | None], seq: int | None = None
) -> dict[str, Any]:
    """A ``spend.decisions`` value: windows as (window, spend, limit, resets_at epoch or None)."""
    return {
        "v": 1,
        "scope": scope,
        "blocked": blocked,
        "seq": next(_seq) if seq is None else seq,
        "as_of": ts(NOW),
        "windows": [
            {"window": w, "spend_usd": s, "limit_usd": lim, "resets_at": ts(r)} for w, s, lim, r in windows
        ],
    }


def with_budget(gs: GateState, scope: str, *limits: tuple[str, str], tz: str = "UTC") -> GateState:
    gs.apply_config(
        f"budget/{scope}",
        config_record(
            "budget", next(_seq), scope=scope, limits=[{"window": w, "max_usd": m} for w, m in limits], tz=tz
        ),
    )
    return gs


def usd(text: str) -> int:
    return int(float(text) * 1000) * (NANOS_PER_USD // 1000)


def test_spend_equal_to_limit_blocks() -> None:
    gs = with_budget(GateState(), "key:k1", ("1d", "10"))
    gs.apply_state(state_record("key:k1", ("1d", "10"), ("total", "10")))
    result = check(CheckRequest("k1"), gs, NOW)
    assert not result.allowed
    [binding] = result.blocked_by
    assert binding.to_json() == {
        "scope": "key:k1",
        "window": "1d",
        "spend_usd": "10",
        "limit_usd": "10",
        "resets_at": "2026-11-24T00:00:00Z",
    }


def test_spend_just_below_limit_is_allowed() -> None:
    gs = with_budget(GateState(), "key:k1", ("1d", "10"))
    gs.apply_state(state_record("key:k1", ("1d", "9.999999999")))
    assert check(CheckRequest("k1"), gs, NOW).allowed


def test_zero_limit_blocks_without_any_spend() -> None:
    gs = with_budget(GateState(), "key:k1", ("1d", "0"))
    result = check(CheckRequest("k1"), gs, NOW)
    assert not result.allowed
    assert result.blocked_by[0].resets_at == DAY_END
    assert result.retry_after_s == int(DAY_END - NOW)


def test_estimate_blocks_when_spend_plus_estimate_exceeds_limit() -> None:
    gs = with_budget(GateState(), "key:k1", ("1d", "10"))
    gs.apply_state(state_record("key:k1", ("1d", "9.5")))
    assert check(CheckRequest("k1", estimated_cost_nanos=usd("0.5")), gs, NOW).allowed  # 10 is not > 10
    denied = check(CheckRequest("k1", estimated_cost_nanos=usd("0.5") + 1), gs, NOW)
    assert not denied.allowed and denied.blocked_by[0].window == "1d"


def test_unbudgeted_scope_never_binds_by_state() -> None:
    gs = GateState()
    gs.apply_state(state_record("key:k1", ("total", "1000000")))
    assert check(CheckRequest("k1", estimated_cost_nanos=usd("5")), gs, NOW).allowed


def test_two_end_users_on_one_key_are_judged_by_their_own_budgets_however_requests_interleave() -> None:
    gs = with_budget(GateState(), "end_user:alice", ("1d", "2"))
    with_budget(gs, "end_user:bob", ("1d", "20"))
    gs.apply_state(state_record("end_user:alice", ("1d", "1.9")))
    gs.apply_state(state_record("end_user:bob", ("1d", "1.9")))
    alice = CheckRequest("shared-key", end_user_id="alice", estimated_cost_nanos=usd("0.5"))
    bob = CheckRequest("shared-key", end_user_id="bob", estimated_cost_nanos=usd("0.5"))
    for order in ([alice, bob, alice], [bob, alice, bob, bob], [alice, alice, bob]):
        for request in order:
            result = check(request, gs, NOW)
            if request.end_user_id == "alice":
                assert not result.allowed and result.blocked_by[0].scope == "end_user:alice"
            else:
                assert result.allowed


def test_member_with_cleared_budget_is_bound_only_by_team() -> None:
    gs = GateState()
    gs.apply_config("key/k1", config_record("key", 1, key_id="k1", user_id="u1", team_id="t1"))
    with_budget(gs, "member:t1/u1", ("1d", "1"))
    with_budget(gs, "team:t1", ("1d", "100"))
    gs.apply_state(state_record("member:t1/u1", ("1d", "5")))
    gs.apply_state(state_record("team:t1", ("1d", "5")))
    assert not check(CheckRequest("k1"), gs, NOW).allowed
    gs.apply_config(
        "budget/member:t1/u1", config_record("budget", next(_seq), scope="member:t1/u1", limits=None)
    )
    assert check(CheckRequest("k1"), gs, NOW).allowed
    gs.apply_state(state_record("team:t1", ("1d", "100")))
    result = check(CheckRequest("k1"), gs, NOW)
    assert [b.scope for b in result.blocked_by] == ["team:t1"]


def test_blocked_decision_binds_until_every_listed_reset_has_passed() -> None:
    gs = GateState()
    hour_end = NOW + 1800
    gs.apply_decision(
        decision_record("team:t1", True, ("1h", "11", "10", hour_end), ("1d", "101", "100", DAY_END))
    )
    request = CheckRequest("k1", team_id="t1")
    result = check(request, gs, NOW)
    assert not result.allowed and {b.window for b in result.blocked_by} == {"1h", "1d"}
    after_hour = check(request, gs, hour_end + 1)
    assert not after_hour.allowed and [b.window for b in after_hour.blocked_by] == ["1d"]
    assert check(request, gs, DAY_END).allowed


def test_expired_block_is_ignored_before_the_unblock_arrives() -> None:
    gs = GateState()
    gs.apply_decision(decision_record("key:k1", True, ("1h", "11", "10", NOW - 1)))
    assert check(CheckRequest("k1"), gs, NOW).allowed


def test_total_block_never_expires_and_has_no_retry_after() -> None:
    gs = GateState()
    gs.apply_decision(decision_record("key:k1", True, ("total", "11", "10", None)))
    result = check(CheckRequest("k1"), gs, NOW + 10**8)
    assert not result.allowed and result.retry_after_s is None


def test_unblock_decision_ends_the_block() -> None:
    gs = GateState()
    gs.apply_decision(decision_record("key:k1", True, ("1d", "11", "10", DAY_END), seq=5))
    gs.apply_decision(decision_record("key:k1", False, seq=6))
    assert check(CheckRequest("k1"), gs, NOW).allowed


def test_older_decision_is_ignored() -> None:
    gs = GateState()
    gs.apply_decision(decision_record("key:k1", False, seq=9))
    assert not gs.apply_decision(decision_record("key:k1", True, ("1d", "11", "10", DAY_END), seq=8))
    assert check(CheckRequest("k1"), gs, NOW).allowed


def test_state_of_a_past_window_counts_as_zero() -> None:
    gs = with_budget(GateState(), "key:k1", ("1d", "10"))
    yesterday = (DAY_START - 86400, DAY_START)
    gs.apply_state(state_record("key:k1", ("1d", "50"), day=yesterday))
    assert check(CheckRequest("k1"), gs, NOW).allowed


def test_retry_after_is_until_every_binding_window_resets() -> None:
    gs = with_budget(GateState(), "key:k1", ("1d", "10"))
    gs.apply_state(state_record("key:k1", ("1d", "10")))
    gs.apply_decision(decision_record("user:u1", True, ("1h", "11", "10", NOW + 100)))
    result = check(CheckRequest("k1", user_id="u1"), gs, NOW)
    assert {b.scope for b in result.blocked_by} == {"key:k1", "user:u1"}
    assert result.retry_after_s == int(DAY_END - NOW)
    only_hour = check(CheckRequest("k2", user_id="u1"), gs, NOW - 0.5)
    assert only_hour.retry_after_s == 101  # ceil(100.5)


def test_a_window_binding_by_decision_and_state_is_listed_once() -> None:
    gs = with_budget(GateState(), "key:k1", ("1d", "10"))
    gs.apply_state(state_record("key:k1", ("1d", "10.5")))
    gs.apply_decision(decision_record("key:k1", True, ("1d", "10.2", "10", DAY_END)))
    result = check(CheckRequest("k1"), gs, NOW)
    assert [(b.window, b.spend) for b in result.blocked_by] == [("1d", usd("10.5"))]


def test_nothing_is_remembered_between_requests() -> None:
    gs = with_budget(GateState(), "model:openai%2Fgpt-4o", ("1d", "0"))
    with_budget(gs, "tag:prod", ("1d", "0"))
    assert not check(CheckRequest("k1", model="openai/gpt-4o"), gs, NOW).allowed
    assert not check(CheckRequest("k1", tags=["prod"]), gs, NOW).allowed
    assert check(CheckRequest("k1"), gs, NOW).allowed


def test_registry_team_binds_even_when_the_request_names_another() -> None:
    gs = GateState()
    gs.apply_config("key/k1", config_record("key", 1, key_id="k1", team_id="t1"))
    with_budget(gs, "team:t1", ("1d", "0"))
    result = check(CheckRequest("k1", team_id="t-other"), gs, NOW)
    assert not result.allowed and result.blocked_by[0].scope == "team:t1"


def test_degraded_answers_follow_the_fail_mode() -> None:
    assert degraded(True).allowed and degraded(True).degraded
    assert not degraded(False).allowed and degraded(False).degraded


def test_result_json_matches_the_contract() -> None:
    gs = with_budget(GateState(), "key:k1", ("total", "1"))
    gs.apply_state(state_record("key:k1", ("total", "1.5")))
    body = check(CheckRequest("k1"), gs, NOW).to_json(42)
    assert body == {
        "allowed": False,
        "blocked_by": [
            {"scope": "key:k1", "window": "total", "spend_usd": "1.5", "limit_usd": "1", "resets_at": None}
        ],
        "retry_after_s": None,
        "degraded": False,
        "state_lag_ms": 42,
    }


@given(
    spend=st.integers(0, 10**12),
    limit=st.integers(0, 10**12),
    estimate=st.none() | st.integers(0, 10**12),
)
def test_window_binds_exactly_per_the_rule(spend: int, limit: int, estimate: int | None) -> None:
    from spendgate.domain.money import format_usd

    gs = with_budget(GateState(), "key:k1", ("1d", format_usd(limit)))
    gs.apply_state(state_record("key:k1", ("1d", format_usd(spend))))
    expected = spend >= limit or (estimate is not None and spend + estimate > limit)
    assert check(CheckRequest("k1", estimated_cost_nanos=estimate), gs, NOW).allowed is not expected


def test_retry_after_of_no_binding_window_is_at_least_one_second() -> None:
    from spendgate.domain.check import Binding

    assert retry_after([Binding("key:k1", "1h", 1, 1, NOW + 0.001)], NOW) == 1


def test_a_revoked_key_is_denied_with_key_revoked_whatever_the_budgets_say() -> None:
    gs = GateState()
    gs.apply_config("key/k1", config_record("key", next(_seq), team_id="t1", user_id="dave", revoked=True))
    gs.apply_state(state_record("key:k1", ("total", "2.5")))
    body = check(CheckRequest("k1", team_id="other"), gs, NOW).to_json(7)
    assert body == {
        "allowed": False,
        "blocked_by": [
            {
                "scope": "key:k1",
                "window": "total",
                "spend_usd": "2.5",
                "limit_usd": "0",
                "resets_at": None,
                "code": "key_revoked",
            }
        ],
        "retry_after_s": None,
        "degraded": False,
        "state_lag_ms": 7,
    }
    # an encoded id, no spend known yet
    gs.apply_config("key/a%2Fb", config_record("key", next(_seq), key_id="a/b", revoked=True))
    [binding] = check(CheckRequest("a/b"), gs, NOW).blocked_by
    assert (binding.scope, binding.spend, binding.code) == ("key:a%2Fb", 0, "key_revoked")


def test_re_registering_a_revoked_key_lifts_the_denial() -> None:
    gs = GateState()
    gs.apply_config("key/k1", config_record("key", 1, team_id="t1", revoked=True))
    assert not check(CheckRequest("k1"), gs, NOW).allowed
    gs.apply_config("key/k1", config_record("key", 2, team_id="t1"))
    assert check(CheckRequest("k1"), gs, NOW).allowed
