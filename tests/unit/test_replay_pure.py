"""spendgate.analysis: the pure side of `spendgate replay` (rebuild, blocks, what-if, diff)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import orjson
import pytest
from tests.factories import budget, config_record, usage_event_body

from spendgate.accounting.ingest import RawRecord
from spendgate.analysis import (
    Rebuild,
    diff_live,
    parse_budget_file,
    rebuild,
    report,
    scope_matcher,
    simulate,
)
from spendgate.domain.money import parse_usd
from spendgate.domain.registry import RegistryView
from spendgate.replay.options import AsOf, UsageError, parse_as_of, parse_time

EVERYTHING = scope_matcher(None)


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def records(*bodies: dict | bytes, partition: int = 0, first: int = 0) -> list[RawRecord]:
    return [
        RawRecord(partition, first + i, body if isinstance(body, bytes) else orjson.dumps(body))
        for i, body in enumerate(bodies)
    ]


def ev(event_id: str, at: str, cost: str, key_id: str = "k1", **fields: object) -> dict:
    return usage_event_body(event_id=event_id, occurred_at=f"{at}Z", cost_usd=cost, key_id=key_id, **fields)


def usd(text: str) -> int:
    return parse_usd(text)


def run(
    batches: Sequence[Sequence[RawRecord]], registry: RegistryView | None = None, **kw: object
) -> Rebuild:
    return rebuild(batches, registry or RegistryView(), **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ rebuild


def test_duplicate_event_id_is_counted_once_and_first_occurrence_wins() -> None:
    batch1 = records(ev("a", "2026-01-01T10:00:00", "1"), ev("b", "2026-01-01T10:01:00", "2"))
    batch2 = records(ev("a", "2026-01-01T10:05:00", "5"), ev("b", "2026-01-01T10:06:00", "7"), first=2)
    state = run([batch1, batch2])
    assert state.ledgers["key:k1"].total == usd("3")
    assert (state.events, state.duplicates) == (2, 2)


def test_duplicate_within_one_batch_is_dropped() -> None:
    state = run([records(ev("a", "2026-01-01T10:00:00", "1"), ev("a", "2026-01-01T10:00:00", "1"))])
    assert state.ledgers["key:k1"].total == usd("1") and state.duplicates == 1


def test_a_retry_later_than_the_dedupe_horizon_counts_again_as_in_the_live_worker() -> None:
    """The worker forgets an id ``SPENDGATE_DEDUPE_HORIZON_H`` after it; replay does the same,
    on the records' broker timestamps, so --diff-live agrees with it."""
    day = 86_400.0
    first = RawRecord(0, 0, orjson.dumps(ev("a", "2026-01-01T10:00:00", "1")), timestamp=1_000.0)
    soon = RawRecord(0, 1, orjson.dumps(ev("a", "2026-01-01T10:00:00", "1")), timestamp=1_000.0 + day - 1)
    late = RawRecord(0, 2, orjson.dumps(ev("a", "2026-01-01T10:00:00", "1")), timestamp=1_000.0 + 2 * day)
    within = run([[first], [soon]], horizon_s=day)
    assert within.ledgers["key:k1"].total == usd("1") and within.duplicates == 1
    after = run([[first], [soon], [late]], horizon_s=day)
    assert after.ledgers["key:k1"].total == usd("2") and after.duplicates == 1
    forever = run([[first], [soon], [late]])  # no horizon: every retry stays a duplicate
    assert forever.ledgers["key:k1"].total == usd("1") and forever.duplicates == 2


def test_invalid_records_are_counted_as_dead_letters_and_charge_nothing() -> None:
    state = run(
        [records(b"not json", ev("x", "2026-01-01T10:00:00", "-1"), ev("ok", "2026-01-01T10:00:00", "0.5"))]
    )
    assert state.dead_letters == 2 and state.events == 1
    assert state.ledgers["key:k1"].total == usd("0.5")


def test_fan_out_uses_the_registry_and_partitions_do_not_change_totals() -> None:
    registry = RegistryView()
    registry.apply("key/k1", config_record("key", key_id="k1", user_id="u1", team_id="t1"))
    registry.apply("team/t1", config_record("team", team_id="t1", org_id="o1"))
    p0 = records(ev("a", "2026-01-01T10:00:00", "1", model="openai/gpt-4o"), partition=0)
    p1 = records(ev("b", "2026-01-01T10:00:00", "2", key_id="k2", team_id="t1"), partition=1)
    one = run([p0 + p1], registry)
    two = run([p1, p0], registry)
    totals = {s: lg.total for s, lg in one.ledgers.items()}
    assert totals == {s: lg.total for s, lg in two.ledgers.items()}
    assert totals["team:t1"] == usd("3") and totals["org:o1"] == usd("3")
    assert totals["member:t1/u1"] == usd("1") and totals["model:openai%2Fgpt-4o"] == usd("1")


def test_late_event_is_counted_in_the_window_of_its_occurred_at() -> None:
    late = records(
        ev("d2", "2026-01-02T10:00:00", "0.5"),
        ev("d1a", "2026-01-01T10:00:00", "0.9"),
        ev("d1b", "2026-01-01T12:00:00", "0.2"),
    )
    state = run([late])
    ledger = state.ledgers["key:k1"]
    assert ledger.sum_between(int(ts("2026-01-01T00:00:00")), int(ts("2026-01-02T00:00:00"))) == usd("1.1")
    assert ledger.sum_between(int(ts("2026-01-02T00:00:00")), int(ts("2026-01-03T00:00:00"))) == usd("0.5")


def test_from_to_select_by_occurred_at_but_a_retry_of_an_earlier_event_stays_a_duplicate() -> None:
    batch = records(
        ev("old", "2026-01-01T09:00:00", "1"),
        ev("in", "2026-01-01T10:30:00", "2"),
        ev("old", "2026-01-01T10:31:00", "4"),  # retry of "old" with another time: still a duplicate
        ev("after", "2026-01-01T11:00:00", "8"),
    )
    state = run([batch], start=ts("2026-01-01T10:00:00"), end=ts("2026-01-01T11:00:00"))
    assert state.ledgers["key:k1"].total == usd("2")
    assert (state.duplicates, state.out_of_range) == (1, 2)


# --------------------------------------------------------------------- blocks / what-if


def tighter_budget_events() -> list[RawRecord]:
    return records(
        ev("e1", "2026-01-01T10:00:00", "0.4"),
        ev("e2", "2026-01-01T10:10:00", "0.4"),
        ev("e3", "2026-01-01T10:20:00", "0.3"),  # 1.1 >= 1: crosses, itself allowed
        ev("e4", "2026-01-01T10:30:00", "0.5"),  # denied
        ev("e5", "2026-01-01T10:59:59", "0.2"),  # denied
        ev("e6", "2026-01-01T11:05:00", "0.3"),  # new hour window: allowed
        ev("other", "2026-01-01T10:40:00", "9", key_id="k2"),  # another scope, no budget
    )


def test_what_if_tighter_budget_reports_exactly_the_calls_over_the_limit() -> None:
    budgets = parse_budget_file({"key:k1": {"limits": [{"window": "1h", "max_usd": "1"}]}})
    state = run([tighter_budget_events()], budgets=budgets)
    at = int(ts("2026-01-01T12:00:00"))
    by_scope = {r.scope: r for r in report(state, budgets, at=at, what_if=True, match=EVERYTHING)}
    t = by_scope["key:k1"].timeline
    assert [(o.event_id, o.prevented) for o in t.over_limit] == [("e3", False), ("e4", True), ("e5", True)]
    assert [o.nanos for o in t.over_limit] == [usd("0.3"), usd("0.5"), usd("0.2")]
    assert t.prevented_nanos == usd("0.7")
    [period] = t.blocked
    assert (period.start, period.until, period.windows, period.event_id) == (
        ts("2026-01-01T10:20:00"),
        ts("2026-01-01T11:00:00"),
        ("1h",),
        "e3",
    )
    assert by_scope["key:k2"].budget is None and by_scope["key:k2"].timeline.over_limit == []


def test_what_if_denied_call_charges_no_other_budgeted_scope() -> None:
    registry = RegistryView()
    registry.apply("key/k1", config_record("key", key_id="k1", team_id="t1"))
    budgets = parse_budget_file(
        {
            "team:t1": {"limits": [{"window": "1d", "max_usd": "1"}]},
            "key:k1": {"limits": [{"window": "1d", "max_usd": "1.5"}]},
        }
    )
    batch = records(
        ev("a", "2026-01-01T10:00:00", "1"),  # team crosses 1
        ev("b", "2026-01-01T11:00:00", "1"),  # denied by team: must not push key to 2
        ev("c", "2026-01-01T12:00:00", "0.4"),  # denied too
    )
    state = run([batch], registry, budgets=budgets)
    timelines = simulate(state.charges, budgets, end=ts("2026-01-01T23:00:00"), what_if=True)
    assert [(o.event_id, o.prevented) for o in timelines["team:t1"].over_limit] == [
        ("a", False),
        ("b", True),
        ("c", True),
    ]
    assert timelines["key:k1"].blocked == [] and timelines["key:k1"].over_limit == []
    assert timelines["team:t1"].blocked[0].until is None  # still blocked at the end


def test_live_budget_blocks_in_event_time_order_and_unblocks_at_the_reset() -> None:
    registry = RegistryView()
    registry.apply(
        "budget/key:k1", config_record("budget", scope="key:k1", limits=[{"window": "1d", "max_usd": "1"}])
    )
    late = records(
        ev("d2", "2026-01-02T10:00:00", "0.5"),
        ev("d1a", "2026-01-01T10:00:00", "0.9"),  # late events, in the log after day 2
        ev("d1b", "2026-01-01T12:00:00", "0.2"),
        ev("d1c", "2026-01-01T13:00:00", "0.1"),  # charged while blocked: still counted live
    )
    state = run([late], registry, budgets=registry.budgets)
    [r] = report(state, registry.budgets, at=int(ts("2026-01-02T12:00:00")), what_if=False, match=EVERYTHING)
    [period] = r.timeline.blocked
    assert (period.start, period.until) == (ts("2026-01-01T12:00:00"), ts("2026-01-02T00:00:00"))
    assert [(o.event_id, o.prevented) for o in r.timeline.over_limit] == [("d1b", False), ("d1c", True)]
    assert not r.status.blocked and r.status.windows[0].spend == usd("0.5")


def test_scope_pattern_limits_the_report() -> None:
    registry = RegistryView()
    registry.apply("key/k1", config_record("key", key_id="k1", team_id="t1"))
    state = run([records(ev("a", "2026-01-01T10:00:00", "1"))], registry)
    reports = report(
        state, {}, at=int(ts("2026-01-01T12:00:00")), what_if=False, match=scope_matcher("team:*")
    )
    assert [r.scope for r in reports] == ["team:t1"]


def test_budget_file_errors_name_the_scope() -> None:
    with pytest.raises(ValueError, match="team:t1"):
        parse_budget_file({"team:t1": {"limits": [{"window": "1h", "max_usd": "-1"}]}})
    assert parse_budget_file({"team:t1": {"limits": []}}) == {}
    assert parse_budget_file(
        {"key:k1": {"limits": [{"window": "1h", "max_usd": "2"}], "tz": "Europe/Paris"}}
    ) == {"key:k1": budget(("1h", "2"), tz="Europe/Paris")}


# --------------------------------------------------------------------------------- diff


def live_state(scope: str, total: str, *windows: tuple[str, str, str, str]) -> dict:
    return {
        "v": 1,
        "scope": scope,
        "as_of": "2026-01-01T12:00:00Z",
        "windows": [{"window": w, "start": s, "resets_at": e, "spend_usd": v} for w, s, e, v in windows]
        + [{"window": "total", "start": None, "resets_at": None, "spend_usd": total}],
    }


def test_diff_live_is_empty_when_equal_and_names_every_difference() -> None:
    state = run(
        [records(ev("a", "2026-01-01T10:00:00", "1"), ev("b", "2026-01-01T11:30:00", "2", key_id="k2"))]
    )
    hour = ("1h", "2026-01-01T10:00:00Z", "2026-01-01T11:00:00Z", "1")
    live = {"key:k1": live_state("key:k1", "1", hour), "key:k2": live_state("key:k2", "2")}
    assert diff_live(state.ledgers, live, EVERYTHING) == []

    tampered = {**live, "key:k1": live_state("key:k1", "1.5", ("1h", *hour[1:3], "0.9"))}
    diffs = diff_live(state.ledgers, tampered, EVERYTHING)
    assert [(d.scope, d.window, d.live, d.rebuilt) for d in diffs] == [
        ("key:k1", "1h", "0.9", "1"),
        ("key:k1", "total", "1.5", "1"),
    ]
    missing = diff_live(state.ledgers, {"key:k1": live["key:k1"]}, EVERYTHING)
    assert [str(d) for d in missing] == ["key:k2 total: live missing, rebuilt 2"]
    assert diff_live(state.ledgers, {"key:k1": live["key:k1"]}, scope_matcher("key:k1")) == []


def test_diff_live_accepts_a_budgeted_scope_without_spend() -> None:
    assert diff_live({}, {"team:t9": live_state("team:t9", "0")}, EVERYTHING) == []
    assert [d.scope for d in diff_live({}, {"team:t9": live_state("team:t9", "3")}, EVERYTHING)] == [
        "team:t9"
    ]


# ------------------------------------------------------------------------------ options


def test_as_of_is_offsets_or_a_time() -> None:
    assert parse_as_of("0:10, 3:7") == AsOf(offsets={0: 10, 3: 7})
    assert parse_as_of("2026-01-01T10:00:00Z") == AsOf(time=ts("2026-01-01T10:00:00"))
    assert parse_time("2026-01-01", "--from") == ts("2026-01-01T00:00:00")
    assert parse_time("2026-01-01T11:00:00+01:00", "--to") == ts("2026-01-01T10:00:00")
    with pytest.raises(UsageError, match="--to"):
        parse_time("yesterday", "--to")


def test_replay_options_are_declared_in_the_cli_and_a_bad_one_exits_2() -> None:
    from typer.testing import CliRunner

    from spendgate.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["replay", "--help"]).output
    assert runner.invoke(app, ["replay", "-h"]).output == help_text
    for option in ("--from", "--to", "--scope", "--budgets", "--format", "--out", "--diff-live", "--as-of"):
        assert option in help_text
    bad_format = runner.invoke(app, ["replay", "--format", "xml"])
    assert bad_format.exit_code == 2 and "--format: must be table, csv or json" in bad_format.output
    backwards = runner.invoke(app, ["replay", "--from", "2026-02-01", "--to", "2026-01-01"])
    assert backwards.exit_code == 2 and "--to must be after --from" in backwards.output
    unknown = runner.invoke(app, ["replay", "--since", "yesterday"])
    assert unknown.exit_code == 2
