"""The check service: the materialized state, how fresh it is, and the fail mode."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from spendgate.api.metrics import GateMetrics
from spendgate.domain.check import CheckRequest, CheckResult, check, degraded
from spendgate.domain.gate_state import GateState
from spendgate.domain.scopes import encode_id
from spendgate.settings import FailMode, Settings

if TYPE_CHECKING:
    from spendgate.api.holds import Holds


class FollowerStatus(Protocol):
    @property
    def ready(self) -> bool: ...

    def state_lag_ms(self, now: float | None = None) -> int | None: ...


class Gate:
    """The check service: the materialized state, how fresh it is, and the fail mode."""

    holds: Holds | None = None  # reserving checks (api.holds); set by the app factory

    def __init__(
        self,
        state: GateState,
        follower: FollowerStatus,
        settings: Settings,
        metrics: GateMetrics,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.follower = follower
        self.metrics = metrics
        self.clock = clock
        self.fail_open = settings.fail_mode == FailMode.OPEN
        self.fail_mode = str(settings.fail_mode)
        self.max_lag_ms = settings.max_staleness_s * 1000
        self._started = time.monotonic()

    def lag_ms(self) -> int:
        lag = self.follower.state_lag_ms()
        return int((time.monotonic() - self._started) * 1000) if lag is None else lag

    def key_activity(self, key_id: str) -> bool | None:
        """Whether key K has recorded spend (a state or decision record of ``key:K``), as far as
        this gate knows; ``None`` before it caught up. A fact for authority (claiming keys)."""
        if not self.follower.ready:
            return None
        scope = f"key:{encode_id(key_id)}"
        return scope in self.state.states or scope in self.state.decisions

    def judge(self, request: CheckRequest) -> tuple[CheckResult, int]:
        """The answer to ``request`` and the state lag it was based on (ms)."""
        started = time.perf_counter()
        lag = self.lag_ms()
        reason = None
        if not self.follower.ready:
            reason = "not_ready"
        elif lag > self.max_lag_ms:
            reason = "stale"
        if reason == "stale" and self.fail_open:
            # Fail open means "don't deny for want of news", not "forget blocks we know of":
            # a scope held blocked in memory stays blocked (no silent bypass of a known block,
            # docs/FAILURE-MODES.md).
            result = replace(check(request, self.state, self.clock()), degraded=True)
            self.metrics.degraded.labels(reason, self.fail_mode).inc()
        elif reason is not None:
            result = degraded(self.fail_open)
            self.metrics.degraded.labels(reason, self.fail_mode).inc()
        else:
            result = check(request, self.state, self.clock())
        self.metrics.check_latency.observe(time.perf_counter() - started)
        self.metrics.checks.labels("allowed" if result.allowed else "blocked").inc()
        return result, lag
