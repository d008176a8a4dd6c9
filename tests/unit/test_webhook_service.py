"""The rules of alert webhooks, over an in-memory unit of work (no Postgres).

tests/integration/test_webhooks_api.py runs the same rules over Postgres and HTTP.
"""

from __future__ import annotations

import pytest
from tests.fake_control_store import FakeWebhookStore

from spendgate.control.webhooks import WebhookService
from spendgate.domain.authority import Principal, Role
from spendgate.domain.errors import Forbidden, NotFound, Unprocessable
from spendgate.domain.webhooks import parse_kinds, parse_patterns
from spendgate.store.webhooks import UNSET, WebhookSpec

ADMIN = Principal(Role.ADMIN, None, "adm")
TEAM_ADMIN = Principal(Role.TEAM_ADMIN, "t1", "ta")
VIEWER = Principal(Role.VIEWER, None, "v")


def spec(*scopes: str, secret: object = UNSET, url: str = "https://hooks.example/a") -> WebhookSpec:
    return WebhookSpec(url, parse_patterns(list(scopes)), parse_kinds(None), "json", secret)


def service() -> tuple[WebhookService, FakeWebhookStore]:
    store = FakeWebhookStore(key_teams={"k1": "t1", "k2": "t2"})
    return WebhookService(store), store


async def test_a_made_secret_is_shown_once_and_never_kept_in_a_view_or_the_audit() -> None:
    webhooks, store = service()
    view, secret = await webhooks.put(ADMIN, "w1", spec("team:t1"))
    assert secret is not None and secret.startswith("whsec_") and view["secret_set"] is True
    again, shown = await webhooks.put(ADMIN, "w1", spec("team:t1"))
    assert shown is None and again == view
    assert secret not in repr(view) + repr(store.audit_rows) + repr(await webhooks.get(ADMIN, "w1"))


async def test_the_same_put_twice_is_one_change_and_a_new_secret_is_shown() -> None:
    webhooks, store = service()
    await webhooks.put(ADMIN, "w1", spec("team:t1", secret="s1"))
    await webhooks.put(ADMIN, "w1", spec("team:t1", secret="s1"))
    assert [a["action"] for a in store.audit_rows] == ["put_webhook"]
    _, shown = await webhooks.put(ADMIN, "w1", spec("team:t1", secret="s2"))
    assert shown == "s2" and len(store.audit_rows) == 2
    view, shown = await webhooks.put(ADMIN, "w1", spec("team:t1", secret=None))
    assert (view["secret_set"], shown) == (False, None)


async def test_a_team_admin_manages_only_webhooks_inside_its_team() -> None:
    webhooks, _ = service()
    await webhooks.put(TEAM_ADMIN, "mine", spec("team:t1", "key:k1", "member:t1/*"))
    for outside in ("team:t2", "key:k2", "team:*", "key:unknown"):
        with pytest.raises(Forbidden):
            await webhooks.put(TEAM_ADMIN, "theirs", spec(outside))
    await webhooks.put(ADMIN, "theirs", spec("team:t2"))
    with pytest.raises(Forbidden):
        await webhooks.get(TEAM_ADMIN, "theirs")
    with pytest.raises(Forbidden):  # taking over another team's webhook by rewriting its scopes
        await webhooks.put(TEAM_ADMIN, "theirs", spec("team:t1"))
    listed = await webhooks.list_webhooks(TEAM_ADMIN)
    assert [w["webhook_id"] for w in listed["items"]] == ["mine"]


async def test_viewers_are_refused_before_any_lookup_and_a_missing_webhook_is_404() -> None:
    webhooks, _ = service()
    with pytest.raises(Forbidden):
        await webhooks.get(VIEWER, "nothing-here")
    with pytest.raises(NotFound):
        await webhooks.get(ADMIN, "nothing-here")
    await webhooks.put(ADMIN, "w1", spec("org:*"))
    await webhooks.delete(ADMIN, "w1")
    with pytest.raises(NotFound):
        await webhooks.delete(ADMIN, "w1")


async def test_listing_pages_and_refuses_a_silly_limit() -> None:
    webhooks, _ = service()
    for n in range(5):
        await webhooks.put(ADMIN, f"w{n}", spec("org:*"))
    first = await webhooks.list_webhooks(ADMIN, limit=2)
    rest = await webhooks.list_webhooks(ADMIN, limit=10, after=first["next"])
    assert [w["webhook_id"] for w in first["items"] + rest["items"]] == [f"w{n}" for n in range(5)]
    for limit in (0, 1001):
        with pytest.raises(Unprocessable):
            await webhooks.list_webhooks(ADMIN, limit=limit)
