"""The API's producer of usage events: acks=all, started lazily, every wait bounded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from spendgate.adapters.errors import BrokerUnavailable
from spendgate.background import abandon

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 5.0


class UsageProducer:
    """Produces usage events to ``{prefix}usage`` (acks=all); starts lazily, reconnects after errors.

    Raises ``BrokerUnavailable`` when the broker does not acknowledge within ``timeout_s``
    (``SPENDGATE_DEPENDENCY_TIMEOUT_S``); aiokafka exceptions do not escape. The bound covers
    everything a request waits for: the start lock, the producer's start and metadata, the
    acknowledgements. Why the work runs in a task of its own: cancelling aiokafka against a
    frozen broker (and stopping the producer) can itself take its request timeout (40 s), so a
    timed-out send is abandoned to finish or fail in the background while the request answers.
    """

    def __init__(self, factory: Callable[[], AIOKafkaProducer], topic: str, timeout_s: float = ACK_TIMEOUT_S):
        self._factory = factory
        self.topic = topic
        self._timeout_s = timeout_s
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._abandoned: set[asyncio.Future[Any]] = set()

    async def _get(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = self._factory()
                try:
                    await asyncio.wait_for(producer.start(), self._timeout_s)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def send_all(self, records: list[tuple[bytes, bytes]]) -> None:
        """Send ``(key, value)`` records and wait until the broker acknowledged every one."""
        task = asyncio.create_task(self._send_all(records), name="usage-send")
        try:
            done, _ = await asyncio.wait({task}, timeout=self._timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done and task.exception() is None:
            return
        if task in done:
            exc: BaseException | None = task.exception()
        else:
            exc = TimeoutError(f"no acknowledgement within {self._timeout_s:g}s")
            abandon(task, self._abandoned)
        if not isinstance(exc, KafkaError | TimeoutError | OSError):
            raise exc  # type: ignore[misc]  # a bug, not an outage: the 500 handler logs it
        log.warning("events: broker did not acknowledge %d records: %r", len(records), exc)
        producer, self._producer = self._producer, None  # the next request starts a fresh one
        if producer is not None:
            abandon(
                asyncio.create_task(_stop_quietly(producer), name="usage-producer-stop"),
                self._abandoned,
                cancel=False,
            )
        raise BrokerUnavailable(
            f"the broker did not acknowledge the events within {self._timeout_s:g}s; retry the"
            " batch with the same event ids (an event may already be counted, never twice)"
        ) from None

    async def _send_all(self, records: list[tuple[bytes, bytes]]) -> None:
        producer = await self._get()
        futures = [await producer.send(self.topic, value, key=key) for key, value in records]
        await asyncio.gather(*futures)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await _stop_quietly(producer)

    async def close(self, timeout_s: float = 10.0) -> None:
        """At shutdown: stop the producer and the abandoned sends, waiting at most ``timeout_s``."""
        pending = {*self._abandoned, asyncio.create_task(self.stop())}
        await asyncio.wait(pending, timeout=timeout_s)


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    with contextlib.suppress(Exception):
        await producer.stop()
