"""The control plane's rules, over an in-memory unit of work (no Postgres).

The same rules run over Postgres in tests/integration/test_control_plane.py and
test_authority_matrix.py; here each rule is one small test that fails when the rule goes.
"""

from __future__ import annotations

import pytest
from tests.fake_control_store import FakeControlStore

from spendgate.control.service import ControlService
from spendgate.domain.authority import Principal, Role
from spendgate.domain.budgets import parse_budget
from spendgate.domain.errors import Conflict, Forbidden, NotFound, Unprocessable
from spendgate.domain.scopes import Scope
from spendgate.domain.tokens import hash_token
from spendgate.records import AnyConfigRecord, KeyRecord, TokenRecord

ADMIN = Principal(Role.ADMIN, None, "adm")
TEAM_ADMIN = Principal(Role.TEAM_ADMIN, "t1", "ta")


def service(key_activity: dict[str, bool | None] | None = None) -> tuple[ControlService, FakeControlStore]:
    store = FakeControlStore()
    activity = (lambda k: key_activity.get(k, False)) if key_activity is not None else None
    return ControlService(store, key_activity=activity), store


async def a_team_with_member(control: ControlService) -> None:
    await control.put_team(ADMIN, "t1", None)
    await control.put_member(ADMIN, "t1", "alice")


async def test_the_same_put_twice_is_one_change() -> None:
    control, store = service()
    heard: list[tuple[str, AnyConfigRecord | None]] = []
    control.subscribe(lambda key, record: heard.append((key, record)))
    budget = parse_budget({"limits": [{"window": "1d", "max_usd": "5"}]})
    first = [
        await control.put_org(ADMIN, "o1"),
        await control.put_team(ADMIN, "t1", "o1"),
        await control.put_key(ADMIN, "k1", None, "t1"),
        await control.put_budget(ADMIN, Scope.of("team", "t1"), budget),
    ]
    changes = len(store.outbox)
    again = [
        await control.put_org(ADMIN, "o1"),
        await control.put_team(ADMIN, "t1", "o1"),
        await control.put_key(ADMIN, "k1", None, "t1"),
        await control.put_budget(ADMIN, Scope.of("team", "t1"), budget),
    ]
    assert again == first
    assert len(store.outbox) == changes == 4
    assert len(store.audit_rows) == 4 and len(heard) == 4


async def test_a_changed_put_is_a_new_version() -> None:
    control, store = service()
    await control.put_team(ADMIN, "t1", None)
    first = await control.put_key(ADMIN, "k1", "u1", "t1")
    second = await control.put_key(ADMIN, "k1", "u2", "t1")
    assert second.version > first.version and second.user_id == "u2"
    assert [a["action"] for a in store.audit_rows] == ["put_team", "put_key", "put_key"]


async def test_a_team_with_live_keys_or_members_cannot_be_deleted() -> None:
    control, store = service()
    await a_team_with_member(control)
    await control.put_key(ADMIN, "k1", None, "t1")
    with pytest.raises(Conflict, match=r"team t1 still has keys \(k1\)"):
        await control.delete_team(ADMIN, "t1")
    await control.delete_key(ADMIN, "k1")  # revoked: it no longer holds the team
    with pytest.raises(Conflict, match=r"still has members \(alice\)"):
        await control.delete_team(ADMIN, "t1")
    await control.delete_member(ADMIN, "t1", "alice")
    await control.delete_team(ADMIN, "t1")
    assert (await control.list_teams(ADMIN)).items == []
    assert store.key("k1") == KeyRecord(
        version=store.key("k1").version, key_id="k1", team_id="t1", revoked=True
    )  # type: ignore[union-attr]


async def test_an_org_with_teams_cannot_be_deleted_and_a_refusal_writes_nothing() -> None:
    control, store = service()
    await control.put_org(ADMIN, "o1")
    await control.put_team(ADMIN, "t1", "o1")
    rows, outbox = dict(store.rows), list(store.outbox)
    with pytest.raises(Conflict) as refused:
        await control.delete_org(ADMIN, "o1")
    assert refused.value.details == {"teams": ["t1"]}
    assert (store.rows, store.outbox) == (rows, outbox)


async def test_a_team_must_name_an_existing_org_and_a_member_an_existing_team() -> None:
    control, _ = service()
    with pytest.raises(Unprocessable, match="org o9 does not exist"):
        await control.put_team(ADMIN, "t1", "o9")
    with pytest.raises(NotFound, match="team t9 does not exist"):
        await control.put_member(ADMIN, "t9", "alice")


async def test_deleting_a_key_revokes_it_once() -> None:
    control, store = service()
    await control.put_key(ADMIN, "k1", None, None)
    version = await control.delete_key(ADMIN, "k1")
    assert await control.delete_key(ADMIN, "k1") == version
    assert [a["action"] for a in store.audit_rows] == ["put_key", "revoke_key"]
    with pytest.raises(NotFound):
        await control.delete_key(ADMIN, "k2")


async def test_minting_names_a_team_only_for_a_team_admin_and_stores_only_the_hash() -> None:
    control, store = service()
    with pytest.raises(Unprocessable, match="required for a team_admin token"):
        await control.mint_token(ADMIN, Role.TEAM_ADMIN, None)
    with pytest.raises(Unprocessable, match="only team_admin tokens are bound"):
        await control.mint_token(ADMIN, Role.VIEWER, "t1")
    with pytest.raises(Unprocessable, match="team t1 does not exist"):
        await control.mint_token(ADMIN, Role.TEAM_ADMIN, "t1")
    await control.put_team(ADMIN, "t1", None)
    issued, record = await control.mint_token(ADMIN, Role.TEAM_ADMIN, "t1")
    assert record.hash == hash_token(issued.token) != issued.token
    assert issued.token not in repr(store.rows) + repr(store.audit_rows)
    with pytest.raises(Forbidden):
        await control.mint_token(TEAM_ADMIN, Role.ADMIN, None)


async def test_a_deleted_team_takes_its_tokens_and_a_new_team_of_that_id_does_not_revive_them() -> None:
    control, store = service()
    await control.put_team(ADMIN, "t1", None)
    _, token = await control.mint_token(ADMIN, Role.TEAM_ADMIN, "t1")
    await control.delete_team(ADMIN, "t1")
    await control.put_team(ADMIN, "t1", None)
    assert store.tokens() == [
        token.model_copy(update={"revoked": True, "version": store.tokens()[0].version})
    ]
    revocations = [a for a in store.audit_rows if a["target"] == f"token/{token.token_id}"]
    assert [a["action"] for a in revocations] == ["mint_token", "revoke_token"]


async def test_a_team_admin_claims_only_a_new_unused_key_for_a_member() -> None:
    control, _ = service({"used": True, "unknown": None})
    await a_team_with_member(control)
    await control.put_budget(ADMIN, Scope.of("key_model", "budgeted", "gpt-4o"), parse_budget({"limits": []}))
    for key_id in ("used", "unknown", "budgeted"):
        with pytest.raises(Forbidden):
            await control.put_key(TEAM_ADMIN, key_id, None, "t1")
    with pytest.raises(Forbidden, match="user bob is not a member of team t1"):
        await control.put_key(TEAM_ADMIN, "fresh", "bob", "t1")
    record = await control.put_key(TEAM_ADMIN, "fresh", "alice", "t1")
    assert (record.team_id, record.user_id) == ("t1", "alice")


async def test_a_team_admin_budget_stays_under_the_team_ceiling() -> None:
    control, _ = service()
    await a_team_with_member(control)
    await control.put_budget(
        ADMIN, Scope.of("team", "t1"), parse_budget({"limits": [{"window": "1d", "max_usd": "100"}]})
    )
    await control.put_key(ADMIN, "k1", None, "t1")
    over = parse_budget({"limits": [{"window": "1d", "max_usd": "150"}]})
    with pytest.raises(Forbidden):
        await control.put_budget(TEAM_ADMIN, Scope.of("key", "k1"), over)
    under = parse_budget({"limits": [{"window": "1d", "max_usd": "100"}]})
    assert (await control.put_budget(TEAM_ADMIN, Scope.of("key", "k1"), under)).scope == "key:k1"


async def test_a_failing_listener_does_not_fail_a_committed_change() -> None:
    control, store = service()

    def broken(key: str, record: AnyConfigRecord | None) -> None:
        raise RuntimeError("listener bug")

    control.subscribe(broken)
    assert (await control.put_org(ADMIN, "o1")).org_id == "o1"
    assert len(store.outbox) == 1


async def test_pages_follow_their_cursor_and_refuse_a_silly_limit() -> None:
    control, _ = service()
    for n in range(5):
        await control.put_org(ADMIN, f"o{n}")
    first = await control.list_orgs(ADMIN, limit=2)
    rest = await control.list_orgs(ADMIN, limit=10, after=first.next)
    assert [o.org_id for o in first.items + rest.items] == [f"o{n}" for n in range(5)]
    assert rest.next is None
    for limit in (0, 1001):
        with pytest.raises(Unprocessable, match="limit"):
            await control.list_orgs(ADMIN, limit=limit)


async def test_all_tokens_lists_revoked_ones_too() -> None:
    control, _ = service()
    _, kept = await control.mint_token(ADMIN, Role.VIEWER, None)
    _, gone = await control.mint_token(ADMIN, Role.GATEWAY, None)
    await control.revoke_token(ADMIN, gone.token_id)
    assert {(t.token_id, t.revoked) for t in await control.all_tokens()} == {
        (kept.token_id, False),
        (gone.token_id, True),
    }
    assert isinstance((await control.all_tokens())[0], TokenRecord)
