"""``spendgate notifier``: deliver ``spend.alerts`` to webhooks, at least once, never a storm.

Two loops per process, any number of processes (one consumer group, one Postgres queue):

- **consume**: read alerts as the consumer group ``{prefix}notifier``; for each alert and each
  subscription it matches, insert a pending row in ``webhook_deliveries`` (unique per webhook
  and event id, so re-reading an alert schedules nothing twice); only once that transaction has
  committed is the offset committed. An alert is therefore always either not yet consumed or
  durably scheduled: a SIGKILL anywhere loses nothing.
- **dispatch**: claim due rows (``FOR UPDATE SKIP LOCKED`` plus a lease, so replicas never send
  one attempt twice, and a dead replica's claims return when the lease ends) and POST each in a
  task of its own: a 5 s timeout, at most ``per_webhook`` requests in flight per webhook and
  ``concurrency`` in all, so a slow or dead receiver holds only its own slots. The result is
  judged by ``domain.webhook_delivery.judge``: delivered, retried later (exponential backoff with jitter,
  ``Retry-After`` for 429) or given up, which is recorded on the row and produced to
  ``{prefix}alerts.dlq`` with the last error.

Receivers deduplicate on ``Spendgate-Event-Id``: it is the same on every attempt and for the
same alert read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from pydantic import ValidationError

from spendgate.adapters import kafka
from spendgate.adapters.dns import RESOLVE_TIMEOUT_S, resolve
from spendgate.domain.webhook_delivery import (
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    RetryPolicy,
    Verdict,
    body_for,
    event_id,
    judge,
    retry_after_s,
    sign,
)
from spendgate.domain.webhooks import (
    refused_target,
    subscription_matches,
    url_host,
)
from spendgate.domain.windows import rfc3339
from spendgate.records import Alert
from spendgate.settings import Settings
from spendgate.store.pool import open_pool
from spendgate.store.webhooks import Subscription, WebhookStore

log = logging.getLogger(__name__)

TIMEOUT_S = 5.0
SUBSCRIPTION_TTL_S = 1.0
IDLE_POLL_S = 1.0
STOP_TIMEOUT_S = 10.0
USER_AGENT = "spendgate-notifier/1"


def allow_hosts(settings: Settings) -> list[str]:
    return [h.strip() for h in settings.webhook_allow_hosts.split(",") if h.strip()]


class Notifier:
    """The delivery process's two loops around one ``WebhookStore`` (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        store: WebhookStore,
        *,
        policy: RetryPolicy | None = None,
        timeout_s: float = TIMEOUT_S,
        per_webhook: int = 4,
        concurrency: int = 64,
        lease_s: float | None = None,
        allow: Sequence[str] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.policy = policy or RetryPolicy()
        self.timeout_s = timeout_s
        self.per_webhook = per_webhook
        self.concurrency = concurrency
        # an attempt takes at most the DNS check plus the request: then its claim may lapse
        self.lease_s = lease_s if lease_s is not None else timeout_s + RESOLVE_TIMEOUT_S + 3.0
        self.allow = list(allow) if allow is not None else allow_hosts(settings)
        self.topic = settings.topic("alerts")
        self.dlq_topic = settings.topic("alerts.dlq")
        self._inflight: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._consumer: Any = None
        self._producer: Any = None
        self._http: httpx.AsyncClient | None = None
        self._subs: tuple[float, list[Subscription]] = (0.0, [])
        self.delivered = 0  # counters for logs and tests
        self.failed = 0

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._http = httpx.AsyncClient(
            timeout=self.timeout_s,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
        )
        self._loops = [  # the queue is served at once, before the group is joined
            asyncio.create_task(self._dispatch_forever(), name="notifier-dispatch"),
            asyncio.create_task(self._consume_forever(), name="notifier-consume"),
        ]

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        if self._loops:  # a loop stuck in a client call that ignores cancellation is left behind
            await asyncio.wait(self._loops, timeout=STOP_TIMEOUT_S)
        if self._tasks:  # in-flight attempts: let them finish within their timeout
            await asyncio.wait(self._tasks, timeout=self.timeout_s + 1)
        for task in list(self._tasks):
            task.cancel()
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._consumer.stop(), STOP_TIMEOUT_S)
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), STOP_TIMEOUT_S)
        if self._http is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http.aclose(), STOP_TIMEOUT_S)

    # --- consume: alerts -> durable deliveries -> offsets ----------------------------------------

    async def _consume_forever(self) -> None:
        while True:  # joining may wait for a dead member's session to time out
            self._consumer = kafka.consumer(
                self.settings,
                self.topic,
                group_id=f"{self.settings.topic_prefix}notifier",
                client_id="spendgate-notifier",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
            )
            try:
                await self._consumer.start()
                break
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the broker is down: keep trying
                log.exception("notifier: cannot join the consumer group yet; retrying in 1s")
                with contextlib.suppress(Exception):
                    await self._consumer.stop()
                await asyncio.sleep(1.0)
        while True:
            try:
                await self._consume_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Postgres or broker trouble: offsets stay, retry
                log.exception("notifier: consuming alerts failed; retrying in 1s")
                await asyncio.sleep(1.0)

    async def _consume_once(self) -> None:
        batch = await self._consumer.getmany(timeout_ms=500, max_records=500)
        if not batch:
            return
        try:
            subs = await self._subscriptions()
            items: list[tuple[str, str, dict[str, Any]]] = []
            for records in batch.values():
                for record in records:
                    alert = self._alert(record)
                    if alert is None:
                        continue
                    for sub in subs:
                        if subscription_matches(sub.patterns, sub.kinds, alert["scope"], alert["kind"]):
                            items.append((sub.webhook_id, event_id(sub.webhook_id, alert), alert))
            new = await self.store.schedule(items)  # raises while Postgres is down
            await self._consumer.commit({tp: records[-1].offset + 1 for tp, records in batch.items()})
        except BaseException:
            # The position is past this batch already: go back to its start, so no later commit
            # can skip it (scheduling again is harmless: a delivery is unique per event id).
            for tp, records in batch.items():
                with contextlib.suppress(Exception):  # revoked meanwhile: its new owner reads it
                    self._consumer.seek(tp, records[0].offset)
            raise
        if items:
            log.info("notifier: %d alert deliveries scheduled (%d new)", len(items), new)
            self._wake.set()

    def _alert(self, record: Any) -> dict[str, Any] | None:
        try:
            return Alert.model_validate(json.loads(record.value)).model_dump(mode="json")
        except (ValueError, TypeError, ValidationError) as exc:
            log.warning(
                "notifier: skipping an invalid alert at %s/%s: %s", record.partition, record.offset, exc
            )
            return None

    async def _subscriptions(self) -> list[Subscription]:
        at, subs = self._subs
        if time.monotonic() - at > SUBSCRIPTION_TTL_S:
            subs = await self.store.subscriptions()
            self._subs = (time.monotonic(), subs)
        return subs

    # --- dispatch: due deliveries -> bounded concurrent attempts ---------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            try:
                claimed = await self._dispatch_once()
                if claimed:
                    continue
                due = await self.store.next_due_in()
                wait = IDLE_POLL_S if due is None else min(max(due, 0.01), IDLE_POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Postgres down: try again shortly
                log.exception("notifier: dispatching failed; retrying in 1s")
                wait = IDLE_POLL_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()

    async def _dispatch_once(self) -> int:
        room = self.concurrency - sum(self._inflight.values())
        if room <= 0:
            return 0
        full = [w for w, n in self._inflight.items() if n >= self.per_webhook]
        rows = await self.store.claim(min(room, 100), self.lease_s, full)
        started, extra = 0, []
        for row in rows:
            if self._inflight[row["webhook_id"]] >= self.per_webhook:
                extra.append(row["id"])
                continue
            self._inflight[row["webhook_id"]] += 1
            task = asyncio.create_task(self._attempt(row), name=f"deliver-{row['id']}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        if extra:
            await self.store.release(extra)
        return started

    async def _attempt(self, row: dict[str, Any]) -> None:
        webhook_id = row["webhook_id"]
        try:
            await self._deliver(row)
        except Exception:  # noqa: BLE001 - the lease brings the row back
            log.exception("notifier: delivery %s failed unexpectedly", row["id"])
        finally:
            self._inflight[webhook_id] -= 1
            if self._inflight[webhook_id] <= 0:
                del self._inflight[webhook_id]
            self._wake.set()

    async def _deliver(self, row: dict[str, Any]) -> None:
        assert self._http is not None
        attempts = row["attempts"] + 1
        body = body_for(row["format"], row["alert"])
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_ID_HEADER: row["event_id"],
        }
        if row["secret"]:
            headers[SIGNATURE_HEADER] = sign(row["secret"], int(time.time()), body)
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        host = url_host(row["url"])
        reason = refused_target(host, await resolve(host), self.allow)
        if reason is not None and "does not resolve" not in reason:
            await self._finish(row, attempts, Verdict.GIVE_UP, None, f"refused target: {reason}")
            return
        if reason is not None:
            error = reason
        else:
            try:
                response = await asyncio.wait_for(  # whole request, however slowly it trickles
                    self._http.post(row["url"], content=body, headers=headers), self.timeout_s
                )
                status = response.status_code
                retry_after = retry_after_s(response.headers.get("Retry-After"), datetime.now(UTC))
            except (httpx.TimeoutException, TimeoutError):
                error = f"timeout after {self.timeout_s:g}s"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
        age_s = (datetime.now(UTC) - row["created_at"]).total_seconds()
        outcome = judge(
            self.policy, attempts=attempts, age_s=age_s, status=status, error=error, retry_after=retry_after
        )
        await self._finish(row, attempts, outcome.verdict, status, outcome.error, outcome.retry_in_s)

    async def _finish(
        self,
        row: dict[str, Any],
        attempts: int,
        verdict: Verdict,
        status: int | None,
        error: str | None,
        retry_in_s: float | None = None,
    ) -> None:
        state = {Verdict.DELIVERED: "delivered", Verdict.RETRY: "pending", Verdict.GIVE_UP: "failed"}[verdict]
        await self.store.record(
            row["id"], status=state, attempts=attempts, http_status=status, error=error, retry_in_s=retry_in_s
        )
        if verdict is Verdict.DELIVERED:
            self.delivered += 1
        elif verdict is Verdict.RETRY:
            log.info(
                "notifier: %s to %s: %s; retry in %.1fs",
                row["event_id"],
                row["webhook_id"],
                error,
                retry_in_s,
            )
        else:
            self.failed += 1
            log.warning("notifier: gave up %s to %s: %s", row["event_id"], row["webhook_id"], error)
            await self._dead_letter(row, attempts, status, error)

    async def _dead_letter(
        self, row: dict[str, Any], attempts: int, status: int | None, error: str | None
    ) -> None:
        record = {
            "v": 1,
            "webhook_id": row["webhook_id"],
            "event_id": row["event_id"],
            "alert": row["alert"],
            "attempts": attempts,
            "last_status": status,
            "last_error": error,
            "failed_at": rfc3339(),
        }
        try:
            if self._producer is None:
                self._producer = kafka.producer(self.settings, client_id="spendgate-notifier")
                await asyncio.wait_for(self._producer.start(), 10)
            await asyncio.wait_for(
                self._producer.send_and_wait(
                    self.dlq_topic, json.dumps(record).encode(), key=row["webhook_id"].encode()
                ),
                10,
            )
        except Exception as exc:  # noqa: BLE001 - the row already says failed, with the error
            log.warning("notifier: could not produce %s to %s: %r", row["event_id"], self.dlq_topic, exc)


async def run(settings: Settings) -> None:
    """Run one notifier replica until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    await kafka.ensure_topics(settings)
    pool = await open_pool(settings.database_url, max_size=4)
    store = WebhookStore(pool)
    notifier = Notifier(settings, store)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await notifier.start()
    log.info("notifier: delivering %s to webhooks", notifier.topic)
    try:
        await stop.wait()
    finally:
        await notifier.stop()
        await pool.close()
