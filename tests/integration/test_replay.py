"""`spendgate replay` against a live worker: the rebuilt spend equals spend.state, and a
tampered state record is found and named."""

from __future__ import annotations

import asyncio
import io
import json
import random
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from tests.integration.test_worker import (
    KEYS,
    TEAM_ORG,
    event,
    expected_totals,
    make_events,
    register,
    totals_from_state,
)
from tests.kafka_helpers import ServiceProcess, eventually, latest, produce, service_env

from spendgate.replay import ReplayOptions, ReportFormat, main_async
from spendgate.settings import Settings


def budget_record(scope: str, version: int, *limits: tuple[str, str]) -> tuple[str, dict]:
    return (
        f"budget/{scope}",
        {
            "v": 1,
            "type": "budget",
            "version": version,
            "scope": scope,
            "tz": "UTC",
            "limits": [{"window": w, "max_usd": m} for w, m in limits],
        },
    )


def keyed(events: list[dict[str, object]]) -> list[tuple[str | None, object]]:
    return [(str(e["key_id"]), e) for e in events]


async def test_replay_diff_live_equals_a_live_worker_and_names_a_tampered_scope(
    settings_factory, tmp_path: Path
) -> None:
    settings: Settings = await settings_factory(database_url="")
    rng = random.Random(5)
    await register(settings, KEYS, TEAM_ORG)
    await produce(
        settings,
        "config",
        [budget_record("team:t0", 1, ("1d", "50")), budget_record("key:k3", 1, ("1h", "0.5"))],
    )
    worker = ServiceProcess("worker", settings, tmp_path / "worker.log").start()
    try:
        events = make_events(rng, 3000)
        two_days_ago = (datetime.now(UTC) - timedelta(days=2)).isoformat()
        late = [  # occurred two days ago, produced now
            event(str(e["key_id"]), str(e["cost_usd"]), occurred_at=two_days_ago)
            for e in rng.sample(events, 200)
        ]
        announcements = [{**event("k1", "0"), "kind": "request", "cost_usd": None} for _ in range(20)]
        garbage: list[tuple[str | None, object]] = [
            ("k1", b"not json"),
            ("k2", event("k2", "-1")),
            ("k3", event("k3", "NaN")),
        ]
        await produce(settings, "usage", keyed(events[:1500]) + garbage)
        # budget edits in between: tighter team budget, key budget removed
        await produce(
            settings,
            "config",
            [budget_record("team:t0", 2, ("1h", "1"), ("1d", "50")), ("budget/key:k3", None)],
        )
        await produce(settings, "usage", keyed(late) + keyed(announcements) + keyed(events[1500:]))
        await produce(settings, "usage", keyed(rng.sample(events, 500)) + keyed(late[:50]))  # retries
        expected = expected_totals(events + late)

        async def final() -> None:
            totals = totals_from_state(await latest(settings, "state"))
            wrong = {s: (totals.get(s), v) for s, v in expected.items() if totals.get(s) != v}
            assert not wrong, f"{len(wrong)} differ, e.g. {list(wrong.items())[:3]}\n{worker.log()}"

        await eventually(final, timeout=120)

        out, err = io.StringIO(), io.StringIO()
        report_path = tmp_path / "replay.json"
        code = await main_async(
            ReplayOptions(diff_live=True, format=ReportFormat.JSON, out=report_path),
            settings=settings,
            stdout=out,
            stderr=err,
        )
        assert code == 0, err.getvalue()
        assert "equals live" in err.getvalue()
        report = json.loads(report_path.read_text())
        assert report["differences"] == []
        assert report["events"] == len(events) + len(late) + len(announcements)
        assert report["duplicates"] == 550 and report["dead_letters"] == len(garbage)
        scopes = {s["scope"]: s for s in report["scopes"]}
        assert {s: Decimal(scopes[s]["windows"][-1]["spend_usd"]) for s in expected} == expected
        team = scopes["team:t0"]
        assert [w["window"] for w in team["windows"]] == ["1d", "1h", "total"]
        assert team["blocked"] and team["over_limit"][0]["prevented"] is False
        assert scopes["key:k3"]["budget"] is None

        # Someone edits one live total: replay must fail and name it (through the real CLI).
        state = (await latest(settings, "state"))["org:o2"]
        tampered = {
            **state,
            "windows": [
                {**w, "spend_usd": "0.000000001"} if w["window"] == "total" else w for w in state["windows"]
            ],
        }
        await produce(settings, "state", [("org:o2", tampered)])
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "spendgate.cli", "replay", "--diff-live", "--scope", "org:*", "--quiet"],
            env=service_env(settings),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, done.stderr
        assert "org:o2 total: live 0.000000001" in done.stderr
        assert "org:o1" not in done.stderr
        assert "org:o2" in done.stdout and "Differences with live spend.state: 1" in done.stdout
    finally:
        worker.stop()


async def test_replay_as_of_offsets_sees_only_the_records_before_them(settings_factory) -> None:
    settings: Settings = await settings_factory(database_url="", partitions=1)
    first = [event("k1", "1", event_id=uuid.uuid4().hex) for _ in range(3)]
    await produce(settings, "usage", keyed(first) + keyed([event("k1", "10")]))
    out, err = io.StringIO(), io.StringIO()
    code = await main_async(
        ReplayOptions(as_of="0:3", format=ReportFormat.CSV, quiet=True),
        settings=settings,
        stdout=out,
        stderr=err,
    )
    assert code == 0, err.getvalue()
    rows = {line.split(",")[0]: line.split(",") for line in out.getvalue().splitlines()[1:]}
    assert rows["key:k1"][4] == "3"
