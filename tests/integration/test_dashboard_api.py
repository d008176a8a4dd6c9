"""The dashboard's data API (issue 17) against a real broker: overview, series, top.

The app follows its topics as in production; the test produces config (teams, keys, budgets,
tokens), state and decision records straight onto them, so every figure is known exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from tests.kafka_helpers import eventually, produce

from spendgate.api.app import create_app
from spendgate.domain.tokens import issue_token
from spendgate.settings import Settings

ADMIN_TOKEN = "dash-admin-" + uuid.uuid4().hex
_version = itertools.count(1)
_offset = itertools.count(1)


def iso(instant: datetime) -> str:
    return instant.strftime("%Y-%m-%dT%H:%M:%SZ")


def config(key: str, type_: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    return key, {"v": 1, "type": type_, "version": next(_version), **fields}


def token(role: str, team_id: str | None = None) -> tuple[tuple[str, dict[str, Any]], dict[str, str]]:
    issued = issue_token()
    record = config(
        f"token/{issued.token_id}",
        "token",
        token_id=issued.token_id,
        hash=issued.hash,
        role=role,
        team_id=team_id,
        revoked=False,
    )
    return record, {"Authorization": f"Bearer {issued.token}"}


def state(scope: str, total_usd: str, as_of: datetime) -> tuple[str, dict[str, Any]]:
    start = as_of.replace(hour=0, minute=0, second=0, microsecond=0)
    return scope, {
        "v": 1,
        "scope": scope,
        "as_of": iso(as_of),
        "source": {"partition": 0, "offset": 1},
        "watermarks": {"0": next(_offset)},
        "windows": [
            {
                "window": "1d",
                "start": iso(start),
                "resets_at": iso(start + timedelta(days=1)),
                "spend_usd": total_usd,
            },
            {"window": "total", "start": None, "resets_at": None, "spend_usd": total_usd},
        ],
    }


def decision(scope: str, blocked: bool, as_of: datetime, resets_at: datetime) -> tuple[str, dict[str, Any]]:
    windows = [{"window": "1d", "spend_usd": "1.5", "limit_usd": "1", "resets_at": iso(resets_at)}]
    return scope, {
        "v": 1,
        "scope": scope,
        "blocked": blocked,
        "seq": time.time_ns(),
        "as_of": iso(as_of),
        "windows": windows if blocked else [],
    }


class World:
    def __init__(self, client: httpx.AsyncClient, settings: Settings) -> None:
        self.client, self.settings = client, settings
        self.headers: dict[str, dict[str, str]] = {"admin": {"Authorization": f"Bearer {ADMIN_TOKEN}"}}

    async def get(self, path: str, role: str = "admin", expect: int = 200) -> Any:
        resp = await self.client.get(path, headers=self.headers[role])
        assert resp.status_code == expect, (path, role, resp.status_code, resp.text)
        return resp.json()


# Set by the ``world`` fixture when the module starts (not at import: a whole-suite run imports
# every module minutes before this one runs, and an hour could turn in between).
NOW = datetime.now(UTC)
HOUR_START = NOW.replace(minute=0, second=0, microsecond=0)
MODULE_S = 60  # what this module's tests take at most, with room; they must fit in one hour


async def _clear_of_the_hour_end() -> None:
    """Wait for the next hour when this one ends before the module would: its figures are per hour."""
    now = datetime.now(UTC)
    left = 3600 - (now.minute * 60 + now.second)
    if left < MODULE_S:
        await asyncio.sleep(left + 1)


@pytest.fixture(scope="module")
async def world(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    global NOW, HOUR_START
    await _clear_of_the_hour_end()
    NOW = datetime.now(UTC)
    HOUR_START = NOW.replace(minute=0, second=0, microsecond=0)
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:8]}.",
        partitions=2,
        data_dir=tmp_path_factory.mktemp("dash"),
        api_port=0,
        worker_web_port=0,
        database_url="",
        admin_token=ADMIN_TOKEN,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dash", timeout=30) as client:
            w = World(client, settings)
            tokens = []
            for name, role, team in [
                ("ta_blue", "team_admin", "blue"),
                ("viewer", "viewer", None),
                ("gateway", "gateway", None),
            ]:
                record, w.headers[name] = token(role, team)
                tokens.append(record)
            day = {"window": "1d", "max_usd": "1", "soft_usd": "0.5"}
            await produce(
                settings,
                "config",
                [
                    *tokens,
                    config("team/blue", "team", team_id="blue", org_id=None),
                    config("team/red", "team", team_id="red", org_id=None),
                    config("key/kb", "key", key_id="kb", user_id="ann", team_id="blue", revoked=False),
                    config("key/kr", "key", key_id="kr", user_id="rob", team_id="red", revoked=False),
                    config("budget/team:blue", "budget", scope="team:blue", limits=[day], tz="UTC"),
                    config(
                        "budget/team:red",
                        "budget",
                        scope="team:red",
                        limits=[{"window": "1d", "max_usd": "8"}],
                        tz="UTC",
                    ),
                    config(
                        "budget/key:kr",
                        "budget",
                        scope="key:kr",
                        limits=[{"window": "1d", "max_usd": "4"}],
                        tz="UTC",
                    ),
                ],
            )
            earlier = HOUR_START - timedelta(hours=1) + timedelta(minutes=5)
            await produce(
                settings,
                "state",
                [
                    state("key:kb", "0.000000001", earlier),
                    state("key:kb", "0.300000001", NOW),  # 0.3 this hour, a nano-dollar the hour before
                    state("team:blue", "1.200000001", NOW),
                    state("key:kr", "1", NOW),
                    state("team:red", "1", NOW),
                    state("key_model:kb/gpt", "0.3", NOW),
                    state("member:blue/ann", "0.300000001", NOW),
                ],
            )
            await produce(
                settings,
                "decisions",
                [
                    decision("team:blue", True, NOW - timedelta(minutes=1), HOUR_START + timedelta(hours=3)),
                ],
            )

            async def caught_up() -> None:
                body = await w.get("/v1/spend/overview")
                assert body["blocked"] == 1 and body["total"] == 3, body

            await eventually(caught_up, timeout=30, interval=0.1)
            yield w


async def test_overview_lists_blocked_first_then_by_share_of_limit_with_exact_decimals(world: World) -> None:
    body = await world.get("/v1/spend/overview")
    assert body["health"]["ready"] is True and body["health"]["degraded"] is False
    assert isinstance(body["health"]["state_lag_ms"], int)
    assert [i["scope"] for i in body["items"]] == ["team:blue", "key:kr", "team:red"]
    blue = body["items"][0]
    assert blue == {
        "scope": "team:blue",
        "blocked": True,
        "resets_at": iso(HOUR_START + timedelta(hours=3)),
        "window": "1d",
        "spend_usd": "1.200000001",
        "limit_usd": "1",
        "used_pct": "120",
        "soft_crossed": True,
    }
    assert [i["used_pct"] for i in body["items"][1:]] == ["25", "12.5"]
    assert body["soft_crossed"] == 1


async def test_overview_pages_and_filters(world: World) -> None:
    body = await world.get("/v1/spend/overview?offset=1&limit=1")
    assert body["total"] == 3 and [i["scope"] for i in body["items"]] == ["key:kr"]
    assert (await world.get("/v1/spend/overview?q=red"))["total"] == 1
    assert (await world.get("/v1/spend/overview?offset=99"))["items"] == []


async def test_series_buckets_hours_exactly_with_limits_blocked_periods_and_children(world: World) -> None:
    body = await world.get("/v1/spend/team:blue/series?bucket=1h")
    assert len(body["points"]) == 48 and body["points"][-1]["start"] == iso(HOUR_START)
    assert body["points"][-1]["spend_usd"] == "1.200000001"
    assert body["limits"] == [{"window": "1d", "max_usd": "1", "soft_usd": "0.5"}]
    assert body["blocked_periods"] == [{"from": iso(NOW - timedelta(minutes=1)), "to": None}]
    assert body["children"] == [
        {"scope": "key:kb", "spend_usd": "0.300000001"},
        {"scope": "member:blue/ann", "spend_usd": "0.300000001"},
    ]
    key = await world.get("/v1/spend/key:kb/series?bucket=1h")
    assert [p["spend_usd"] for p in key["points"][-2:]] == ["0.000000001", "0.3"]
    assert key["children"] == [{"scope": "key_model:kb/gpt", "spend_usd": "0.3"}]
    daily = await world.get("/v1/spend/key:kb/series?bucket=1d")
    assert len(daily["points"]) == 90 and daily["range_usd"] == daily["total_usd"] == "0.300000001"


async def test_series_takes_an_explicit_range(world: World) -> None:
    start = HOUR_START - timedelta(hours=1)
    body = await world.get(f"/v1/spend/key:kb/series?bucket=1h&from={iso(start)}&to={iso(HOUR_START)}")
    assert body["points"] == [{"start": iso(start), "spend_usd": "0.000000001"}]


@pytest.mark.parametrize(
    "query",
    [
        "bucket=1m",  # not a bucket
        "from=2026-12-02T00:00:00Z&to=2026-12-01T00:00:00Z",  # from after to
        "from=2000-01-01T00:00:00Z&to=2026-12-01T00:00:00Z",  # too many buckets
        "from=yesterday",  # not a time
        "from=2026-12-01T00:00:00",  # no offset
        "to=0001-01-01T05:00:00Z",  # bucket arithmetic would leave datetime's range (was a 500)
        "bucket=1d&from=9999-12-30T00:00:00Z&to=9999-12-31T12:00:00Z",
        "to=9999-12-31T23:59:59Z",
        "from=1969-12-31T00:00:00Z&to=1970-01-01T05:00:00Z",
    ],
)
async def test_series_refuses_bad_ranges_with_422(world: World, query: str) -> None:
    body = await world.get(f"/v1/spend/key:kb/series?{query}", expect=422)
    assert body["error"]["message"]


@pytest.mark.parametrize("query", ["limit=0", "limit=501", "offset=-1", "limit=ten", "q=" + "x" * 257])
async def test_overview_refuses_bad_paging_with_422(world: World, query: str) -> None:
    await world.get(f"/v1/spend/overview?{query}", expect=422)


async def test_top_ranks_a_kind_in_a_window(world: World) -> None:
    body = await world.get("/v1/spend/top?kind=key&window=1d&limit=5")
    assert body["items"] == [
        {"scope": "key:kr", "spend_usd": "1"},
        {"scope": "key:kb", "spend_usd": "0.300000001"},
    ]
    assert (await world.get("/v1/spend/top?kind=key&window=1h"))["items"][1] == {
        "scope": "key:kb",
        "spend_usd": "0.3",
    }


@pytest.mark.parametrize(
    "query", ["kind=planet", "kind=key&window=2h", "kind=key&limit=0", "kind=key&limit=1001", ""]
)
async def test_top_refuses_bad_queries_with_422(world: World, query: str) -> None:
    await world.get(f"/v1/spend/top?{query}", expect=422)


async def test_a_team_admin_sees_only_its_team(world: World) -> None:
    overview = await world.get("/v1/spend/overview", role="ta_blue")
    assert [i["scope"] for i in overview["items"]] == ["team:blue"]
    top = await world.get("/v1/spend/top?kind=key&window=1d", role="ta_blue")
    assert top["items"] == [{"scope": "key:kb", "spend_usd": "0.300000001"}]
    await world.get("/v1/spend/team:blue/series", role="ta_blue")
    refused = await world.get("/v1/spend/team:red/series", role="ta_blue", expect=403)
    assert "team blue" in refused["error"]["message"]
    await world.get("/v1/spend/key:kr/series", role="ta_blue", expect=403)
    await world.get("/v1/spend/top?kind=model", role="ta_blue", expect=403)


async def test_a_viewer_reads_everything_and_a_gateway_nothing(world: World) -> None:
    assert (await world.get("/v1/spend/overview", role="viewer"))["total"] == 3
    await world.get("/v1/spend/team:red/series", role="viewer")
    for path in ("/v1/spend/overview", "/v1/spend/top?kind=key", "/v1/spend/team:red/series"):
        body = await world.get(path, role="gateway", expect=403)
        assert "gateway" in body["error"]["message"]
    resp = await world.client.get("/v1/spend/overview")
    assert resp.status_code == 401


async def test_the_dashboard_page_is_served_without_a_token(world: World) -> None:
    page = await world.client.get("/ui/")
    assert page.status_code == 200 and "<title>spendgate</title>" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert (await world.client.get("/ui/app.js")).headers["content-type"].startswith("text/javascript")
    assert (await world.client.get("/ui/../pyproject.toml")).status_code == 404
    assert (await world.client.get("/ui", follow_redirects=False)).status_code == 307


async def test_a_restarted_api_rebuilds_the_same_history_from_the_topics(world: World) -> None:
    first = await world.get("/v1/spend/key:kb/series?bucket=1h")
    app = create_app(world.settings)  # a new API process, reading the topics from the start
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dash2", timeout=30) as client:
            headers = world.headers["admin"]

            async def rebuilt() -> dict[str, Any]:
                resp = await client.get("/v1/spend/key:kb/series?bucket=1h", headers=headers)
                assert resp.status_code == 200, resp.text
                body: dict[str, Any] = resp.json()
                assert body["points"][-2:] == first["points"][-2:], body["points"][-2:]
                return body

            again = await eventually(rebuilt, timeout=30, interval=0.1)
            assert again["total_usd"] == first["total_usd"] == "0.300000001"
            blue = (await client.get("/v1/spend/team:blue/series", headers=headers)).json()
            assert blue["blocked_periods"] == [{"from": iso(NOW - timedelta(minutes=1)), "to": None}]
