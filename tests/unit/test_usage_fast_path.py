"""The fast path for usage events decides exactly what the pydantic model decides.

``accounting.usage.parse_usage`` = the hand-written check of the common shape, falling back to
``UsageEvent`` (the model the JSON Schema and the dead letters' reasons come from). The same
random log of valid, near-valid and garbage records goes through both; every record must get
the same verdict: the same event (same values), or the same reason.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spendgate.accounting.usage import Usage, _fast, parse_usage, parse_usage_model


def dumps(value: Any) -> bytes:
    """JSON as a gateway may write it (big integers, escaped surrogates; NaN as garbage)."""
    return json.dumps(value).encode()


IDS = st.one_of(
    st.text(min_size=1, max_size=12),
    st.sampled_from(["k1", "team/a b", "é", "x" * 256, "x" * 257, "", "a\x00b", "a\x7f", "tab\there"]),
)
MONEY = st.one_of(
    st.sampled_from(
        [
            "0",
            "0.01",
            "1",
            "12.5",
            "0.000000001",
            "1000000",
            "1000000.000000001",
            "0.0000000001",
            "-1",
            "1e3",
            " 1",
            "1.",
            ".5",
            "NaN",
            "01.50",
            "9" * 17,
            "",
            "1,5",
        ]
    ),
    st.decimals(min_value=0, max_value=2_000_000, places=9, allow_nan=False).map(str),
    st.integers(-5, 2_000_000),
    st.floats(allow_nan=True, allow_infinity=False),
    st.booleans(),
)
def decimal_text(places: int) -> st.SearchStrategy[str]:
    return st.decimals(min_value=0, max_value=1000, places=places).map(lambda d: f"{d:f}")


UTC_TIMES = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
).map(lambda d: d.isoformat().replace("+00:00", "Z"))
TIMES = st.one_of(
    UTC_TIMES,
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).flatmap(
        lambda d: st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
            lambda m: (
                d.replace(tzinfo=None).isoformat()
                + f"{'+' if m >= 0 else '-'}{abs(m) // 60:02d}:{abs(m) % 60:02d}"
            )
        )
    ),
    st.sampled_from(
        [
            "2026-12-01T10:00:00Z",
            "2026-12-01T10:00:00.1234567Z",
            "2026-12-01 10:00:00Z",
            "2026-12-01t10:00:00z",
            "2026-12-01T10:00:00",
            "2026-02-30T10:00:00Z",
            "2026-12-01T23:59:60Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T10:00:00+24:00",
            "2026-12-01T10:00:00+23:59",
            "2026-12-01T10:00Z",
            "2026-12-01",
            "0000-01-01T00:00:00Z",
            "2026-12-01T10:00:00.Z",
            "2026-12-01T10:00:00,5Z",
            "20261201T100000Z",
            "2026-12-01T10:00:00+0100",
            "",
        ]
    ),
    st.integers(0, 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
)
TOKENS = st.one_of(
    st.none(),
    st.fixed_dictionaries(
        {},
        optional={
            "input": st.one_of(st.none(), st.integers(-2, 10**6), st.floats(0, 9), st.text(max_size=3)),
            "output": st.integers(-2, 10**6),
            "cached": st.integers(),
        },
    ),
    st.sampled_from([[], "800", 5, {"input": True}, {"input": 2**70}]),
)


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["cost", "request", "hold", "release", None]))
    event: dict[str, Any] = {
        "event_id": draw(st.text(min_size=1, max_size=20)),
        "occurred_at": draw(UTC_TIMES),
        "key_id": draw(st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True)),
    }
    if kind is not None:
        event["kind"] = kind
    if kind in ("cost", None) or draw(st.booleans()):
        event["cost_usd"] = draw(decimal_text(6))
    if kind in ("hold", "release") or draw(st.booleans()):
        event["request_id"] = draw(st.text(min_size=1, max_size=30))
    if kind == "hold" or draw(st.booleans()):
        event["estimated_cost_usd"] = draw(decimal_text(9))
    for name in ("end_user_id", "model", "user_id", "team_id", "org_id"):
        if draw(st.booleans()):
            event[name] = draw(st.from_regex(r"[a-z0-9./:-]{1,10}", fullmatch=True))
    if draw(st.booleans()):
        event["tags"] = draw(st.lists(st.from_regex(r"[a-z]{1,5}", fullmatch=True), max_size=4))
    if draw(st.booleans()):
        event["tokens"] = {"input": draw(st.integers(0, 10**6)), "output": draw(st.integers(0, 10**6))}
    if draw(st.booleans()):
        event["hold_ttl_s"] = draw(st.integers(1, 3600))
    if draw(st.booleans()):
        event["v"] = 1
    return event


FIELDS = {
    "v": st.one_of(st.sampled_from([1, 2, 0, True, 1.0, "1", None])),
    "event_id": st.one_of(st.text(max_size=130), st.sampled_from(["", "x" * 128, "x" * 129]), st.integers()),
    "kind": st.one_of(
        st.sampled_from(["cost", "request", "hold", "release", "COST", "", None]), st.integers()
    ),
    "occurred_at": st.one_of(TIMES, st.none()),
    "key_id": st.one_of(IDS, st.none(), st.integers()),
    "end_user_id": st.one_of(IDS, st.none(), st.integers()),
    "model": st.one_of(IDS, st.none(), st.booleans()),
    "user_id": st.one_of(IDS, st.none()),
    "team_id": st.one_of(IDS, st.none()),
    "org_id": st.one_of(IDS, st.none()),
    "tags": st.one_of(
        st.lists(IDS, max_size=3),
        st.lists(st.just("t"), min_size=64, max_size=66),
        st.none(),
        st.text(max_size=3),
        st.lists(st.integers(), max_size=2),
    ),
    "cost_usd": st.one_of(MONEY, st.none()),
    "estimated_cost_usd": st.one_of(MONEY, st.none()),
    "request_id": st.one_of(
        st.text(max_size=5), st.sampled_from(["", "r" * 256, "r" * 257]), st.none(), st.integers()
    ),
    "tokens": TOKENS,
    "hold_ttl_s": st.one_of(
        st.integers(-1, 3602), st.none(), st.floats(0, 4000), st.sampled_from([True, "60"])
    ),
    "extra": st.integers(),
}


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """A valid event with one to three fields broken, dropped or added."""
    event = draw(valid_events())
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(FIELDS)))
        if name in event and draw(st.booleans()):
            del event[name]
        else:
            event[name] = draw(FIELDS[name])
    raw = dumps(event)
    if draw(st.integers(0, 9)) == 0:  # a duplicate key: the last one counts, for both paths
        raw = raw[:-1] + b',"kind":"request"}'
    return raw


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
GARBAGE = st.one_of(
    st.binary(max_size=40),
    JSON.map(dumps),
    st.sampled_from(
        [
            b"",
            b"{",
            b"null",
            b"[]",
            b'{"event_id": NaN}',
            b'\xef\xbb\xbf{"a":1}',
            b'{"a":"\\ud800"}',
            b'{"event_id":"a\xff"}',
            b"{}" + b" " * 3,
            b'{"v":1}',
        ]
    ),
)
RECORDS = st.one_of(valid_events().map(dumps), near_valid(), GARBAGE, st.none())


def verdict(parse: Any, value: bytes | None) -> tuple[str, Any]:
    try:
        event = parse(value)
    except ValueError as exc:
        return "reject", str(exc)
    usage = event if isinstance(event, Usage) else Usage.of(event)
    return "accept", (usage, usage.occurred_at.utcoffset())


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(RECORDS, min_size=1, max_size=12))
def test_the_fast_and_the_slow_path_give_every_record_of_a_log_the_same_verdict(
    log: list[bytes | None],
) -> None:
    for value in log:
        assert verdict(parse_usage, value) == verdict(parse_usage_model, value), value


@settings(max_examples=100, deadline=None)
@given(valid_events())
def test_the_common_shape_takes_the_fast_path(event: dict[str, Any]) -> None:
    assert _fast(dumps(event)) is not None


def test_an_offset_timestamp_is_the_same_instant_on_both_paths() -> None:
    raw = dumps(
        {"event_id": "e", "occurred_at": "2026-12-01T10:00:00.5+05:30", "key_id": "k", "cost_usd": "1"}
    )
    fast = _fast(raw)
    assert fast is not None
    assert fast.occurred_at == datetime(2026, 12, 1, 4, 30, 0, 500000, tzinfo=UTC)
    assert fast.occurred_at.utcoffset() == timedelta(hours=5, minutes=30)
    assert fast == Usage.of(parse_usage_model(raw))
