"""domain.gate_state: the gate's in-memory view, applied from decoded topic records."""

from __future__ import annotations

import pytest

from factories import config_record
from spendgate.domain.errors import InvalidInput
from spendgate.domain.gate_state import GateState, epoch, nanos
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
