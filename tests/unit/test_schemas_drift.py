"""schemas/*.schema.json are generated from records.py: this fails when a model changed without
``make schemas`` (or a schema file was edited by hand)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spendgate.records import SCHEMA_MODELS, schema_documents

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_every_record_has_a_committed_schema_and_nothing_else_is_there() -> None:
    assert sorted(p.name for p in SCHEMAS.glob("*.schema.json")) == sorted(schema_documents())


@pytest.mark.parametrize("name", sorted(schema_documents()))
def test_committed_schema_equals_the_generated_one(name: str) -> None:
    committed = json.loads((SCHEMAS / name).read_text())
    assert committed == schema_documents()[name], f"schemas/{name} is stale: run `make schemas`"


def test_committed_schemas_are_formatted_as_the_exporter_writes_them() -> None:
    for name, doc in schema_documents().items():
        assert (SCHEMAS / name).read_text() == json.dumps(doc, indent=2, sort_keys=True) + "\n", name


def test_every_public_topic_record_is_exported() -> None:
    assert {"usage", "usage.dlq", "decision", "state", "alert"} <= set(SCHEMA_MODELS)
    assert {n for n in SCHEMA_MODELS if n.startswith("config.")} == {
        f"config.{t}" for t in ("org", "team", "key", "member", "budget", "token")
    }


def test_usage_schema_accepts_numbers_for_costs_and_outputs_use_strings() -> None:
    docs = schema_documents()
    cost = docs["usage.schema.json"]["properties"]["cost_usd"]["anyOf"][0]
    assert cost["type"] == ["string", "number"]
    spend = docs["decision.schema.json"]["$defs"]["DecisionWindow"]["properties"]["spend_usd"]
    assert spend["type"] == "string"
