"""Prometheus metrics of the API process (``GET /metrics``).

One ``CollectorRegistry`` per app, so several apps in one process (tests) do not collide.
Names are prefixed ``spendgate_gate_``; an operator alerts on
``spendgate_gate_degraded_answers_total`` (the gate answered without trusted state) and on
``spendgate_gate_state_lag_seconds`` approaching ``SPENDGATE_MAX_STALENESS_S``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.05,
    0.25,
)


class GateMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.checks = Counter(
            "spendgate_gate_checks", "Checks answered, by outcome (allowed|blocked)", ["outcome"], registry=r
        )
        self.check_latency = Histogram(
            "spendgate_gate_check_seconds",
            "Time to judge one check in memory (excluding HTTP)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.degraded = Counter(
            "spendgate_gate_degraded_answers",
            "Checks answered per SPENDGATE_FAIL_MODE because state was not ready or too stale",
            ["reason", "fail_mode"],
            registry=r,
        )
        self.state_lag = Gauge(
            "spendgate_gate_state_lag_seconds",
            "Seconds since the gate last knew it was at the broker's high watermark (-1: never)",
            registry=r,
        )
        self.ready = Gauge(
            "spendgate_gate_ready", "1 once the gate caught up with the start-time ends", registry=r
        )
        self.events_ingested = Counter(
            "spendgate_gate_events_ingested", "Usage events acknowledged by the broker", registry=r
        )
        self.events_rejected = Counter(
            "spendgate_gate_events_rejected", "Usage events refused by POST /v1/events validation", registry=r
        )
        self.follower_records = Gauge(
            "spendgate_gate_follower_records", "Records the gate follower has read", registry=r
        )
        self.follower_invalid = Gauge(
            "spendgate_gate_follower_invalid_records",
            "Records the gate follower skipped as invalid",
            registry=r,
        )

    def bind_follower(
        self,
        lag_ms: Callable[[], int | None],
        ready: Callable[[], bool],
        records: Callable[[], int],
        invalid: Callable[[], int],
    ) -> None:
        """Read the follower's figures at scrape time."""
        self.state_lag.set_function(lambda: -1.0 if (lag := lag_ms()) is None else lag / 1000)
        self.ready.set_function(lambda: 1.0 if ready() else 0.0)
        self.follower_records.set_function(lambda: float(records()))
        self.follower_invalid.set_function(lambda: float(invalid()))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
