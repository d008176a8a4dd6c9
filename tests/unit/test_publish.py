"""Stage B publishing: decisions on change only, alerts once per window, seq strictly growing."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from spendgate.accounting.publish import Publisher, wire_watermarks
from spendgate.domain.budgets import parse_budget
from spendgate.domain.decide import ScopeStatus
from spendgate.domain.ledger import ScopeLedger, minute_charges
from spendgate.domain.money import format_usd
from spendgate.records import Source, State, StateWindow

T0 = int(datetime(2026, 11, 23, 10, 0, tzinfo=UTC).timestamp())
USD = 1_000_000_000
SCOPE = "team:t1"
HOURLY = parse_budget({"limits": [{"window": "1h", "max_usd": "10", "soft_usd": "8"}]})


def _ts(instant: int | float | None) -> datetime | None:
    return None if instant is None else datetime.fromtimestamp(instant, UTC)


def state_record(
    scope: str,
    status: ScopeStatus,
    now: float,
    source: Source | None,
    watermarks: Mapping[int, int] | None = None,
) -> State:
    """The ``spend.state`` record as the pydantic model builds it: the oracle for ``state_json``."""
    return State(
        scope=scope,
        as_of=_ts(now),  # type: ignore[arg-type]
        source=source,
        watermarks=None if watermarks is None else wire_watermarks(watermarks),
        windows=[
            StateWindow(
                window=w.window,
                start=_ts(w.start),
                resets_at=_ts(w.resets_at),
                spend_usd=format_usd(w.spend),  # type: ignore[arg-type]
            )
            for w in status.windows
        ],
    )


def spend(ledger: ScopeLedger, offset: int, usd: int, at: int = T0) -> None:
    ledger.apply(0, offset, minute_charges([(at, usd * USD)]))


def test_an_unbudgeted_scope_publishes_no_decision() -> None:
    ledger = ScopeLedger()
    spend(ledger, 0, 5)
    out = Publisher().evaluate("key:k1", parse_budget(None), ledger, T0 + 60, None)
    assert out.decision is None and out.alerts == []


def test_first_evaluation_of_a_budgeted_scope_publishes_its_decision_even_when_unblocked() -> None:
    out = Publisher().evaluate(SCOPE, HOURLY, ScopeLedger(), T0 + 60, None)
    assert out.decision is not None and out.decision.blocked is False and out.decision.windows == []


def test_no_new_decision_while_nothing_a_reader_holds_changes() -> None:
    publisher, ledger = Publisher(), ScopeLedger()
    publisher.evaluate(SCOPE, HOURLY, ledger, T0 + 60, None)
    spend(ledger, 0, 3)
    assert publisher.evaluate(SCOPE, HOURLY, ledger, T0 + 120, None).decision is None


def test_soft_then_hard_limit_alert_once_each_and_the_decision_names_the_window() -> None:
    publisher, ledger = Publisher(), ScopeLedger()
    spend(ledger, 0, 8)
    soft = publisher.evaluate(SCOPE, HOURLY, ledger, T0 + 60, Source(partition=0, offset=0))
    assert [a.kind for a in soft.alerts] == ["soft_limit"]
    assert publisher.evaluate(SCOPE, HOURLY, ledger, T0 + 61, None).alerts == []
    spend(ledger, 1, 2)
    hard = publisher.evaluate(SCOPE, HOURLY, ledger, T0 + 62, Source(partition=0, offset=1))
    assert hard.decision is not None and hard.decision.blocked is True
    window = hard.decision.windows[0]
    assert (window.window, window.spend_usd, window.limit_usd) == ("1h", 10 * USD, 10 * USD)
    assert hard.decision.source == Source(partition=0, offset=1)
    assert [a.kind for a in hard.alerts] == ["blocked"]


def test_the_window_reset_unblocks_with_an_alert_and_a_higher_seq() -> None:
    publisher, ledger = Publisher(), ScopeLedger()
    spend(ledger, 0, 10)
    blocked = publisher.evaluate(SCOPE, HOURLY, ledger, T0 + 60, None).decision
    after_reset = publisher.evaluate(SCOPE, HOURLY, ledger, T0 + 3600, None)
    assert blocked is not None and after_reset.decision is not None
    assert after_reset.decision.blocked is False and after_reset.decision.seq > blocked.seq
    assert [a.kind for a in after_reset.alerts] == ["unblocked"]


def test_seq_grows_strictly_even_when_the_clock_does_not() -> None:
    publisher, ledger = Publisher(), ScopeLedger()
    first = publisher.evaluate(SCOPE, HOURLY, ledger, T0, None).decision
    spend(ledger, 0, 10)
    second = publisher.evaluate(SCOPE, HOURLY, ledger, T0, None).decision
    assert first is not None and second is not None and second.seq == first.seq + 1


def test_the_next_window_alerts_again() -> None:
    publisher, ledger = Publisher(), ScopeLedger()
    spend(ledger, 0, 10)
    publisher.evaluate(SCOPE, HOURLY, ledger, T0 + 60, None)
    spend(ledger, 1, 10, at=T0 + 3600)
    again = publisher.evaluate(SCOPE, HOURLY, ledger, T0 + 3660, None)
    assert [a.kind for a in again.alerts] == ["soft_limit", "blocked"]


def test_state_record_lists_budget_windows_plus_total() -> None:
    ledger = ScopeLedger()
    spend(ledger, 0, 3)
    status = Publisher().evaluate(SCOPE, HOURLY, ledger, T0 + 60, None).status
    assert status is not None
    record = state_record(SCOPE, status, T0 + 60, Source(partition=0, offset=0))
    assert [(w.window, w.spend_usd) for w in record.windows] == [("1h", 3 * USD), ("total", 3 * USD)]
    assert record.model_dump(mode="json")["windows"][0]["spend_usd"] == "3"


def test_fast_state_json_equals_the_state_record_model() -> None:
    import orjson

    from spendgate.accounting.publish import state_json

    ledger = ScopeLedger()
    spend(ledger, 0, 3)
    status = Publisher().evaluate(SCOPE, HOURLY, ledger, T0 + 60.5, None).status
    assert status is not None
    source = Source(partition=1, offset=7)
    model = state_record(SCOPE, status, T0 + 60.5, source).model_dump(mode="json")
    assert orjson.loads(state_json(SCOPE, status, T0 + 60.5, source)) == model


def test_decisions_and_state_carry_the_ledger_watermarks() -> None:
    import orjson

    from spendgate.accounting.publish import state_json

    ledger = ScopeLedger()
    spend(ledger, 4, 3)
    ledger.apply(2, 9, minute_charges([(T0, USD)]))
    out = Publisher().evaluate(SCOPE, HOURLY, ledger, T0 + 60, None, ledger.hot.watermarks)
    assert out.decision is not None and out.status is not None
    assert out.decision.model_dump(mode="json")["watermarks"] == {"0": 4, "2": 9}
    wire = orjson.loads(state_json(SCOPE, out.status, T0 + 60, None, ledger.hot.watermarks))
    assert wire["watermarks"] == {"0": 4, "2": 9}
    assert wire == state_record(SCOPE, out.status, T0 + 60, None, ledger.hot.watermarks).model_dump(
        mode="json"
    )


def test_forget_where_drops_only_the_lost_scopes() -> None:
    publisher, ledger = Publisher(), ScopeLedger()
    spend(ledger, 0, 9)
    for scope in ("team:kept", "team:lost"):
        publisher.evaluate(scope, HOURLY, ledger, T0 + 60, None)
    publisher.forget_where(lambda scope: scope == "team:lost")
    assert set(publisher.published) == {"team:kept"}
    assert {mark[0] for mark in publisher.alerted} == {"team:kept"}
