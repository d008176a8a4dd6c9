"""worker.takeover: a generation lists its scopes without decoding them, and the takeover
republish goes out in bounded chunks behind the scopes with fresh spend."""

from __future__ import annotations

from spendgate.worker.takeover import Stored, stored_scopes, takeover_chunk


class Undecodable:
    """A day record value nobody may read while the scopes are listed."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"day record read at listing ({name})")


def test_stored_scopes_are_the_owned_hot_and_day_keys_read_without_decoding_day_records() -> None:
    items = [
        ("key:a", {"t": 5, "m": {}, "w": {}}),
        ("key:a@20000", Undecodable()),
        ("key:a@19999", Undecodable()),
        ("team:b@20000", Undecodable()),  # day records only (its hot record expired or absent)
        ("key:held", {"t": 1, "h": {"r1": [1, 2]}}),
        ("key:other", {"t": 1}),
        ("key:other@20000", Undecodable()),
    ]
    stored = stored_scopes(items, lambda scope: scope != "key:other")
    assert stored == {
        "key:a": Stored(days=[20000, 19999]),
        "team:b": Stored(days=[20000]),
        "key:held": Stored(holds=True),
    }


def test_a_chunk_is_bounded_and_in_order_and_the_backlog_drains() -> None:
    backlog = dict.fromkeys(f"s{i}" for i in range(5))
    assert takeover_chunk(backlog, {}, set(), limit=2) == ["s0", "s1"]
    assert takeover_chunk(backlog, {}, set(), limit=2) == ["s2", "s3"]
    assert takeover_chunk(backlog, {}, set(), limit=2) == ["s4"]
    assert backlog == {} and takeover_chunk(backlog, {}, set(), limit=2) == []


def test_dirty_scopes_go_out_anyway_and_do_not_use_up_the_chunk() -> None:
    """Fresh spend is never queued behind the takeover: the tick publishes every dirty scope,
    and a dirty scope leaves the backlog (its record reflects at least what the republish would)."""
    backlog = dict.fromkeys(["s0", "s1", "s2", "s3"])
    assert takeover_chunk(backlog, {"s1": None, "fresh": None}, set(), limit=2) == ["s0", "s2"]
    assert list(backlog) == ["s3"]


def test_scopes_with_writes_in_flight_stay_in_the_backlog() -> None:
    backlog = dict.fromkeys(["s0", "s1", "s2"])
    assert takeover_chunk(backlog, {}, {"s0"}, limit=2) == ["s1"]
    assert list(backlog) == ["s0", "s2"]
    assert takeover_chunk(backlog, {}, set(), limit=2) == ["s0", "s2"]
