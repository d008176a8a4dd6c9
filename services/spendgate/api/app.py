"""The API app factory: settings -> adapters -> services -> one FastAPI app (the one wiring place).

``create_app(settings)`` opens nothing; the lifespan does, in this order:

1. the gate's ``TopicFollower`` starts reading ``{prefix}config``, ``decisions`` and ``state``
   from the earliest offset (creating the topics first if missing); it feeds ``GateState`` and,
   for ``token/…`` config records, the ``TokenCache``. ``/readyz`` answers 503 until it caught up.
2. with ``SPENDGATE_DATABASE_URL`` set: the Postgres pool (not waiting for the server), the
   tokens already in Postgres into the ``TokenCache`` (best effort, in the background), and the
   outbox relay, woken after every committed control-plane change. Control-plane writes answer
   once visible (``api.visibility``: relayed, acknowledged, applied by this gate).
3. the usage producer starts lazily on the first ``POST /v1/events``.

On shutdown everything is stopped in reverse. Nothing here blocks on the broker or Postgres:
both may be down at start, and the app still answers (degraded / 503) until they come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from psycopg_pool import AsyncConnectionPool

from spendgate.adapters import kafka, watermarks
from spendgate.adapters.follower import Handler, TopicFollower
from spendgate.adapters.usage_producer import UsageProducer
from spendgate.api import check, events, health, spend, webhooks
from spendgate.api import dashboard as dashboard_routes
from spendgate.api import holds as holds_routes
from spendgate.api.auth import TokenCache
from spendgate.api.check import check_handler, check_route
from spendgate.api.control import install_control_plane
from spendgate.api.dashboard_model import Dashboard, gate_health, history_handlers
from spendgate.api.errors import install_error_handlers
from spendgate.api.events import document_events_body
from spendgate.api.gate_service import Gate
from spendgate.api.holds import HoldAppender, Holds
from spendgate.api.limits import RequestGuard
from spendgate.api.metrics import GateMetrics
from spendgate.api.ui import ui_router
from spendgate.api.visibility import WriteVisibility
from spendgate.control.service import ControlService
from spendgate.control.webhooks import WebhookService
from spendgate.domain.gate_state import GateState
from spendgate.domain.series import SpendHistory
from spendgate.records import TokenRecord
from spendgate.settings import Settings
from spendgate.store.control import PostgresControlStore
from spendgate.store.outbox import OutboxRelay
from spendgate.store.pool import unopened_pool
from spendgate.store.webhooks import WebhookStore

log = logging.getLogger(__name__)

#: While catching up, a young collection once per 200,000 new objects instead of 700: the
#: follower freezes every batch before that many pile up, so a cold start collects about never
#: (see _freeze_when_ready). The usual thresholds are back once ready, or at shutdown.
CATCH_UP_GC_THRESHOLD = 200_000
_USUAL_GC_THRESHOLDS = gc.get_threshold()


def config_handler(state: GateState, tokens: TokenCache) -> Handler:
    """The follower callback of ``{prefix}config``: registry and budgets into ``state``, tokens too."""

    def apply(key: str | None, value: Any, *_: int) -> None:
        if key is None:
            raise ValueError("config record without a key")
        state.apply_config(key, value)
        if key.startswith("token/"):
            tokens.apply(None if value is None else TokenRecord.model_validate(value), unquote(key[6:]))

    return apply


@dataclass
class _Parts:
    """Everything the API runs, built without I/O; the lifespan starts and stops it."""

    settings: Settings
    metrics: GateMetrics
    tokens: TokenCache
    state: GateState
    follower: TopicFollower
    gate: Gate
    producer: UsageProducer
    holds: Holds
    probe: watermarks.HighWatermarkProbe
    dashboard: Dashboard
    pool: AsyncConnectionPool | None = None
    control: ControlService | None = None
    relay: OutboxRelay | None = None
    visibility: WriteVisibility | None = None


def create_app(settings: Settings, *, follower: TopicFollower | None = None) -> FastAPI:
    """The whole API (gate + control plane + health). ``follower`` may be injected by tests."""
    parts = _gate_parts(settings, follower)
    if settings.database_url:
        _add_control_plane(parts, settings.database_url)
    app = FastAPI(
        title="spendgate",
        version="1",
        summary="Spend accounting and budget enforcement for LLM and API gateways",
        lifespan=_lifespan(parts),
    )
    install_error_handlers(app)
    app.add_middleware(RequestGuard, authenticate=parts.tokens.authenticate)  # auth and caps before bodies
    app.openapi = functools.partial(_openapi, app)  # type: ignore[method-assign]
    _mount(app, parts)
    return app


def _gate_parts(settings: Settings, follower: TopicFollower | None) -> _Parts:
    """The gate side: state, the follower feeding it, the check service, producers, dashboard."""
    metrics = GateMetrics()
    tokens = TokenCache(settings.admin_token)
    state = GateState()
    history = SpendHistory()  # the dashboard's buckets, from the same state/decision records
    on_state, on_decision = history_handlers(state, history)

    async def prepare() -> None:
        await kafka.ensure_topics(settings)

    if follower is None:
        follower = TopicFollower(
            settings.kafka_bootstrap,
            {
                settings.topic("config"): config_handler(state, tokens),
                settings.topic("decisions"): on_decision,
                settings.topic("state"): on_state,
            },
            prepare=prepare,
            on_catch_up_batch=gc.freeze,  # see _freeze_when_ready
        )
    the_follower = follower
    metrics.bind_follower(
        the_follower.state_lag_ms,
        lambda: the_follower.ready,
        lambda: the_follower.records,
        lambda: the_follower.invalid_records,
    )
    gate = Gate(state, the_follower, settings, metrics)
    producer = UsageProducer(
        lambda: kafka.producer(settings), settings.topic("usage"), settings.dependency_timeout_s
    )
    holds = Holds(HoldAppender(lambda: kafka.producer(settings), settings.topic("usage"), state), producer)
    gate.holds = holds
    probe = watermarks.HighWatermarkProbe(settings.kafka_bootstrap, client_id="spendgate-api-watermarks")
    dashboard = Dashboard(state, history, lambda: gate_health(gate), gate.clock)
    return _Parts(settings, metrics, tokens, state, the_follower, gate, producer, holds, probe, dashboard)


def _add_control_plane(parts: _Parts, database_url: str) -> None:
    """Postgres, the control service, the outbox relay and read-your-writes."""
    settings = parts.settings
    parts.pool = unopened_pool(database_url)
    parts.control = ControlService(  # key_activity: a fact for claiming keys
        PostgresControlStore(parts.pool),
        key_activity=parts.gate.key_activity,
        timeout_s=settings.dependency_timeout_s,
    )
    parts.relay = OutboxRelay(
        parts.pool,
        bootstrap=settings.kafka_bootstrap,
        topic=settings.topic("config"),
        prepare=lambda: kafka.ensure_topics(settings),
    )
    parts.control.subscribe(parts.relay.wake)
    if isinstance(parts.follower, TopicFollower):
        parts.visibility = WriteVisibility(
            parts.relay, parts.probe, parts.follower, settings.topic("config"), settings.write_timeout_s
        )


def _lifespan(parts: _Parts) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        background: list[asyncio.Task[None]] = []
        gc.set_threshold(CATCH_UP_GC_THRESHOLD, *_USUAL_GC_THRESHOLDS[1:])
        await parts.follower.start()
        background.append(asyncio.create_task(_freeze_when_ready(parts.follower), name="gc-freeze"))
        warm = parts.dashboard.warm(parts.follower.wait_ready)
        background.append(asyncio.create_task(warm, name="dashboard-warm"))
        if parts.pool is not None and parts.control is not None and parts.relay is not None:
            await parts.pool.open(wait=False)
            load = _load_tokens(parts.control, parts.tokens)
            background.append(asyncio.create_task(load, name="load-tokens"))
            await parts.relay.start()
        try:
            yield
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await _stop(parts)
            gc.set_threshold(*_USUAL_GC_THRESHOLDS)

    return lifespan


async def _stop(parts: _Parts) -> None:
    if parts.relay is not None:
        await parts.relay.stop()
    await parts.probe.close()
    await parts.holds.close()
    await parts.producer.close()
    await parts.follower.stop()
    if parts.pool is not None:
        await parts.pool.close()


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        app.openapi_schema = document_events_body(spec)
    return app.openapi_schema


def _mount(app: FastAPI, parts: _Parts) -> None:
    """The routes, in matching order, and what their dependencies read from ``app.state``."""
    app.include_router(health.router)
    app.include_router(dashboard_routes.router)  # before /v1/spend/{scope}, which takes all
    app.include_router(ui_router())
    app.state.check_handler = check_handler(parts.gate, parts.tokens)  # also served ahead of the stack
    app.include_router(check_route(app.state.check_handler))
    app.include_router(check.router)
    app.include_router(events.router)
    app.include_router(spend.router)
    app.include_router(holds_routes.router)
    if parts.pool is not None and parts.control is not None:
        install_control_plane(app, parts.control, parts.tokens, parts.visibility)
        allow = [h.strip() for h in parts.settings.webhook_allow_hosts.split(",") if h.strip()]
        app.state.webhooks = WebhookService(WebhookStore(parts.pool), timeout_s=parts.control.timeout_s)
        app.state.webhook_allow_hosts = allow
        app.include_router(webhooks.router)
    app.state.gate = parts.gate
    app.state.dashboard = parts.dashboard
    app.state.follower = parts.follower
    app.state.tokens = parts.tokens
    app.state.metrics = parts.metrics
    app.state.producer = parts.producer
    app.state.holds = parts.holds


async def _freeze_when_ready(follower: TopicFollower) -> None:
    """Once caught up, move the materialized state out of the collector's way.

    A full collection walks every object; with 100,000 scopes in memory that is a pause of
    several milliseconds in the middle of checks. Frozen objects are never scanned. While
    catching up, the follower already freezes what it applied after every batch: full
    collections re-walking the growing state (and every imported module) took a third of
    a 100k-scope cold start. The records are acyclic (freed by reference counting, frozen
    or not), so this collection only has the last batch's leftovers to look at.
    """
    await follower.wait_ready()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*_USUAL_GC_THRESHOLDS)


async def _load_tokens(control: ControlService, tokens: TokenCache, retry_s: float = 2.0) -> None:
    """Seed the TokenCache from Postgres once (the config topic may lag behind, or be new)."""
    while True:
        try:
            for record in await control.all_tokens():
                tokens.apply(record, record.token_id)
            return
        except Exception as exc:  # noqa: BLE001 - Postgres down: the follower still feeds tokens
            log.warning("could not load tokens from Postgres (%s); retrying in %.0fs", exc, retry_s)
            await asyncio.sleep(retry_s)
