"""Read-your-writes for the control plane (CONTRACT §4).

A control-plane write answers only once its change is visible: on ``{prefix}config``,
acknowledged with ``acks=all``, and applied by this process's gate. In order:

1. the outbox row of the change (its ``version``) is marked sent: the relay, in whichever API
   process holds its lock, produced it and the broker acknowledged it;
2. the config topic's high watermarks are read from the partition leaders (a request sent
   after step 1, so they cover the change);
3. this process's follower has applied every config record below them.

Usage events appended after the answer are attributed with the change because the worker does
steps 2-3 before each usage batch (``worker.app.Worker.ingest``). If the steps do not finish
within ``SPENDGATE_WRITE_TIMEOUT_S`` the answer is 503 ``not_yet_visible`` with the version:
the change is committed (durable), and the relay publishes it when the broker is back.
"""

from __future__ import annotations

import time

from spendgate.adapters.follower import TopicFollower
from spendgate.adapters.kafka import KafkaUnavailable
from spendgate.adapters.watermarks import HighWatermarkProbe
from spendgate.api.errors import NotYetVisible
from spendgate.store.outbox import OutboxRelay


class WriteVisibility:
    """Waits until a committed control-plane change is visible; see the module docstring."""

    def __init__(
        self,
        relay: OutboxRelay,
        probe: HighWatermarkProbe,
        follower: TopicFollower,
        topic: str,
        timeout_s: float,
    ) -> None:
        self._relay = relay
        self._probe = probe
        self._follower = follower
        self._topic = topic
        self._timeout_s = timeout_s

    async def wait(self, version: int) -> None:
        """Return once change ``version`` is visible; raise ``NotYetVisible`` (503) at the bound."""
        deadline = time.monotonic() + self._timeout_s
        try:
            await self._relay.wait_sent(version, self._timeout_s)
            left = max(0.01, deadline - time.monotonic())
            ends = await self._probe.high_watermarks(self._topic, timeout_s=left)
            await self._follower.reach(self._topic, ends, max(0.0, deadline - time.monotonic()))
        except (TimeoutError, KafkaUnavailable):
            raise NotYetVisible(version) from None
