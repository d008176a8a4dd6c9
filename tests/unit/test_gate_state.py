"""domain.gate_state: the gate's in-memory view, applied from decoded topic records."""

from __future__ import annotations

import pytest

from factories import config_record
from spendgate.domain.errors import InvalidInput
from spendgate.domain.gate_state import GateState, epoch, nanos, provenance_order, state_supersedes
from spendgate.domain.money import parse_usd


@pytest.mark.parametrize("text", ["0", "12", "12.5", "0.000000001", "999999.123456789", "100.030"])
def test_nanos_fast_path_agrees_with_parse_usd(text: str) -> None:
    assert nanos(text) == parse_usd(text)


@pytest.mark.parametrize("value", ["-1", "1e3", "1.0000000001", "abc", "٣"])
def test_nanos_falls_back_to_exact_parsing_or_rejects(value: str) -> None:
    try:
        expected = parse_usd(value)
    except InvalidInput:
        with pytest.raises(InvalidInput):
            nanos(value)
    else:
        assert nanos(value) == expected


def test_epoch_reads_z_and_offsets() -> None:
    assert epoch("1970-01-01T00:00:10Z") == 10
    assert epoch("1970-01-01T01:00:10+01:00") == 10
    assert epoch(None) is None


def test_decision_with_lower_or_equal_seq_is_ignored() -> None:
    gs = GateState()
    record = {
        "v": 1,
        "scope": "key:k1",
        "blocked": False,
        "seq": 5,
        "as_of": "2026-01-01T00:00:00Z",
        "windows": [],
    }
    assert gs.apply_decision(record)
    assert not gs.apply_decision({**record, "blocked": True})
    assert not gs.apply_decision({**record, "seq": 4, "blocked": True})
    assert gs.decisions["key:k1"].blocked is False


def test_decision_tombstone_forgets_the_scope() -> None:
    gs = GateState()
    gs.apply_decision(
        {
            "v": 1,
            "scope": "key:k1",
            "blocked": True,
            "seq": 1,
            "as_of": "2026-01-01T00:00:00Z",
            "windows": [{"window": "total", "spend_usd": "2", "limit_usd": "1", "resets_at": None}],
        }
    )
    assert gs.apply_decision(None, key="key:k1")
    assert "key:k1" not in gs.decisions


def test_older_state_is_ignored() -> None:
    gs = GateState()
    new = {
        "v": 1,
        "scope": "key:k1",
        "as_of": "2026-01-01T00:00:02Z",
        "windows": [{"window": "total", "start": None, "resets_at": None, "spend_usd": "2"}],
    }
    old = {
        **new,
        "as_of": "2026-01-01T00:00:01Z",
        "windows": [{"window": "total", "start": None, "resets_at": None, "spend_usd": "1"}],
    }
    gs.apply_state(new)
    assert not gs.apply_state(old)
    assert gs.states["key:k1"].windows[0].spend == parse_usd("2")


def test_budget_is_compiled_and_removed_with_the_config() -> None:
    gs = GateState()
    gs.apply_config(
        "budget/team:t1",
        config_record("budget", 1, scope="team:t1", limits=[{"window": "1d", "max_usd": "100"}]),
    )
    compiled = gs.budgets["team:t1"]
    assert [(lim.window, lim.max_nanos) for lim in compiled.limits] == [("1d", parse_usd("100"))]
    gs.apply_config("budget/team:t1", None)
    assert "team:t1" not in gs.budgets


def test_scopes_on_one_budget_share_its_compiled_form_and_it_is_a_fresh_compile() -> None:
    """compile_budget remembers by Budget identity: 100,000 keys on one template, one tuple."""
    from spendgate.domain import gate_state

    gs = GateState()
    template = [{"window": "1mo", "max_usd": "5", "soft_usd": "4"}, {"window": "total", "max_usd": "9"}]
    for scope in ("key:a", "key:b"):
        gs.apply_config(f"budget/{scope}", config_record("budget", 1, scope=scope, limits=template))
    gs.apply_config("budget/key:c", config_record("budget", 1, scope="key:c", limits=template[:1]))
    assert gs.budgets["key:a"] is gs.budgets["key:b"]
    assert gs.budgets["key:c"].caps == (("1mo", parse_usd("5")),)
    remembered = dict(gs.budgets)
    gate_state._COMPILED.clear()
    for scope, compiled in remembered.items():
        assert gate_state.compile_budget(gs.registry.budgets[scope]) == compiled
    assert remembered["key:a"].caps == (("1mo", parse_usd("5")), ("total", parse_usd("9")))
    assert remembered["key:a"].limits[0].soft_nanos == parse_usd("4")


def test_stale_budget_does_not_replace_the_compiled_one() -> None:
    gs = GateState()
    gs.apply_config(
        "budget/team:t1",
        config_record("budget", 5, scope="team:t1", limits=[{"window": "1d", "max_usd": "100"}]),
    )
    gs.apply_config(
        "budget/team:t1",
        config_record("budget", 4, scope="team:t1", limits=[{"window": "1d", "max_usd": "1"}]),
    )
    assert gs.budgets["team:t1"].limits[0].max_nanos == parse_usd("100")


def test_empty_limits_mean_no_budget() -> None:
    gs = GateState()
    gs.apply_config("budget/member:t1/u1", config_record("budget", 1, scope="member:t1/u1", limits=[]))
    assert "member:t1/u1" not in gs.budgets


def test_current_window_ignores_a_window_that_is_over() -> None:
    gs = GateState()
    gs.apply_state(
        {
            "v": 1,
            "scope": "key:k1",
            "as_of": "1970-01-01T00:00:00Z",
            "windows": [
                {
                    "window": "1h",
                    "start": "1970-01-01T00:00:00Z",
                    "resets_at": "1970-01-01T01:00:00Z",
                    "spend_usd": "3",
                }
            ],
        }
    )
    assert gs.current_window("key:k1", "1h", 10) is not None
    assert gs.current_window("key:k1", "1h", 3600) is None


def test_a_record_missing_fields_raises_for_the_follower_to_skip() -> None:
    gs = GateState()
    with pytest.raises(KeyError):
        gs.apply_decision({"v": 1, "blocked": True})


@pytest.mark.parametrize(
    "bad",
    [{"reserved_usd": "lots"}, {"reserved_usd": "0.5", "holds": None}],
    ids=["reserved_usd not money", "holds_expire_at not a timestamp"],
)
def test_a_state_record_that_fails_to_parse_changes_nothing(bad: dict) -> None:
    """The follower skips a record its callback rejects: nothing of it may have been stored."""
    gs = GateState()
    assert gs.apply_state(_state("1", "2026-01-01T00:00:01Z", {"0": 1}))
    record = _state("2", "2026-01-01T00:00:02Z", {"0": 2})
    record["windows"][1] |= {"reserved_usd": bad["reserved_usd"]}
    record["holds_expire_at"] = 12 if "holds" in bad else "2026-01-01T00:10:00Z"
    with pytest.raises((ValueError, TypeError)):
        gs.apply_state(record)
    assert gs.states["team:t1"].by_window["total"][2] == parse_usd("1")
    assert "team:t1" not in gs.reserved


def _state(total: str, as_of: str, watermarks: dict[str, int] | None) -> dict:
    return {
        "v": 1,
        "scope": "team:t1",
        "as_of": as_of,
        "watermarks": watermarks,
        "windows": [
            {
                "window": "1h",
                "start": "2026-01-01T00:00:00Z",
                "resets_at": "2026-01-01T01:00:00Z",
                "spend_usd": total,
            },
            {"window": "total", "start": None, "resets_at": None, "spend_usd": total},
        ],
    }


def test_provenance_order_reads_the_watermarks_not_the_clock() -> None:
    assert provenance_order({"0": 5, "3": 2}, {"0": 5}) == 1
    assert provenance_order({"0": 5}, {"0": 5, "3": 2}) == -1  # misses partition 3's usage
    assert provenance_order({"0": 4, "3": 9}, {"0": 5, "3": 2}) == -1  # behind in partition 0
    assert provenance_order({"0": 5}, {"0": 5}) == 0
    assert provenance_order(None, {"0": 5}) == 0 and provenance_order({"0": 5}, None) == 0


def test_a_late_state_from_the_previous_owner_never_rolls_the_scope_back() -> None:
    """Issue 19: a record reflecting less usage loses even with a later as_of and a $0 total."""
    gs = GateState()
    assert gs.apply_state(_state("7", "2026-01-01T00:00:02Z", {"0": 10, "1": 4}))
    assert not gs.apply_state(_state("0", "2026-01-01T00:00:03Z", {}))
    assert not gs.apply_state(_state("5", "2026-01-01T00:00:09Z", {"0": 8, "1": 4}))
    assert gs.states["team:t1"].by_window["total"][2] == 7 * 10**9
    assert gs.apply_state(_state("8", "2026-01-01T00:00:01Z", {"0": 10, "1": 6}))  # more usage wins
    assert gs.states["team:t1"].by_window["total"][2] == 8 * 10**9


def test_same_usage_later_state_wins_even_with_less_in_a_window() -> None:
    """After a window reset the newer record shows less: ordered by as_of when provenance ties."""
    gs = GateState()
    assert gs.apply_state(_state("8", "2026-01-01T00:59:59Z", {"0": 10}))
    reset = _state("8", "2026-01-01T01:00:01Z", {"0": 10})
    reset["windows"][0].update(start="2026-01-01T01:00:00Z", resets_at="2026-01-01T02:00:00Z", spend_usd="0")
    assert gs.apply_state(reset)
    assert gs.states["team:t1"].by_window["1h"][2] == 0
    assert not gs.apply_state(_state("8", "2026-01-01T00:59:59Z", {"0": 10}))


def test_decisions_are_ordered_by_provenance_then_seq() -> None:
    gs = GateState()
    blocked = {
        "v": 1,
        "scope": "team:t1",
        "blocked": True,
        "seq": 100,
        "as_of": "2026-01-01T00:00:00Z",
        "watermarks": {"0": 10},
        "windows": [{"window": "total", "spend_usd": "2", "limit_usd": "1", "resets_at": None}],
    }
    assert gs.apply_decision(blocked)
    # the previous owner's unblock, judged on less usage, with a higher seq (clock ahead)
    assert not gs.apply_decision({**blocked, "blocked": False, "windows": [], "seq": 200, "watermarks": {}})
    assert not gs.apply_decision({**blocked, "blocked": False, "windows": [], "seq": 90})
    assert gs.decisions["team:t1"].blocked is True
    # a new owner whose clock is behind but who has seen more usage is believed
    assert gs.apply_decision({**blocked, "seq": 50, "watermarks": {"0": 11}})
    assert gs.decisions["team:t1"].seq == 50
    # same usage, budget raised: a higher seq unblocks
    assert gs.apply_decision({**blocked, "blocked": False, "windows": [], "seq": 51, "watermarks": {"0": 11}})
    assert gs.decisions["team:t1"].blocked is False


def test_state_supersedes_is_the_gate_rule_for_replay() -> None:
    held = _state("7", "2026-01-01T00:00:02Z", {"0": 10})
    assert not state_supersedes(_state("0", "2026-01-01T00:00:03Z", {}), held)
    assert state_supersedes(_state("7", "2026-01-01T00:00:03Z", {"0": 10}), held)
    assert state_supersedes(_state("9", "2026-01-01T00:00:01Z", {"0": 11}), held)
    assert state_supersedes(_state("1", "2026-01-01T00:00:03Z", None), held)  # no field: by as_of


def test_watermarks_that_are_not_offsets_are_rejected() -> None:
    gs = GateState()
    with pytest.raises(TypeError):
        gs.apply_state(_state("1", "2026-01-01T00:00:02Z", {"0": "ten"}))  # type: ignore[dict-item]
