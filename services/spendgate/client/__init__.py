"""The Python client of spendgate's gate API, for gateways (CONTRACT §4).

Needs only httpx: ``pip install --no-deps spendgate httpx`` is enough in a gateway's environment.

    from spendgate.client import SpendgateClient, usage_event
    with SpendgateClient() as sg:                       # SPENDGATE_URL, SPENDGATE_TOKEN
        if sg.check("k_1", model="gpt-4o", estimated_cost_usd="0.01").allowed:
            reporter = sg.reporter(spill_path="spendgate-unsent.jsonl")
            reporter.report(usage_event(key_id="k_1", cost_usd="0.0042", model="gpt-4o"))
            reporter.close()
"""

from spendgate.client.http import AsyncSpendgateClient, ClientStats, SpendgateClient
from spendgate.client.reporter import ReporterStats, UsageReporter, send_spill_file
from spendgate.client.types import (
    Blocked,
    CheckResult,
    ClientSettings,
    EventsResult,
    FailMode,
    Rejection,
    SpendgateError,
    SpendView,
    SpendWindow,
    exact_usd,
    iso_utc,
    usage_event,
)

__all__ = [
    "AsyncSpendgateClient",
    "Blocked",
    "CheckResult",
    "ClientSettings",
    "ClientStats",
    "EventsResult",
    "FailMode",
    "Rejection",
    "ReporterStats",
    "SpendView",
    "SpendWindow",
    "SpendgateClient",
    "SpendgateError",
    "UsageReporter",
    "exact_usd",
    "iso_utc",
    "send_spill_file",
    "usage_event",
]
