"""records: the frozen wire models of every topic (CONTRACT §2), money as decimal strings."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from factories import config_record, usage_event, usage_event_body
from spendgate.domain.money import NANOS_PER_USD
from spendgate.records import (
    Alert,
    BudgetRecord,
    ConfigRecord,
    Decision,
    DecisionWindow,
    Source,
    State,
    StateWindow,
    UsageEvent,
)


def _reject(**overrides: Any) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        usage_event(**overrides)
    return info.value


def test_contract_example_event_is_accepted() -> None:
    raw = (
        '{"v": 1, "event_id": "5b0c", "kind": "cost", "occurred_at": "2026-11-23T10:00:00.123Z",'
        ' "key_id": "k_123", "end_user_id": "alice", "model": "openai/gpt-4o", "tags": ["prod"],'
        ' "cost_usd": "0.001230", "request_id": "r-1", "tokens": {"input": 812, "output": 96},'
        ' "user_id": null, "team_id": null, "org_id": null}'
    )
    event = UsageEvent.model_validate_json(raw)
    assert event.cost_usd == 1_230_000 and event.charge_nanos == 1_230_000
    assert event.occurred_at == datetime(2026, 11, 23, 10, 0, 0, 123000, tzinfo=UTC)


def test_cost_event_without_cost_is_rejected() -> None:
    body = usage_event_body()
    del body["cost_usd"]
    with pytest.raises(ValidationError, match="cost_usd is required"):
        UsageEvent.model_validate(body)
    _reject(cost_usd=None)


def test_request_event_without_cost_is_accepted_and_charges_nothing() -> None:
    body = usage_event_body(kind="request", estimated_cost_usd="0.5")
    del body["cost_usd"]
    event = UsageEvent.model_validate(body)
    assert event.charge_nanos == 0 and event.estimated_cost_usd == NANOS_PER_USD // 2


def test_request_event_with_a_cost_still_charges_nothing() -> None:
    assert usage_event(kind="request", cost_usd="3").charge_nanos == 0


def test_kind_defaults_to_cost() -> None:
    body = usage_event_body()
    del body["kind"]
    assert UsageEvent.model_validate(body).kind == "cost"


@pytest.mark.parametrize("ts", ["2026-11-23T10:00:00", "2026-11-23 10:00:00", "2026-11-23", "yesterday", ""])
def test_timestamp_without_offset_is_rejected(ts: object) -> None:
    _reject(occurred_at=ts)


def test_timestamp_offset_is_kept() -> None:
    event = usage_event(occurred_at="2026-11-23T05:00:00-05:00")
    assert event.occurred_at.timestamp() == datetime(2026, 11, 23, 10, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    "cost", ["-1", -0.01, "NaN", "Infinity", "1000000.01", 1e7, "0.0000000001", "x", True]
)
def test_invalid_cost_is_rejected(cost: object) -> None:
    _reject(cost_usd=cost)


def test_nan_and_infinite_json_numbers_are_rejected() -> None:
    for text in ("NaN", "Infinity", "-Infinity", "1e400", "1e999999"):
        raw = json.dumps(usage_event_body()).replace('"0.001230"', text)
        with pytest.raises(ValidationError):
            UsageEvent.model_validate_json(raw)


def test_json_number_cost_is_read_exactly() -> None:
    raw = json.dumps(usage_event_body()).replace('"0.001230"', "0.1")
    assert UsageEvent.model_validate_json(raw).cost_usd == 100_000_000


def test_event_id_longer_than_128_is_rejected() -> None:
    _reject(event_id="e" * 129)
    assert usage_event(event_id="e" * 128).event_id == "e" * 128


@pytest.mark.parametrize("field", ["event_id", "key_id", "occurred_at"])
def test_required_fields_are_required(field: str) -> None:
    body = usage_event_body()
    del body[field]
    with pytest.raises(ValidationError):
        UsageEvent.model_validate(body)


@pytest.mark.parametrize("v", [0, 2, "1", None])
def test_other_versions_are_rejected(v: object) -> None:
    _reject(v=v)


def test_unknown_fields_of_an_event_are_ignored() -> None:
    assert not hasattr(usage_event(extra_field=1), "extra_field")


def test_empty_ids_and_too_many_tags_are_rejected() -> None:
    _reject(key_id="")
    _reject(end_user_id="")
    _reject(tags=[""])
    _reject(tags=[f"t{i}" for i in range(65)])


def test_events_are_frozen() -> None:
    with pytest.raises(ValidationError):
        usage_event().key_id = "other"  # type: ignore[misc]


def test_money_serializes_as_decimal_strings() -> None:
    out = json.loads(usage_event(cost_usd=0.1, estimated_cost_usd="12.50").model_dump_json())
    assert out["cost_usd"] == "0.1" and out["estimated_cost_usd"] == "12.5"


def test_event_round_trips_through_its_json() -> None:
    event = usage_event(tags=["a", "b"], tokens={"input": 1, "output": 2}, model="openai/gpt-4o")
    assert UsageEvent.model_validate_json(event.model_dump_json()) == event


def test_decision_serializes_like_the_contract_example() -> None:
    decision = Decision(
        scope="team:t1",
        blocked=True,
        seq=42,
        as_of=datetime(2026, 11, 23, 10, tzinfo=UTC),
        windows=[
            DecisionWindow.model_validate(
                {
                    "window": "1d",
                    "spend_usd": "100.03",
                    "limit_usd": "100",
                    "resets_at": "2026-11-24T00:00:00Z",
                }
            )
        ],
        source=Source(partition=3, offset=1812),
    )
    out = json.loads(decision.model_dump_json())
    assert out["v"] == 1
    assert out["windows"] == [
        {"window": "1d", "spend_usd": "100.03", "limit_usd": "100", "resets_at": "2026-11-24T00:00:00Z"}
    ]
    assert out["as_of"] == "2026-11-23T10:00:00Z" and out["source"] == {"partition": 3, "offset": 1812}
    assert Decision.model_validate_json(decision.model_dump_json()) == decision


def test_state_total_window_has_no_bounds() -> None:
    state = State(
        scope="key:k1",
        as_of=datetime(2026, 11, 23, tzinfo=UTC),
        windows=[
            StateWindow.model_validate(
                {"window": "total", "start": None, "resets_at": None, "spend_usd": "17.20"}
            )
        ],
    )
    out = json.loads(state.model_dump_json())
    assert out["windows"] == [
        {"window": "total", "start": None, "resets_at": None, "spend_usd": "17.2", "reserved_usd": "0"}
    ]


def test_alert_kinds_are_closed() -> None:
    with pytest.raises(ValidationError):
        Alert(scope="team:t1", kind="exploded", window="1d", as_of=datetime(2026, 1, 1, tzinfo=UTC))  # type: ignore[arg-type]


def test_output_records_forbid_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        Source(partition=1, offset=2, extra=3)  # type: ignore[call-arg]


config = TypeAdapter(ConfigRecord)


@pytest.mark.parametrize("type_", ["org", "team", "key", "member", "budget", "token"])
def test_config_records_validate_by_their_type(type_: str) -> None:
    record = config.validate_python(config_record(type_, 3))
    assert record.type == type_ and record.version == 3
    assert config.validate_json(config.dump_json(record)) == record


def test_budget_record_with_null_limits_is_valid() -> None:
    record = config.validate_python(config_record("budget", 1, limits=None))
    assert isinstance(record, BudgetRecord) and record.limits is None


def test_config_record_with_negative_version_or_unknown_type_is_rejected() -> None:
    with pytest.raises(ValidationError):
        config.validate_python(config_record("key", -1))
    with pytest.raises(ValidationError):
        config.validate_python({**config_record("key"), "type": "gadget"})
