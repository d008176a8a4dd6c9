"""Outbox relay: committed changes reach {prefix}config exactly as recorded; nothing else does."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from psycopg_pool import AsyncConnectionPool

from spendgate.adapters.watermarks import fetch_high_watermarks
from spendgate.control.service import ControlService
from spendgate.domain.authority import Principal, Role
from spendgate.domain.budgets import parse_budget
from spendgate.domain.registry import config_key
from spendgate.domain.scopes import Scope
from spendgate.settings import Settings
from spendgate.store.control import PostgresControlStore
from spendgate.store.outbox import RELAY_LOCK, OutboxRelay
from spendgate.store.pool import open_pool

ADMIN = Principal(Role.ADMIN, None, "test-admin")


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
async def pool(migrated_database_url: str) -> AsyncIterator[AsyncConnectionPool]:
    pool = await open_pool(migrated_database_url)
    await pool.wait()
    yield pool
    await pool.close()


@pytest.fixture
def repo(pool: AsyncConnectionPool) -> ControlService:
    return ControlService(PostgresControlStore(pool))


def relay_for(pool: AsyncConnectionPool, settings: Settings) -> OutboxRelay:
    return OutboxRelay(
        pool,
        bootstrap=settings.kafka_bootstrap,
        topic=settings.topic("config"),
        poll_interval_s=0.05,
    )


async def read_config(settings: Settings) -> list[tuple[str, bytes | None]]:
    """Every record of the config topic, in partition order."""
    topic = settings.topic("config")
    marks = await fetch_high_watermarks(settings.kafka_bootstrap, topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False, fetch_max_wait_ms=100
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in marks]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        out: list[tuple[str, bytes | None]] = []

        async def behind() -> bool:
            return any([await consumer.position(tp) < marks[tp.partition] for tp in tps])

        while await behind():
            for records in (await consumer.getmany(timeout_ms=200)).values():
                out += [(r.key.decode(), r.value) for r in records if r.key is not None]
        return out
    finally:
        await consumer.stop()


async def drain(relay: OutboxRelay) -> None:
    try:
        while await relay.run_once():
            pass
    finally:
        await relay.stop()


async def test_committed_change_is_published_exactly_as_recorded(
    pool: AsyncConnectionPool, repo: ControlService, settings: Settings
) -> None:
    scope = Scope.parse(f"key:{uid('k')}")
    record = await repo.put_budget(
        ADMIN, scope, parse_budget({"limits": [{"window": "1h", "max_usd": "2.5"}]})
    )
    await repo.delete_budget(ADMIN, scope)
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT value FROM outbox WHERE topic_key = %s ORDER BY id", (config_key("budget", str(scope)),)
        )
        recorded = [r["value"] for r in await cur.fetchall()]  # type: ignore[call-overload]
    assert recorded[0] == record.model_dump_json() and recorded[1] is None

    await drain(relay_for(pool, settings))

    published = [v for k, v in await read_config(settings) if k == config_key("budget", str(scope))]
    assert [None if v is None else v.decode() for v in published] == recorded
    assert json.loads(recorded[0])["version"] == record.version


async def test_uncommitted_or_rolled_back_change_is_never_published(
    pool: AsyncConnectionPool, settings: Settings
) -> None:
    key = config_key("org", uid("ghost"))
    async with pool.connection() as writer:
        await writer.execute("BEGIN")
        await writer.execute("INSERT INTO outbox (topic_key, value) VALUES (%s, %s)", (key, '{"v":1}'))
        await drain(relay_for(pool, settings))  # runs while the change is in flight
        await writer.execute("ROLLBACK")
    await drain(relay_for(pool, settings))
    assert key not in [k for k, _ in await read_config(settings)]


async def test_change_committed_while_no_relay_runs_is_published_by_the_next_relay(
    pool: AsyncConnectionPool, repo: ControlService, settings: Settings
) -> None:
    org = uid("org")
    await repo.put_org(ADMIN, org)  # the API "dies" here: no relay ever saw this commit
    relay = relay_for(pool, settings)
    await relay.start()
    try:
        for _ in range(100):
            if config_key("org", org) in [k for k, _ in await read_config(settings)]:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the committed change never reached the config topic")
    finally:
        await relay.stop()


async def test_empty_config_topic_gets_the_full_current_state_republished(
    pool: AsyncConnectionPool, repo: ControlService, settings: Settings
) -> None:
    org, team = uid("org"), uid("team")
    await repo.put_org(ADMIN, org)
    await repo.put_team(ADMIN, team, org)
    _, token = await repo.mint_token(ADMIN, Role.TEAM_ADMIN, team)
    await drain(relay_for(pool, settings))  # everything sent; the topic is then "lost"

    fresh = settings.model_copy(update={"topic_prefix": f"t{uuid.uuid4().hex[:8]}."})
    from spendgate.adapters.kafka import ensure_topics

    await ensure_topics(fresh)
    relay = relay_for(pool, fresh)
    await drain(relay)

    published = dict(await read_config(fresh))
    async with pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) AS n FROM orgs")
        orgs = (await cur.fetchone())["n"]  # type: ignore[index]
    assert relay.republished >= orgs + 2
    assert json.loads(published[f"team/{team}"] or b"")["org_id"] == org
    token_value = json.loads(published[f"token/{token.token_id}"] or b"")
    assert token_value["hash"] == token.hash and token_value["version"] == token.version


async def test_a_restarted_relay_republishes_current_state_even_onto_a_non_empty_topic(
    pool: AsyncConnectionPool, repo: ControlService, settings: Settings
) -> None:
    org = uid("org")
    await repo.put_org(ADMIN, org)
    await drain(relay_for(pool, settings))
    restarted = relay_for(pool, settings)
    await drain(restarted)
    assert restarted.republished >= 1
    assert f"org/{org}" in dict(await read_config(settings))


async def test_only_one_relay_runs_at_a_time(
    pool: AsyncConnectionPool, repo: ControlService, settings: Settings
) -> None:
    await repo.put_org(ADMIN, uid("org"))
    relay = relay_for(pool, settings)
    try:
        async with pool.connection() as other, other.transaction():
            await other.execute("SELECT pg_advisory_xact_lock(%s)", (RELAY_LOCK,))
            assert await relay.run_once() == 0
        assert await relay.run_once() >= 1
    finally:
        await relay.stop()
