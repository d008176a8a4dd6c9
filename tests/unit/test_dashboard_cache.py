"""The dashboard's cached overview: fresh enough while polled, never an idle hour old."""

from __future__ import annotations

from typing import Any

from spendgate.api.dashboard_model import OVERVIEW_TTL_S, STALE_ANSWER_S, Dashboard
from spendgate.domain.gate_state import GateState
from spendgate.domain.series import SpendHistory

T0 = 1_764_547_200.0  # 2025-12-01T00:00:00Z


def budget(state: GateState, scope: str, version: int) -> None:
    limits: list[dict[str, Any]] = [{"window": "1d", "max_usd": "1"}]
    state.apply_config(
        f"budget/{scope}", {"v": 1, "type": "budget", "version": version, "scope": scope, "limits": limits}
    )


async def test_an_expired_overview_is_answered_at_once_only_while_it_is_recent() -> None:
    state = GateState()
    board = Dashboard(state, SpendHistory(), dict, clock=lambda: T0)
    budget(state, "key:a", 1)
    assert len((await board.overview(T0)).keys) == 1
    budget(state, "key:b", 2)
    assert len((await board.overview(T0 + 1)).keys) == 1  # within the TTL: the cached order
    recent = await board.overview(T0 + OVERVIEW_TTL_S + 1)  # expired but recent: at once, old
    assert len(recent.keys) == 1
    budget(state, "key:c", 3)
    idle = await board.overview(T0 + OVERVIEW_TTL_S + 1 + STALE_ANSWER_S + 60)  # after an idle spell
    assert len(idle.keys) == 3  # waited for the next computation instead of an old list
