"""Budgets: a list of limits on one scope, each identified by its window, never its position.

``null`` or ``[]`` limits mean "no limit on this scope" (an ordinary member of a team, say).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

from spendgate.domain.errors import InvalidInput
from spendgate.domain.money import Nanos, format_usd, parse_usd
from spendgate.domain.windows import WindowSpec, zone

MAX_LIMITS = 16


@dataclass(frozen=True, slots=True)
class Limit:
    window: WindowSpec
    max_nanos: Nanos
    soft_nanos: Nanos | None = None

    def to_json(self) -> dict[str, str]:
        out = {"window": str(self.window), "max_usd": format_usd(self.max_nanos)}
        if self.soft_nanos is not None:
            out["soft_usd"] = format_usd(self.soft_nanos)
        return out


@dataclass(frozen=True, slots=True)
class Budget:
    """The limits of one scope; ``limits`` is sorted by window text, so edits never misalign."""

    limits: tuple[Limit, ...] = ()
    tz: str = "UTC"

    @property
    def zone(self) -> ZoneInfo:
        return zone(self.tz)

    @property
    def is_unlimited(self) -> bool:
        return not self.limits

    def limit_for(self, window: WindowSpec) -> Limit | None:
        return next((lim for lim in self.limits if lim.window == window), None)

    def to_json(self) -> dict[str, object]:
        return {"limits": [lim.to_json() for lim in self.limits], "tz": self.tz}


NO_BUDGET = Budget()


def parse_limit(raw: object, index: int) -> Limit:
    field = f"limits[{index}]"
    if not isinstance(raw, Mapping):
        raise InvalidInput("must be an object with window and max_usd", field=field)
    unknown = set(raw) - {"window", "max_usd", "soft_usd"}
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}", field=field)
    if "window" not in raw or "max_usd" not in raw:
        raise InvalidInput("window and max_usd are required", field=field)
    try:
        window = WindowSpec.parse(raw["window"])
    except InvalidInput as exc:
        raise exc.at(field) from None
    max_nanos = parse_usd(raw["max_usd"], field=f"{field}.max_usd")
    soft = raw.get("soft_usd")
    soft_nanos = None if soft is None else parse_usd(soft, field=f"{field}.soft_usd")
    if soft_nanos is not None and soft_nanos > max_nanos:
        raise InvalidInput("soft_usd must not exceed max_usd", field=f"{field}.soft_usd")
    return Limit(window, max_nanos, soft_nanos)


def parse_budget(raw: object) -> Budget:
    """Validate a budget body (CONTRACT §3); raises ``InvalidInput`` naming the field."""
    if raw is None:
        return NO_BUDGET
    if not isinstance(raw, Mapping):
        raise InvalidInput("budget must be an object with limits and tz", field="body")
    unknown = set(raw) - {"limits", "tz"}
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}", field="body")
    return parse_budget_fields(raw.get("limits"), raw.get("tz"))


def parse_budget_fields(limits_raw: object, tz: object) -> Budget:
    """``parse_budget`` of ``{"limits": limits_raw, "tz": tz}``, for a caller holding the two
    fields (a ``spend.config`` record): no body to build and check again."""
    if tz is None:  # absent or null: UTC. An empty name is a mistake, not a request for UTC.
        tz = "UTC"
    if not isinstance(tz, str) or not tz:  # zone() is lru-cached: an unhashable name would raise
        raise InvalidInput("must be an IANA time zone name such as 'UTC' or 'Europe/Paris'", field="tz")
    zone(tz)
    if limits_raw is None:
        return Budget((), tz)
    if not isinstance(limits_raw, list):
        raise InvalidInput("must be a list or null", field="limits")
    if len(limits_raw) > MAX_LIMITS:
        raise InvalidInput(f"at most {MAX_LIMITS} limits", field="limits")
    key = _budget_key(limits_raw, tz)
    known = _BUDGETS.get(key) if key is not None else None
    if known is not None:
        return known
    limits = [parse_limit(item, i) for i, item in enumerate(limits_raw)]
    parsed = Budget(_unique(limits), tz)
    if key is not None:
        if len(_BUDGETS) >= 4096:
            _BUDGETS.clear()
        _BUDGETS[key] = parsed
    return parsed


BudgetText = tuple[str, tuple[tuple[str, str, str | None], ...]]  # (tz, limits as _text_key)
_BUDGETS: dict[BudgetText, Budget] = {}
"""Budgets parsed before, by their text: on a cold start 100,000 scopes on one budget template
share one (immutable) ``Budget`` instead of re-validating, sorting and holding 100,000 copies.
Only valid budgets are kept, so a bad one is refused by the full parse every time."""


def _budget_key(limits_raw: list[Any], tz: str) -> BudgetText | None:
    texts = []
    for item in limits_raw:
        key = _text_key(item) if type(item) is dict else None
        if key is None:
            return None
        texts.append(key)
    return tz, tuple(texts)


def _text_key(raw: Mapping[Any, Any]) -> tuple[str, str, str | None] | None:
    """A limit's text, when it is all strings and nothing else (``1`` and ``True`` hash alike, and
    a bool must still be refused; an unknown field is refused by the full parse): else None."""
    window, max_usd, soft = raw.get("window"), raw.get("max_usd"), raw.get("soft_usd")
    if type(window) is not str or type(max_usd) is not str or not (soft is None or type(soft) is str):
        return None
    if len(raw) != 2 + ("soft_usd" in raw):  # an unknown field is refused by the full parse
        return None
    return window, max_usd, soft


def _unique(limits: Iterable[Limit]) -> tuple[Limit, ...]:
    seen: dict[WindowSpec, Limit] = {}
    for i, lim in enumerate(limits):
        if lim.window in seen:
            raise InvalidInput(f"two limits with window {lim.window}", field=f"limits[{i}].window")
        seen[lim.window] = lim
    return tuple(sorted(seen.values(), key=lambda lim: str(lim.window)))
