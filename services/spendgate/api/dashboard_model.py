"""The dashboard's read model: the gate's state and health, the spend history, a cached overview.

Fed by the same ``spend.state``/``spend.decisions`` records the gate follows
(:func:`history_handlers` wraps the follower's callbacks); the routes are in ``api.dashboard``.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from itertools import islice
from typing import Any, NamedTuple
from urllib.parse import unquote

from spendgate.adapters.follower import Handler
from spendgate.domain.authority import Principal, Role, team_admin_may_read
from spendgate.domain.gate_state import GateState, epoch
from spendgate.domain.scopes import Scope, ScopeKind, encode_id
from spendgate.domain.series import (
    DAY,
    HOUR,
    OrderKey,
    OverviewRow,
    SpendHistory,
    merge_sorted,
    overview_order,
    overview_row,
)

OVERVIEW_TTL_S = 5.0  # overview order and top lists: recomputed at most every 5 s (100k scopes: ~0.3 s)
STALE_ANSWER_S = 3 * OVERVIEW_TTL_S
"""An expired answer is given at once while the next is computed only if it is younger than
this: a dashboard polling every few seconds never waits; one opened after an idle hour does
not see that hour's old list."""
SLICE = 500  # scopes handled between two yields to the event loop (~2 ms idle, ~15 ms loaded)
TopAnswer = tuple[int | None, list[tuple[str, int]]]  # (window start, [(scope, nanos)])
DEFAULT_RANGE = {"1h": 48 * HOUR, "1d": 90 * DAY}
TEAM_KINDS = (ScopeKind.TEAM, ScopeKind.MEMBER, ScopeKind.KEY, ScopeKind.KEY_MODEL)


def history_handlers(state: GateState, history: SpendHistory) -> tuple[Handler, Handler]:
    """Follower callbacks for ``spend.state`` and ``spend.decisions``: apply to ``state`` as
    before, then, for a record ``state`` accepted, to ``history``."""

    def on_state(key: str | None, value: Any, *_: int) -> None:
        if state.apply_state(value, key) and value is not None:
            scope = value["scope"]
            held = state.states[scope]  # the record as just parsed: not parsed twice
            total = held.by_window.get("total")
            if total is not None:
                history.apply_state(scope, held.as_of, total[2])

    def on_decision(key: str | None, value: Any, *_: int) -> None:
        if state.apply_decision(value, key) and value is not None:
            history.apply_decision(value["scope"], epoch(value.get("as_of")) or 0.0, bool(value["blocked"]))

    return on_state, on_decision


def gate_health(gate: Any) -> dict[str, Any]:
    """The gate's health at a glance (``api.gate_service.Gate``): caught up, state lag, degraded."""
    ready = bool(gate.follower.ready)
    lag = int(gate.lag_ms())
    return {
        "ready": ready,
        "state_lag_ms": lag,
        "max_staleness_ms": int(gate.max_lag_ms),
        "degraded": (not ready) or lag > gate.max_lag_ms,
        "fail_mode": gate.fail_mode,
    }


class Listing(NamedTuple):
    """The overview (or a filtered part of it): its lines in order, how many blocked, soft."""

    keys: list[OrderKey]
    blocked: int
    soft: int


class Dashboard:
    """What the routes read: the gate's state and health, the history, a cached overview."""

    def __init__(
        self,
        state: GateState,
        history: SpendHistory,
        health: Callable[[], dict[str, Any]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.history = history
        self.health = health
        self.clock = clock
        self._overview: tuple[float, Listing] | None = None
        self._computing: asyncio.Future[Listing] | None = None
        self._filtered: dict[tuple[str | None, str | None], Listing] = {}
        self._filtered_of: Listing | None = None
        self._releasing: set[asyncio.Future[None]] = set()
        self._keys_by: tuple[float, dict[str, list[str]], dict[str, list[str]]] | None = None
        self._top: dict[tuple[str, str, int, str | None], tuple[float, TopAnswer]] = {}
        self._top_computing: dict[tuple[str, str, int, str | None], asyncio.Future[TopAnswer]] = {}

    async def overview(self, now: float) -> "Listing":
        """Every budgeted scope in overview order, recomputed when older than ``OVERVIEW_TTL_S``.

        Computed on the event loop in slices of ``SLICE`` scopes, yielding between them (a
        thread would make every check wait for the GIL behind it: p99 of checks rose to ~400 ms
        that way), and kept as :data:`OrderKey` tuples, not row objects (100,000 of those kept
        the garbage collector busy). Concurrent callers share one computation; once there is a
        result, an expired one younger than ``STALE_ANSWER_S`` is answered at once while the next
        is computed (the rows of a page are built fresh); an older one waits for the next.
        """
        cached = self._overview
        if cached is not None and 0 <= now - cached[0] < OVERVIEW_TTL_S:
            return cached[1]
        if self._computing is None:
            computing = asyncio.ensure_future(self._compute_overview(now))

            def done(task: "asyncio.Future[Listing]", at: float = now) -> None:
                self._computing = None
                if not task.cancelled() and task.exception() is None:
                    old, self._overview = self._overview, (at, task.result())
                    if old is not None:  # freeing 100,000 tuples at once takes ~40 ms: in slices
                        self._release(old[1].keys)

            computing.add_done_callback(done)
            self._computing = computing
        if cached is not None and now - cached[0] < STALE_ANSWER_S:
            return cached[1]
        return await asyncio.shield(self._computing)

    async def warm(self, ready: Callable[[], Awaitable[None]]) -> None:
        """Once the follower caught up (``ready``), compute the overview's order, so the first
        dashboard to open does not wait for it (100,000 scopes: ~1 s of CPU, in slices)."""
        await ready()
        await self.overview(self.clock())

    async def _compute_overview(self, now: float) -> "Listing":
        snapshot = list(self.state.budgets.items())
        parts = []
        for i in range(0, len(snapshot), SLICE):
            parts.append(overview_order(self.state, now, snapshot[i : i + SLICE]))
            await asyncio.sleep(0)
        keys: list[OrderKey] = []
        merged = merge_sorted(parts)
        blocked = soft = 0
        while True:
            taken = list(islice(merged, 4 * SLICE))
            if not taken:
                return Listing(keys, blocked, soft)
            keys += taken
            blocked += sum(1 for k in taken if k[0] == 0)
            soft += sum(1 for k in taken if k[4])
            await asyncio.sleep(0)

    def _release(self, keys: list[OrderKey], after_s: float = 5.0) -> None:
        """Empty an old listing in slices once requests that may still read it are done."""

        async def release() -> None:
            await asyncio.sleep(after_s)
            while keys:
                del keys[-4 * SLICE :]
                await asyncio.sleep(0)

        task = asyncio.ensure_future(release())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    def rows(self, keys: list[OrderKey], now: float) -> list[OverviewRow]:
        """The current rows of ``keys`` (a page), for the scopes still budgeted."""
        budgets = self.state.budgets
        out = []
        for key in keys:
            budget = budgets.get(key[3])
            if budget is not None:
                out.append(overview_row(self.state, key[3], budget, now))
        return out

    async def _compute_top(
        self, kind: str, window: str, now: float, limit: int, visible: Callable[[str], bool] | None
    ) -> TopAnswer:
        scopes = list(self.history.by_kind.get(kind, ()))
        start: int | None = None
        best: list[tuple[str, int]] = []
        for i in range(0, len(scopes), SLICE):  # on the loop, in slices (see overview)
            start, found = self.history.top(kind, window, now, limit, visible, scopes[i : i + SLICE])
            best = sorted([*best, *found], key=lambda p: (-p[1], p[0]))[:limit]
            await asyncio.sleep(0)
        if not scopes:
            start = self.history.top(kind, window, now, limit, visible, [])[0]
        return start, best

    async def filtered(
        self, listing: "Listing", visible: Callable[[str], bool] | None, team: str | None, q: str | None
    ) -> "Listing":
        """``listing`` kept by ``visible`` (a team admin's) and containing ``q``, in slices on the
        loop, remembered for this ``listing`` (a page polling the same filter gets it back until
        the overview is recomputed)."""
        if self._filtered_of is not listing:
            self._filtered.clear()  # filters of an older overview
            self._filtered_of = listing
        key = (team if visible is not None else None, q)
        found = self._filtered.get(key)
        if found is not None:
            return found
        kept: list[OrderKey] = []
        rows = listing.keys
        for i in range(0, len(rows), 4 * SLICE):
            kept += [
                k
                for k in rows[i : i + 4 * SLICE]
                if (visible is None or visible(k[3])) and (not q or q in k[3])
            ]
            await asyncio.sleep(0)
        found = Listing(kept, sum(1 for k in kept if k[0] == 0), sum(1 for k in kept if k[4]))
        if len(self._filtered) >= 256:
            self._filtered.clear()
        self._filtered[key] = found
        return found

    async def top(
        self,
        kind: str,
        window: str,
        now: float,
        limit: int,
        visible: Callable[[str], bool] | None,
        team: str | None,
    ) -> TopAnswer:
        """``SpendHistory.top`` in slices on the loop (100,000 keys: ~0.2 s of CPU), remembered for
        ``OVERVIEW_TTL_S`` per question (kind, window, limit, the team admin's team); an expired
        answer is given at once while the next is computed, like the overview."""
        key = (kind, window, limit, team if visible is not None else None)
        cached = self._top.get(key)
        if cached is not None and 0 <= now - cached[0] < OVERVIEW_TTL_S:
            return cached[1]
        computing = self._top_computing.get(key)
        if computing is None:
            computing = asyncio.ensure_future(self._compute_top(kind, window, now, limit, visible))

            def done(task: "asyncio.Future[TopAnswer]", at: float = now) -> None:
                self._top_computing.pop(key, None)
                if not task.cancelled() and task.exception() is None:
                    if len(self._top) >= 256:
                        self._top.clear()
                    self._top[key] = (at, task.result())

            computing.add_done_callback(done)
            self._top_computing[key] = computing
        if cached is not None and now - cached[0] < STALE_ANSWER_S:
            return cached[1]
        return await asyncio.shield(computing)

    def readable(self, caller: Principal) -> Callable[[str], bool] | None:
        """None = every scope; else a predicate (team admins)."""
        if caller.role is not Role.TEAM_ADMIN:
            return None
        team = caller.team_id or ""
        keys = self.state.registry.keys

        def visible(scope: str) -> bool:  # the authority rule, on scope text (no Scope objects)
            kind, _, rest = scope.partition(":")
            owner = unquote(rest.partition("/")[0])
            info = keys.get(owner) if kind in ("key", "key_model") else None
            return team_admin_may_read(team, kind, owner, info.team_id if info else None)

        return visible

    async def _key_index(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        """Key ids by team and by user, rebuilt at most every ``OVERVIEW_TTL_S`` in slices (the
        registry may hold 100,000 keys: walking it per request cost ~50 ms)."""
        now = self.clock()
        held = self._keys_by
        if held is not None and 0 <= now - held[0] < OVERVIEW_TTL_S:
            return held[1], held[2]
        keys = list(self.state.registry.keys.items())
        by_team: dict[str, list[str]] = {}
        by_user: dict[str, list[str]] = {}
        for i in range(0, len(keys), 10 * SLICE):
            for k, info in keys[i : i + 10 * SLICE]:
                if info.team_id is not None:
                    by_team.setdefault(info.team_id, []).append(k)
                if info.user_id is not None:
                    by_user.setdefault(info.user_id, []).append(k)
            await asyncio.sleep(0)
        self._keys_by = (now, by_team, by_user)
        return by_team, by_user

    async def children(self, scope: Scope) -> list[str]:
        """The scopes right below ``scope`` that have history: a team's keys and members, a key's
        models, an org's teams, a user's keys (keys as the registry was up to a few seconds ago)."""
        registry = self.state.registry
        kinds = self.history.by_kind
        head = scope.parts[0]
        scopes = self.history.scopes
        out: list[str] = []
        if scope.kind in (ScopeKind.TEAM, ScopeKind.USER):
            by_team, by_user = await self._key_index()
            found = (by_team if scope.kind is ScopeKind.TEAM else by_user).get(head, ())
            out += [c for k in found if (c := f"key:{encode_id(k)}") in scopes]
        if scope.kind in (ScopeKind.TEAM, ScopeKind.KEY):
            kind = "member" if scope.kind is ScopeKind.TEAM else "key_model"
            prefix = f"{kind}:{encode_id(head)}/"
            below = list(kinds.get(kind, ()))
            for i in range(0, len(below), 4 * SLICE):
                out += [s for s in below[i : i + 4 * SLICE] if s.startswith(prefix)]
                await asyncio.sleep(0)
        if scope.kind is ScopeKind.ORG:
            teams = [f"team:{encode_id(t)}" for t, org in registry.team_orgs.items() if org == head]
            out += [t for t in teams if t in scopes]
        return out
