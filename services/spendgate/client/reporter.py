"""``UsageReporter``: hand usage events over without waiting, and never lose one silently.

``report(event)`` is a lock and an append: it never blocks the caller on the network. A
background thread sends the buffer in batches of at most 1000 (``POST /v1/events``) every
``interval_s`` or as soon as a batch is full. A batch the API could not take (5xx, timeout,
connection refused, auth/throttling) stays at the head of the buffer and is sent again after an
exponential backoff with full jitter: safe, because the gate deduplicates by ``event_id``. Events
the API rejects as invalid (4xx, per index) are logged with their ids and counted, never retried.

The buffer is bounded (``max_buffer``). What cannot be kept — an event reported into a full
buffer, or whatever is still unsent when ``close()``'s deadline passes — is appended to
``spill_path`` as JSON lines (send them later with ``send_spill_file``) or, without a spill file,
logged at ERROR with its event id and body. Either way it is counted and never silently dropped.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spendgate.client.types import EventsResult, Rejection, SpendgateError

if TYPE_CHECKING:
    from spendgate.client.http import SpendgateClient

log = logging.getLogger("spendgate.client.reporter")

MAX_BATCH = 1000


@dataclass
class ReporterStats:
    reported: int = 0
    sent: int = 0
    rejected: int = 0
    retries: int = 0
    overflowed: int = 0
    """reported into a full buffer: spilled or logged at once"""
    unsent: int = 0
    """still unsent at ``close()``'s deadline: spilled or logged"""


class UsageReporter:
    """A bounded buffer of usage events drained by one background thread (see the module doc)."""

    def __init__(
        self,
        client: SpendgateClient,
        *,
        max_buffer: int = 100_000,
        batch_size: int = MAX_BATCH,
        interval_s: float = 0.2,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 5.0,
        request_timeout_s: float = 10.0,
        close_timeout_s: float = 5.0,
        spill_path: str | Path | None = None,
        own_client: bool = False,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1..{MAX_BATCH}")
        if max_buffer < batch_size:
            raise ValueError("max_buffer must hold at least one batch")
        self.client = client
        self.max_buffer = max_buffer
        self.batch_size = batch_size
        self.interval_s = interval_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.request_timeout_s = request_timeout_s
        self.close_timeout_s = close_timeout_s
        self.spill_path = Path(spill_path) if spill_path else None
        self.stats = ReporterStats()
        self._own_client = own_client
        self._buffer: deque[dict[str, Any]] = deque()
        self._in_flight: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._deadline: float | None = None
        self._closed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spendgate-reporter", daemon=True)
        self._thread.start()

    # -- caller side ---------------------------------------------------------------------------

    def report(self, event: Mapping[str, Any]) -> bool:
        """Queue one usage event; ``False`` when it could not be queued (then it was spilled or logged)."""
        item = dict(event)
        with self._cond:
            self.stats.reported += 1
            accepted = not self._closed and len(self._buffer) + len(self._in_flight) < self.max_buffer
            if accepted:
                self._buffer.append(item)
                if len(self._buffer) >= self.batch_size:
                    self._cond.notify()
            else:
                self.stats.overflowed += 1
        if not accepted:
            self._give_up([item], "buffer full" if not self._closed else "reporter closed")
        return accepted

    @property
    def pending(self) -> int:
        """Events reported and not yet acknowledged (buffered or in flight)."""
        with self._cond:
            return len(self._buffer) + len(self._in_flight)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything reported so far was sent (or rejected); ``False`` at the timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._cond.notify()
            while self._buffer or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Send what is buffered within ``timeout_s`` (default ``close_timeout_s``), then stop.

        Returns the events that could not be sent; they were spilled to ``spill_path`` or logged.
        Idempotent.
        """
        timeout = self.close_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            if self._closed:
                return []
            self._closing = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify_all()
        self._stop.set()
        self._thread.join(timeout + 1.0)
        with self._cond:
            self._closed = True
            left = list(self._in_flight) + list(self._buffer)
            self._buffer.clear()
            self._in_flight = []
            self.stats.unsent += len(left)
        if left:
            self._give_up(left, f"not acknowledged within the {timeout:g} s close deadline")
        if self._own_client:
            self.client.close()
        return left

    # -- the sending thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if len(self._buffer) < self.batch_size and not self._closing:
                    self._cond.wait(self.interval_s)  # gather a batch for one interval at most
                if not self._buffer:
                    if self._closing:
                        return
                    continue
                batch = [self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))]
                self._in_flight = batch
            if not self._send_with_retries(batch):
                with self._cond:  # the close deadline passed: back to the head, close() takes it
                    self._buffer.extendleft(reversed(batch))
                    self._in_flight = []
                return
            with self._cond:
                self._in_flight = []
                self._cond.notify_all()

    def _send_with_retries(self, batch: list[dict[str, Any]]) -> bool:
        """Send ``batch`` until it is answered; ``False`` if the close deadline passed first."""
        attempt = 0
        while True:
            timeout = self.request_timeout_s
            if self._deadline is not None:
                timeout = min(timeout, self._deadline - time.monotonic())
                if timeout <= 0:
                    return False
            try:
                result = self.client.send_events(batch, timeout_s=timeout)
            except SpendgateError as exc:
                attempt += 1
                self.stats.retries += 1
                delay = random.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2**attempt))
                log.warning(
                    "spendgate: %d events not acknowledged (%s); retry %d in %.2f s",
                    len(batch),
                    exc,
                    attempt,
                    delay,
                )
                if self._deadline is not None:
                    time.sleep(min(delay, max(0.0, self._deadline - time.monotonic())))
                else:
                    self._stop.wait(delay)  # close() cuts the wait short: it has a deadline to keep
                continue
            self._account(result)
            return True

    def _account(self, result: EventsResult) -> None:
        with self._cond:
            self.stats.sent += result.accepted
            self.stats.rejected += len(result.rejected)
        for r in result.rejected:
            log.error("spendgate: event %s rejected (not retried): %s", r.event_id, r.errors)

    def _give_up(self, events: list[dict[str, Any]], why: str) -> None:
        ids = [str(e.get("event_id")) for e in events]
        if self.spill_path is not None:
            try:
                with self.spill_path.open("a", encoding="utf-8") as out:
                    for event in events:
                        out.write(json.dumps(event, separators=(",", ":")) + "\n")
                log.error(
                    "spendgate: %d events %s: spilled to %s (ids %s)", len(events), why, self.spill_path, ids
                )
                return
            except OSError as exc:
                log.error("spendgate: cannot spill to %s: %r", self.spill_path, exc)
        log.error("spendgate: %d events %s and NOT sent; ids %s", len(events), why, ids)
        for event in events:
            log.error("spendgate: unsent event %s", json.dumps(event, separators=(",", ":")))


def send_spill_file(client: SpendgateClient, path: str | Path) -> EventsResult:
    """Send the events of a spill file again (duplicates of sent ones are dropped by ``event_id``).

    Raises ``SpendgateError`` when the gate cannot take them; the file is left untouched.
    """
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]
    accepted, rejected = 0, list[Rejection]()
    for start in range(0, len(events), MAX_BATCH):
        result = client.send_events(events[start : start + MAX_BATCH])
        accepted += result.accepted
        rejected.extend(result.rejected)
    return EventsResult(accepted=accepted, rejected=tuple(rejected))
