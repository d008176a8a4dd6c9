"""Dashboard data routes (issue 17, CONTRACT §4 "Dashboard data"): overview, series, top spenders.

Served from memory only, like ``GET /v1/spend/{scope}``: the budgets, decisions and states the
gate follows (``GateState``) and the buckets :class:`~spendgate.domain.series.SpendHistory` keeps
from the same ``spend.state``/``spend.decisions`` records (:func:`history_handlers` wraps the
follower's callbacks). Money is exact decimal strings.

Authority: admin and viewer read every scope; a team admin of T only T's scopes (``team:T``,
``member:T/…``, keys of T and their ``key_model``s): a series of another scope is 403, the
overview and top lists hold only T's scopes, and a top list of a kind T cannot read (users, end
users, models, tags, orgs) is 403. A gateway token is refused (403): it checks, it does not
browse.
"""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from spendgate.api.dashboard_model import DEFAULT_RANGE, TEAM_KINDS, Dashboard
from spendgate.api.deps import Caller
from spendgate.api.errors import Forbidden, Unprocessable, error_responses
from spendgate.api.paths import scope_in_path
from spendgate.api.spend import authorize_read
from spendgate.domain.authority import Principal, Role
from spendgate.domain.errors import InvalidInput
from spendgate.domain.money import format_usd
from spendgate.domain.scopes import Scope, ScopeKind
from spendgate.domain.series import BUCKETS, MAX_POINTS, OverviewRow, page, percent
from spendgate.domain.windows import iso

# Include before the spend router, whose ``/v1/spend/{scope}`` would take these paths.
router = APIRouter(prefix="/v1/spend", tags=["dashboard"], responses=error_responses(401, 403, 422))


def _dashboard(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


DashboardDep = Annotated[Dashboard, Depends(_dashboard)]


def _reader(caller: Principal) -> Principal:
    if caller.role is Role.GATEWAY:
        raise Forbidden(
            "a gateway token may only check, ingest and read one scope's spend; "
            "use a viewer or team_admin token for the dashboard"
        )
    return caller


LATEST_INSTANT = datetime(9000, 1, 1, tzinfo=UTC).timestamp()


def _instant(value: str | None, field: str) -> float | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Unprocessable(
            f"{field}: not an RFC 3339 time (e.g. 2026-12-01T00:00:00Z)", details={"field": field}
        ) from None
    if parsed.tzinfo is None:
        raise Unprocessable(f"{field}: needs a UTC offset (Z or +hh:mm)", details={"field": field})
    try:
        instant = parsed.astimezone(UTC).timestamp()
    except (OverflowError, ValueError):
        instant = -1.0
    if not 0 <= instant < LATEST_INSTANT:  # bucket arithmetic near year 1 or 9999 leaves datetime's range
        raise Unprocessable(f"{field}: out of range (1970 to 9000)", details={"field": field})
    return instant


def _scope_of_series(request: Request) -> Scope:
    """The scope between ``/v1/spend/`` and ``/series``, from the raw path (an encoded ``/`` stays)."""
    try:
        return scope_in_path(request, "/v1/spend/", suffix="/series")
    except InvalidInput as exc:
        raise Unprocessable(f"scope: {exc.reason}", details={"field": "scope"}) from None


def _row_json(row: OverviewRow) -> dict[str, Any]:
    return {
        "scope": row.scope,
        "blocked": row.blocked,
        "resets_at": row.resets_at,
        "window": row.window,
        "spend_usd": format_usd(row.spend),
        "limit_usd": None if row.limit is None else format_usd(row.limit),
        "used_pct": percent(row.ratio_ppm),
        "soft_crossed": row.soft_crossed,
    }


@router.get("/overview", summary="Budgeted scopes, blocked first, then by share of limit used (paged)")
async def get_overview(
    caller: Caller,
    dashboard: DashboardDep,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    q: Annotated[str | None, Query(max_length=256, description="scopes containing this text")] = None,
) -> dict[str, Any]:
    _reader(caller)
    now = dashboard.clock()
    listing = await dashboard.overview(now)
    visible = dashboard.readable(caller)
    if visible is not None or q:
        listing = await dashboard.filtered(listing, visible, caller.team_id, q)
    return {
        "as_of": iso(int(now)),
        "health": dashboard.health(),
        "total": len(listing.keys),
        "blocked": listing.blocked,
        "soft_crossed": listing.soft,
        "offset": offset,
        "limit": limit,
        "items": [  # visibility checked again: the filtered listing may be a few seconds old
            _row_json(r)
            for r in dashboard.rows(page(listing.keys, offset, limit), now)
            if visible is None or visible(r.scope)
        ],
    }


@router.get("/top", summary="The scopes of one kind that spent most in a window")
async def get_top(
    caller: Caller,
    dashboard: DashboardDep,
    kind: ScopeKind,
    window: Literal["1h", "1d", "7d", "30d", "90d", "total"] = "1d",
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> dict[str, Any]:
    _reader(caller)
    if caller.role is Role.TEAM_ADMIN and kind not in TEAM_KINDS:
        raise Forbidden(f"a team_admin may not read {kind} scopes, only those of its own team")
    now = dashboard.clock()
    visible = dashboard.readable(caller)
    start, items = await dashboard.top(str(kind), window, now, limit, visible, caller.team_id)
    return {
        "kind": str(kind),
        "window": window,
        "from": iso(start),
        "as_of": iso(int(now)),
        "items": [  # visibility checked again: the answer may be a few seconds old
            {"scope": s, "spend_usd": format_usd(n)} for s, n in items if visible is None or visible(s)
        ],
    }


@router.get("/{scope:path}/series", summary="Spend of one scope per hour or day, limits, blocked periods")
async def get_series(
    request: Request,
    scope: str,
    caller: Caller,
    dashboard: DashboardDep,
    bucket: Literal["1h", "1d"] = "1h",
    from_: Annotated[str | None, Query(alias="from", max_length=64)] = None,
    to: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    _reader(caller)
    parsed = _scope_of_series(request)
    authorize_read(caller, parsed, dashboard.state)
    now = dashboard.clock()
    end = _instant(to, "to")  # read first: a request with both wrong names "to", as it always has
    start_s, end_s = _series_range(bucket, _instant(from_, "from"), end, now)
    text = str(parsed)
    history = dashboard.history
    points = history.series(text, bucket, start_s, end_s)
    budget = dashboard.state.budgets.get(text)
    size = BUCKETS[bucket]
    kept = history.hours_kept if bucket == "1h" else history.days_kept
    newest = int(history.newest // size) * size
    held = history.scopes.get(text)
    return {
        "scope": text,
        "bucket": bucket,
        "from": iso(start_s),
        "to": iso(end_s),
        "retained_from": iso(newest - kept * size) if history.newest else None,
        "points": [{"start": iso(b), "spend_usd": format_usd(n)} for b, n in points],
        "range_usd": format_usd(sum(n for _, n in points)),
        "total_usd": format_usd(0 if held is None else held.total),
        "limits": [
            {
                "window": lim.window,
                "max_usd": format_usd(lim.max_nanos),
                "soft_usd": None if lim.soft_nanos is None else format_usd(lim.soft_nanos),
            }
            for lim in (budget.limits if budget else ())
        ],
        "blocked_periods": [
            {"from": _iso_s(s), "to": _iso_s(e)} for s, e in history.blocked_periods(text, start_s, end_s)
        ],
        "children": await _children_json(dashboard, caller, parsed, start_s, end_s),
        "as_of": iso(int(now)),
    }


def _series_range(bucket: str, start: float | None, end: float | None, now: float) -> tuple[int, int]:
    """``[from, to)`` of a series, whole buckets (default: the last ``DEFAULT_RANGE``)."""
    size = BUCKETS[bucket]
    end_s = int(now // size + 1) * size if end is None else -(-int(end) // size) * size
    start_s = end_s - DEFAULT_RANGE[bucket] if start is None else int(start) // size * size
    if start_s >= end_s:
        raise Unprocessable("from: must be before to", details={"field": "from"})
    if (end_s - start_s) // size > MAX_POINTS:
        raise Unprocessable(
            f"from: at most {MAX_POINTS} buckets per request (use bucket=1d for long ranges)",
            details={"field": "from"},
        )
    return start_s, end_s


async def _children_json(
    dashboard: Dashboard, caller: Principal, scope: Scope, start_s: int, end_s: int
) -> list[dict[str, str]]:
    """The 50 child scopes the caller may read that spent most in the range."""
    visible = dashboard.readable(caller)
    children = []
    for child in await dashboard.children(scope):
        if visible is None or visible(child):
            spent = dashboard.history.spend_between(child, start_s, end_s)
            if spent:
                children.append((child, spent))
    children.sort(key=lambda c: (-c[1], c[0]))
    return [{"scope": s, "spend_usd": format_usd(n)} for s, n in children[:50]]


def _iso_s(instant: float | None) -> str | None:
    return None if instant is None else iso(int(instant))
