"""Replay analysis, pure: rebuild spend from ``spend.usage`` records, find the moments each
budgeted scope was (or would have been) blocked, back-test budgets, diff against live state.

Nothing here touches Kafka; ``spendgate.replay`` reads the topics and feeds this module.

Identical to the live worker by construction, not by imitation:

1. Records go through the worker's own :func:`~spendgate.accounting.ingest.plan_batch` (validation,
   dead letters, dedupe by ``event_id`` -- first occurrence wins -- attribution, minute
   buckets), fed in offset order within each partition, with the worker's own ``SeenIds``
   index. Its clock is the records' broker timestamps, so an id is forgotten
   ``horizon_s`` after it was appended, where the worker forgets it that long after processing
   it (the same moment give or take the worker's lag).
2. Its deltas are applied to :class:`~spendgate.domain.ledger.ScopeLedger` objects by stage B's
   own :func:`~spendgate.accounting.ledgers.apply_deltas`, so totals and window sums are
   computed by the same code that feeds ``spend.state``. Cross-partition
   interleaving does not change any sum.
3. Blocked/unblocked moments come from :func:`~spendgate.domain.decide.decide` evaluated after
   every charged event in event-time (``occurred_at``) order, and at every window reset.

Known, documented differences with a live run (see README "For analysts"): attribution uses
the registry *as of now* (the worker used the registry as of processing time), budgets are the
current ones (or a ``--budgets`` file) for the whole history, and event ids are remembered for
the whole replay (the worker forgets them after ``SPENDGATE_DEDUPE_HORIZON_H``).
"""

from __future__ import annotations

from spendgate.analysis.blocks import BlockPeriod, OverLimit, Timeline, simulate
from spendgate.analysis.rebuild import Charge, Rebuild, ScopeMatch, parse_budget_file, rebuild, scope_matcher
from spendgate.analysis.report import Difference, ScopeReport, diff_live, iso_ms, report

__all__ = [
    "BlockPeriod",
    "Charge",
    "Difference",
    "OverLimit",
    "Rebuild",
    "ScopeMatch",
    "ScopeReport",
    "Timeline",
    "diff_live",
    "iso_ms",
    "parse_budget_file",
    "rebuild",
    "report",
    "scope_matcher",
    "simulate",
]
