"""Worker metrics (Prometheus), served on the worker's own port."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("spendgate_worker_events_total", "Usage events counted (first time seen)")
DUPLICATES = Counter("spendgate_worker_duplicates_total", "Usage events dropped as duplicates of an event id")
DEAD_LETTERS = Counter("spendgate_worker_dead_letters_total", "Usage records sent to the DLQ", ["reason"])
DECISIONS = Counter("spendgate_worker_decisions_total", "Decisions published", ["blocked"])
BATCH_SECONDS = Histogram(
    "spendgate_worker_batch_seconds",
    "Time to process one batch",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
CONSUMER_LAG = Gauge("spendgate_worker_consumer_lag", "Records behind the end of spend.usage", ["partition"])
DELTAS = Counter(
    "spendgate_worker_deltas_total", "Per-scope deltas emitted (stage A) and applied (stage B)", ["stage"]
)
STATE_RECORDS = Counter("spendgate_worker_state_records_total", "spend.state records published")
