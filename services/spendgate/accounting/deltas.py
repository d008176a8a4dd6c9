"""Deltas: what stage A hands stage B (``worker.deltas``), and their wire format.

A delta carries the charges (minute buckets) and hold ops of one scope from one ``spend.usage``
partition, up to offset ``last``; stage B applies it to the scope's ledger exactly once
(``domain.ledger`` watermarks), see :func:`spendgate.accounting.ledgers.apply_deltas`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from spendgate.domain.holds import HoldOp


@dataclass(slots=True)
class Delta:
    """Charges of one scope from one source partition, up to ``last`` (internal topic record).

    ``holds``: ordered hold ops (``domain.holds``), applied with the charges, atomically.
    """

    scope: str
    partition: int
    first: int
    last: int
    minutes: dict[int, int] = field(default_factory=dict)
    holds: list[HoldOp] = field(default_factory=list)

    def add(self, minute: int, nanos: int) -> None:
        self.minutes[minute] = self.minutes.get(minute, 0) + nanos


def encode_bundle(deltas: Sequence[Delta]) -> bytes:
    """Many deltas in one internal record (all for scopes of one ``worker.deltas`` partition).

    Bundling keeps stage B's per-record framework cost per batch, not per scope; order inside
    a bundle is kept, so per-source-partition offset order per scope still holds. Each delta is
    a flat array ``[scope, p, first, last, minute, nanos, minute, nanos, ...]``: stage B decodes
    tens of thousands a second, and integer keys need no string round trip. A delta with hold
    ops ends with one more element, ``{"h": [op, ...]}`` (odd length).
    """
    return orjson.dumps(
        [
            [d.scope, d.partition, d.first, d.last, *(x for m in d.minutes.items() for x in m)]
            + ([{"h": d.holds}] if d.holds else [])
            for d in deltas
        ]
    )


def decode_bundle(raw: bytes) -> list[Delta]:
    """Read a bundle of :func:`encode_bundle`."""
    out = []
    for item in orjson.loads(raw):
        if len(item) == 6:  # the common delta: one minute bucket, no hold ops
            out.append(Delta(item[0], item[1], item[2], item[3], {item[4]: item[5]}, []))
            continue
        ops = item.pop()["h"] if len(item) % 2 else []
        minutes = dict(zip(item[4::2], item[5::2], strict=True))  # even length once ops are popped
        out.append(Delta(item[0], item[1], item[2], item[3], minutes, ops))
    return out
