"""Holds (issue 15): stage A marks each request's hold and end exactly once, stage B reserves
until settle/release/expiry in event time, the gate counts its own holds until state reflects
them, and checks block on spend + reserved."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
from test_check import DAY_END, DAY_START, NOW, state_record, with_budget

from spendgate.accounting.deltas import Delta, decode_bundle, encode_bundle
from spendgate.accounting.ingest import RawRecord
from spendgate.accounting.seen import SeenIds, plan_with_seen
from spendgate.analysis import Rebuild, diff_live
from spendgate.domain.check import CheckRequest, check
from spendgate.domain.gate_state import GateState
from spendgate.domain.holds import (
    DEFAULT_TTL_S,
    MAX_TTL_S,
    HoldBook,
    LocalHold,
    LocalHolds,
    apply_ops,
    event_id_for,
    expires_at_ms,
    hold_id,
    reserved,
)
from spendgate.domain.ledger import HotRecord, ScopeLedger
from spendgate.domain.money import NANOS_PER_USD
from spendgate.domain.registry import RegistryView

TOPIC = "spend.usage"
T0 = datetime(2026, 11, 23, 10, 0, 0, tzinfo=UTC).timestamp()
CENT = NANOS_PER_USD // 100


def at(seconds: float = 0) -> str:
    return datetime.fromtimestamp(T0 + seconds, UTC).isoformat().replace("+00:00", "Z")


def usage(kind: str, n: int, request_id: str = "r1", key: str = "k1", **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"event_id": f"{kind}-{n}", "occurred_at": at(), "key_id": key, "kind": kind}
    if kind == "hold":
        body["estimated_cost_usd"] = "0.01"
    if kind == "cost":
        body["cost_usd"] = "0.02"
    if request_id:
        body["request_id"] = request_id
    return {**body, **fields}


def records(events: list[dict[str, Any]], partition: int = 0, first: int = 0) -> list[RawRecord]:
    return [
        RawRecord(partition, first + i, orjson.dumps(e), str(e["key_id"]).encode(), T0)
        for i, e in enumerate(events)
    ]


class Stage:
    """Stage A + B in memory, like the worker: a batch at a time, optional crash replays."""

    def __init__(self) -> None:
        self.seen = SeenIds(3600)
        self.book = HoldBook()
        self.ledgers: dict[str, ScopeLedger] = {}
        self.progress: dict[int, int] = {}
        self.tables: dict[str, Any] = {}

    def feed(self, batch: list[RawRecord], *, apply: bool = True) -> list[Delta]:
        plan, writes = plan_with_seen(
            self.seen,
            batch,
            now={0: T0},
            progress=self.progress,
            registry=RegistryView(),
            topic=TOPIC,
            holds=self.book,
        )
        for items in writes.values():
            for key, value in items:
                if value is None:
                    self.tables.pop(key, None)
                else:
                    self.tables[key] = value
        self.progress.update(plan.progress)
        if apply:
            self.apply(plan.deltas)
        return plan.deltas

    def apply(self, deltas: list[Delta]) -> None:
        for d in decode_bundle(encode_bundle(deltas)):  # through the wire format
            self.ledgers.setdefault(d.scope, ScopeLedger()).apply(d.partition, d.last, d.minutes, d.holds)

    def crash(self) -> None:
        """Lose memory; recover the seen ids and hold marks from the table."""
        self.seen = SeenIds(3600)
        self.seen.load(0, self.tables.items())
        self.book = HoldBook()
        self.book.load(0, self.tables.items())

    def reserved(self, scope: str = "key:k1", seconds: float = 1) -> int:
        ledger = self.ledgers.get(scope)
        return 0 if ledger is None else ledger.reserved(int((T0 + seconds) * 1000))

    def spend(self, scope: str = "key:k1") -> int:
        ledger = self.ledgers.get(scope)
        return 0 if ledger is None else ledger.total


# --- stage A + B ------------------------------------------------------------------------------


def test_hold_reserves_on_every_scope_of_its_event_until_settled_by_the_cost() -> None:
    s = Stage()
    s.feed(records([usage("hold", 1, model="m1", tags=["a"])]))
    for scope in ("key:k1", "model:m1", "key_model:k1/m1", "tag:a"):
        assert s.reserved(scope) == CENT
    s.feed(records([usage("cost", 1)], first=1))  # the settle names no model: the hold's scopes end
    for scope in ("key:k1", "model:m1", "key_model:k1/m1", "tag:a"):
        assert s.reserved(scope) == 0
    assert s.spend() == 2 * CENT  # the actual cost replaces the estimate, however different


def test_a_settle_charges_its_own_scopes_and_only_ends_the_holds_other_scopes() -> None:
    """The hold named model m1 and tag a; the cost names model m2: m2 is charged, m1 and the tag
    only see their hold end (they were charged twice before the fix)."""
    s = Stage()
    s.feed(records([usage("hold", 1, model="m1", tags=["a"])]))
    s.feed(records([usage("cost", 1, model="m2")], first=1))
    for scope in ("key:k1", "model:m1", "key_model:k1/m1", "tag:a", "model:m2", "key_model:k1/m2"):
        assert s.reserved(scope) == 0, scope
    assert s.spend("key:k1") == s.spend("model:m2") == s.spend("key_model:k1/m2") == 2 * CENT
    assert s.spend("model:m1") == s.spend("key_model:k1/m1") == s.spend("tag:a") == 0


def test_settle_with_a_smaller_cost_and_release_and_expiry_each_end_the_hold() -> None:
    s = Stage()
    s.feed(records([usage("hold", 1, "a"), usage("hold", 2, "b"), usage("hold", 3, "c", hold_ttl_s=60)]))
    assert s.reserved() == 3 * CENT
    s.feed(records([usage("cost", 4, "a", cost_usd="0.001"), usage("release", 5, "b")], first=3))
    assert s.reserved() == CENT and s.spend() == CENT // 10
    assert s.reserved(seconds=59.9) == CENT
    assert s.reserved(seconds=60) == 0  # expired at occurred_at + hold_ttl_s, in event time


def test_a_hold_dated_in_the_future_expires_its_ttl_after_the_broker_appended_it() -> None:
    """A gateway clock running ahead (occurred_at in 2099) must not pin the budget until then."""
    s = Stage()
    s.feed(records([usage("hold", 1, "f", hold_ttl_s=60, occurred_at="2099-01-01T00:00:00Z")]))
    assert s.reserved(seconds=59.9) == CENT  # appended at T0 (records() stamps the broker time)
    assert s.reserved(seconds=60) == 0


def test_settle_before_its_hold_in_the_log_voids_the_hold() -> None:
    s = Stage()
    s.feed(records([usage("cost", 1), usage("hold", 2)]))
    assert s.reserved() == 0 and s.spend() == 2 * CENT
    s.feed(records([usage("hold", 3), usage("cost", 4), usage("release", 5)], first=2))
    assert s.reserved() == 0 and s.spend() == 4 * CENT  # a second cost is a cost, not a settle


def test_a_hold_event_touches_its_scopes_even_when_it_holds_nothing() -> None:
    # the gate waits for a state record reflecting its hold event's offset
    s = Stage()
    deltas = s.feed(records([usage("cost", 1), usage("hold", 2)]))
    assert {d.scope for d in deltas} == {"key:k1"} and deltas[0].last == 1 and not deltas[0].holds


def test_duplicate_holds_hold_once_and_duplicate_settles_change_nothing() -> None:
    s = Stage()
    s.feed(records([usage("hold", 1), usage("hold", 2), usage("hold", 1)]))
    assert s.reserved() == CENT
    s.feed(records([usage("release", 3), usage("release", 4), usage("hold", 5)], first=3))
    assert s.reserved() == 0


def test_ttl_defaults_to_600_and_is_capped_at_3600() -> None:
    assert expires_at_ms(T0, None) == (T0 + DEFAULT_TTL_S) * 1000
    assert expires_at_ms(T0, 99_999) == (T0 + MAX_TTL_S) * 1000


KINDS = st.lists(st.sampled_from(["hold", "cost", "release", "again"]), min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(kinds=KINDS, cut=st.integers(0, 8), crash_after=st.booleans())
def test_any_order_of_holds_and_ends_reserves_exactly_once(
    kinds: list[str], cut: int, crash_after: bool
) -> None:
    """Whatever the order, batching, repeats and crash replays: the hold counts iff the first
    hold of the request comes before every end in the log; the costs count once each."""
    events = []
    for n, kind in enumerate(kinds):
        events.append(usage("hold", 0) if kind == "again" else usage(kind, n + 1))  # "again": same event id
    log = records(events)
    s = Stage()
    first_batch = log[:cut]
    deltas = s.feed(first_batch, apply=not crash_after)
    if crash_after:  # the deltas were lost after seen/progress/marks were written: replay them
        s.crash()
        s.apply(deltas[: len(deltas) // 2])  # some deltas had been applied
        s.apply(s.feed(first_batch, apply=False))
    s.feed(log[cut:])
    s.crash()
    s.feed(log)  # the whole log again (a broker redelivery): nothing changes
    kinds_once = []
    seen_ids = set()
    for e in events:
        if e["event_id"] not in seen_ids:
            seen_ids.add(e["event_id"])
            kinds_once.append(e["kind"])
    holds = [i for i, k in enumerate(kinds_once) if k == "hold"]
    ends = [i for i, k in enumerate(kinds_once) if k in ("cost", "release")]
    open_hold = bool(holds) and not ends
    assert s.reserved() == (CENT if open_hold else 0)
    assert s.spend() == 2 * CENT * kinds_once.count("cost")


def test_hold_marks_survive_a_restart_through_the_table() -> None:
    s = Stage()
    s.feed(records([usage("hold", 1)]))
    s.crash()
    s.feed(records([usage("hold", 2), usage("cost", 3)], first=1))
    assert s.reserved() == 0 and s.spend() == 2 * CENT


def test_hold_marks_are_forgotten_after_the_horizon() -> None:
    book = HoldBook(horizon_s=10)
    assert book.on_hold("h", 0, 1, ["key:k1"])
    [(key, _)] = book.take_records(0, now=100)
    assert book.expire(0, now=105) == []
    assert book.expire(0, now=111) == [key]
    assert book.starts == {} and book.ends == {}


def test_delta_bundles_carry_hold_ops_and_read_old_bundles() -> None:
    deltas = [Delta("key:k1", 0, 1, 2, {5: 7}, [["h", 1, 2], ["h"]]), Delta("key:k2", 0, 1, 2, {5: 7})]
    assert decode_bundle(encode_bundle(deltas)) == deltas
    assert decode_bundle(orjson.dumps([["key:k1", 0, 1, 2, 5, 7]])) == [Delta("key:k1", 0, 1, 2, {5: 7})]


def test_ledger_holds_round_trip_and_are_applied_once() -> None:
    ledger = ScopeLedger()
    ledger.apply(0, 3, {}, [["h1", CENT, 5000]])
    ledger.apply(0, 3, {}, [["h2", CENT, 5000]])  # same watermark: already applied
    again = ScopeLedger(
        HotRecord.from_json(orjson.loads(orjson.dumps(ledger.hot.to_json(), option=orjson.OPT_NON_STR_KEYS)))
    )
    assert again.hot.holds == {"h1": [CENT, 5000]}
    assert again.reserved(4999) == CENT and again.reserved(5000) == 0
    assert "h" not in ScopeLedger().hot.to_json()  # records without holds keep their old format


def test_reserved_counts_only_live_holds() -> None:
    holds: dict[str, list[int]] = {}
    apply_ops(holds, [["a", 5, 100], ["b", 7, 200], ["a"]])
    assert reserved(holds, 99) == 7 and reserved(holds, 200) == 0


def test_gate_event_ids_are_the_same_for_every_replica_and_retry() -> None:
    assert event_id_for("hold", "k1", "r1") == event_id_for("hold", "k1", "r1")
    assert event_id_for("hold", "k1", "r1") != event_id_for("hold", "k1", "r2")
    assert event_id_for("hold", "k1", "r1") != event_id_for("release", "k1", "r1")
    assert len(event_id_for("release", "k" * 256, "r" * 256)) <= 128
    assert hold_id("k1", "r1") != hold_id("k", "1r1")


# --- replay ----------------------------------------------------------------------------------------


def test_replay_rebuilds_holds_and_diff_live_compares_reserved() -> None:
    s = Stage()
    log = records([usage("hold", 1, "a"), usage("hold", 2, "b"), usage("cost", 3, "a")])
    s.feed(log)
    rebuilt = Rebuild(RegistryView(), TOPIC)
    rebuilt.feed(log)
    as_of = T0 + 1
    live = {
        "key:k1": {
            "scope": "key:k1",
            "as_of": datetime.fromtimestamp(as_of, UTC).isoformat(),
            "windows": [{"window": "total", "spend_usd": "0.02", "reserved_usd": "0.01"}],
        }
    }
    assert s.reserved(seconds=1) == CENT
    assert diff_live(rebuilt.ledgers, live, lambda _s: True) == []
    live["key:k1"]["windows"][0]["reserved_usd"] = "0.02"
    [difference] = diff_live(rebuilt.ledgers, live, lambda _s: True)
    assert str(difference) == "key:k1 reserved:total: live 0.02, rebuilt 0.01"


# --- the gate --------------------------------------------------------------------------------------


def held_state(scope: str, spend: str, reserved_usd: str, until: float, watermarks: dict[str, int]) -> dict:
    record = state_record(scope, ("1d", spend), ("total", spend))
    for w in record["windows"]:
        w["reserved_usd"] = reserved_usd
    record["holds_expire_at"] = datetime.fromtimestamp(until, UTC).isoformat()
    record["watermarks"] = watermarks
    return record


def gate_with_limit(limit: str = "1") -> GateState:
    return with_budget(GateState(), "key:k1", ("1d", limit))


def local_hold(rid: str = "r1", nanos: int = CENT, expires: float = NOW + 600) -> LocalHold:
    return LocalHold("k1", rid, ("key:k1",), nanos, expires)


@given(
    spend=st.integers(0, 120),
    held=st.integers(0, 120),
    estimate=st.integers(0, 120),
)
def test_checks_block_on_spend_plus_reserved(spend: int, held: int, estimate: int) -> None:
    gs = gate_with_limit("1")
    gs.apply_state(held_state("key:k1", f"{spend / 100:.2f}", f"{held / 100:.2f}", NOW + 60, {"0": 1}))
    plain = check(CheckRequest("k1"), gs, NOW)
    assert plain.allowed == (spend + held < 100)
    reserving = check(CheckRequest("k1", estimated_cost_nanos=estimate * CENT), gs, NOW)
    # (a window at its limit blocks every check, as without holds: that only matters for a 0 estimate)
    assert reserving.allowed == (spend + held + estimate <= 100 and spend + held < 100)
    if not reserving.allowed and held:
        assert all(b.reserved == held * CENT for b in reserving.blocked_by)
        assert "reserved_usd" in reserving.blocked_by[0].to_json()


def test_a_state_records_holds_stop_counting_at_holds_expire_at() -> None:
    gs = gate_with_limit("1")
    gs.apply_state(held_state("key:k1", "0.5", "0.5", NOW + 60, {"0": 1}))
    assert not check(CheckRequest("k1"), gs, NOW).allowed
    assert check(CheckRequest("k1"), gs, NOW + 60).allowed  # a stopped worker leaks nothing


def test_local_holds_count_at_once_until_a_state_record_reflects_their_offset() -> None:
    gs = gate_with_limit("0.02")
    first, second = local_hold("r1"), local_hold("r2")
    gs.local.add(first)
    assert check(CheckRequest("k1", estimated_cost_nanos=CENT), gs, NOW).allowed
    gs.local.add(second)
    assert not check(CheckRequest("k1", estimated_cost_nanos=CENT), gs, NOW).allowed
    gs.local.placed(first, 0, 7)
    gs.local.placed(second, 1, 3)
    gs.apply_state(held_state("key:k1", "0", "0.01", NOW + 600, {"0": 7}))  # reflects the first only
    assert gs.held("key:k1", NOW) == 2 * CENT  # never both, never neither
    gs.apply_state(held_state("key:k1", "0", "0.02", NOW + 600, {"0": 7, "1": 3}))
    assert gs.held("key:k1", NOW) == 2 * CENT and gs.local.pending == {}
    assert gs.local.requests == {} and gs.local.answer("k1", "r1", NOW) == (
        False,
        0,
    )  # retries still answered


def test_local_holds_expire_and_release() -> None:
    holds = LocalHolds()
    holds.add(local_hold("r1", expires=NOW + 10))
    holds.add(local_hold("r2", expires=NOW + 20))
    assert holds.pending == {"key:k1": 2 * CENT}
    assert holds.release("k1", "r2") is not None and holds.pending == {"key:k1": CENT}
    assert holds.answer("k1", "r1", NOW) == (False, 0) and holds.answer("k1", "r2", NOW) is None
    holds.expire(NOW + 10)
    assert holds.pending == {} and holds.answer("k1", "r1", NOW + 10) is None and len(holds) == 0
    assert holds.requests == {} and holds._by_scope == {}  # nothing kept for a hold that counts nowhere


def test_state_records_without_holds_read_as_before() -> None:
    gs = gate_with_limit("1")
    gs.apply_state(state_record("key:k1", ("1d", "0.5"), day=(DAY_START, DAY_END)))
    assert gs.reserved == {} and gs.held("key:k1", NOW) == 0


OPS = st.lists(
    st.tuples(st.sampled_from(["add", "place", "reflect", "release", "expire"]), st.integers(0, 5)),
    max_size=40,
)


@given(ops=OPS)
def test_local_pending_is_always_the_sum_of_the_holds_still_counting(ops: list[tuple[str, int]]) -> None:
    holds = LocalHolds()
    placed: dict[str, LocalHold] = {}
    clock = NOW
    for op, n in ops:
        rid = f"r{n}"
        if op == "add" and holds.answer("k1", rid, clock) is None:
            hold = LocalHold("k1", rid, ("key:k1", f"tag:{n % 2}"), (n + 1) * CENT, clock + n + 1)
            holds.add(hold)
            placed[rid] = hold
        elif op == "place" and rid in placed:
            holds.placed(placed[rid], 0, n)
        elif op == "reflect":
            holds.reflect("key:k1", {"0": n})
        elif op == "release":
            holds.release("k1", rid)
        else:
            clock += 1
            holds.expire(clock)
        live = [h for h in placed.values() if h.expires_at > clock or not h.counting]
        for scope in ("key:k1", "tag:0", "tag:1"):
            want = sum(h.nanos for h in live if scope in h.counted())
            assert holds.pending.get(scope, 0) == want
        assert set(holds.requests.values()) == {h for h in placed.values() if h.counting}


def test_a_hold_placed_after_its_state_record_arrived_stops_counting_there_alone() -> None:
    holds = LocalHolds()
    first, second = local_hold("r1"), local_hold("r2")
    holds.add(first)
    holds.add(second)
    holds.placed(first, 0, 5)
    holds.reflect_hold(first, {"key:k1": {"0": 5}})
    assert holds.pending == {"key:k1": CENT} and holds.requests == {("k1", "r2"): second}
    holds.placed(second, 0, 6)
    holds.reflect_hold(second, {"key:k1": {"0": 5}})  # not reflected yet
    assert holds.pending == {"key:k1": CENT}
    holds.reflect("key:k1", {"0": 6})
    assert holds.pending == {} and holds.requests == {}


def test_hold_marks_are_written_in_records_of_bounded_size_and_read_back() -> None:
    from spendgate.domain.holds import MARKS_PER_RECORD

    book = HoldBook()
    for offset in range(2 * MARKS_PER_RECORD + 1):
        if offset % 2:
            book.on_end(f"h{offset}", 0, offset)
        else:
            assert book.on_hold(f"h{offset}", 0, offset, ["key:k1"])
    records = book.take_records(0, now=100)
    assert [len(r["s"]) + len(r["e"]) for _, r in records] == [MARKS_PER_RECORD, MARKS_PER_RECORD, 1]
    assert len({key for key, _ in records}) == 3
    again = HoldBook()
    again.load(0, records)
    assert again.starts == book.starts and again.ends == book.ends


def test_a_check_denied_by_holds_alone_retries_when_they_expire_not_when_the_window_resets() -> None:
    gs = gate_with_limit("1")
    gs.local.add(local_hold("r1", nanos=100 * CENT, expires=NOW + 60))  # the whole $1 held for 60 s
    denied = check(CheckRequest(key_id="k1"), gs, NOW)
    assert not denied.allowed and denied.blocked_by[0].reserved == 100 * CENT
    assert denied.retry_after_s == 60  # not the hours until the day's window resets
    gs.apply_state(state_record("key:k1", ("1d", "1"), day=(DAY_START, DAY_END)))  # really spent
    spent = check(CheckRequest(key_id="k1"), gs, NOW)
    assert spent.retry_after_s == math.ceil(DAY_END - NOW)  # spend binds: the window's reset
