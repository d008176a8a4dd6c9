"""The webhook routes of the control plane over the whole app (real broker and Postgres):
the secret shown once and never again (not in GET, list, or the audit row), idempotent PUTs,
clear 422s, deletion, paging and the deliveries view (issue 18). Who may do what: the
authority matrix (test_authority_matrix.py)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from tests.kafka_helpers import eventually

from spendgate.api.app import create_app
from spendgate.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.broker_agnostic]  # broker_agnostic: see pyproject.toml

ADMIN_TOKEN = "webhooks-admin-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
URL = "http://127.0.0.1:9/hook"


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings.model_copy(update={"admin_token": SecretStr(ADMIN_TOKEN)}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as c,
    ):

        async def ready() -> None:
            assert (await c.get("/readyz")).status_code == 200

        await eventually(ready, timeout=60, interval=0.05)
        yield c


async def put(client: httpx.AsyncClient, webhook_id: str, body: Any) -> httpx.Response:
    return await client.put(f"/v1/webhooks/{webhook_id}", json=body, headers=AUTH)


async def audit(client: httpx.AsyncClient, target: str) -> list[dict[str, Any]]:
    page = (await client.get("/v1/audit?limit=1000", headers=AUTH)).json()
    return [r for r in page["items"] if r["target"] == target]


async def test_the_secret_is_shown_once_and_never_stored_in_the_audit(client: httpx.AsyncClient) -> None:
    wid = f"w-{uuid.uuid4().hex[:6]}"
    body = {"url": URL, "scopes": ["team:*", "key:k1"], "kinds": ["blocked"], "format": "slack"}
    created = await put(client, wid, body)
    assert created.status_code == 200, created.text
    secret = created.json()["secret"]
    assert secret.startswith("whsec_") and len(secret) > 30
    assert created.json() | {"secret": None} == {
        "webhook_id": wid,
        "url": URL,
        "scopes": ["team:*", "key:k1"],
        "kinds": ["blocked"],
        "format": "slack",
        "secret_set": True,
        "created_at": created.json()["created_at"],
        "updated_at": created.json()["updated_at"],
        "secret": None,
    }
    again = await put(client, wid, body)  # same body: no change, the secret kept and not shown
    assert again.status_code == 200 and "secret" not in again.json() and again.json()["secret_set"]
    got = (await client.get(f"/v1/webhooks/{wid}", headers=AUTH)).json()
    assert "secret" not in got and got["secret_set"] is True
    listed = (await client.get("/v1/webhooks", headers=AUTH)).json()["items"]
    assert [w for w in listed if w["webhook_id"] == wid] == [got]

    unsigned = await put(client, wid, {**body, "secret": None})
    assert unsigned.status_code == 200 and unsigned.json()["secret_set"] is False
    mine = "my-own-secret-0123456789"
    chosen = await put(client, wid, {**body, "secret": mine, "kinds": ["blocked", "unblocked"]})
    assert chosen.json()["secret"] == mine and chosen.json()["kinds"] == ["blocked", "unblocked"]

    rows = await audit(client, f"webhook/{wid}")
    assert [r["action"] for r in rows] == ["put_webhook"] * 3  # the repeated PUT wrote nothing
    assert [(r["before"] or {}).get("secret_set") for r in rows] == [None, True, False]
    text = str(rows)
    assert secret not in text and mine not in text and "whsec_" not in text

    assert (await client.delete(f"/v1/webhooks/{wid}", headers=AUTH)).status_code == 204
    assert (await client.get(f"/v1/webhooks/{wid}", headers=AUTH)).status_code == 404
    assert (await client.delete(f"/v1/webhooks/{wid}", headers=AUTH)).status_code == 404
    assert (await audit(client, f"webhook/{wid}"))[-1]["action"] == "delete_webhook"


BAD: list[tuple[dict[str, Any], str]] = [
    ({"url": "ftp://example.com/x"}, "only http:// and https://"),
    ({"url": "http://169.254.169.254/latest/meta-data"}, "cloud metadata address"),
    ({"url": "http://[fe80::1]/hook"}, "link-local"),
    ({"url": "https://user:pw@example.com/"}, "credentials"),
    ({"url": "not a url"}, "spaces"),
    ({"scopes": []}, "at least one scope pattern"),
    ({"scopes": ["teams:*"]}, "unknown scope kind"),
    ({"scopes": ["member:T"]}, "takes 2 id part"),
    ({"kinds": ["exploded"]}, "unknown kind"),
    ({"format": "xml"}, "json"),
    ({"secret": "short"}, "16..256 printable"),
    ({"colour": "red"}, "colour: unknown field"),
]


async def test_bad_subscriptions_get_a_clear_422(client: httpx.AsyncClient) -> None:
    wid = f"w-{uuid.uuid4().hex[:6]}"
    for change, message in BAD:
        resp = await put(client, wid, {"url": URL, "scopes": ["team:*"], **change})
        assert resp.status_code == 422 and message in resp.text, (change, resp.text)
    assert (await client.get(f"/v1/webhooks/{wid}", headers=AUTH)).status_code == 404  # nothing stored
    assert await audit(client, f"webhook/{wid}") == []


async def test_listing_pages_and_deliveries_start_empty(client: httpx.AsyncClient) -> None:
    stem = uuid.uuid4().hex[:6]
    for i in range(3):
        assert (await put(client, f"{stem}-{i}", {"url": URL, "scopes": [f"team:t{i}"]})).status_code == 200
    first = (await client.get(f"/v1/webhooks?limit=2&after={stem}", headers=AUTH)).json()
    assert [w["webhook_id"] for w in first["items"]] == [f"{stem}-0", f"{stem}-1"]
    second = (await client.get(f"/v1/webhooks?limit=2&after={first['next']}", headers=AUTH)).json()
    assert [w["webhook_id"] for w in second["items"]][:1] == [f"{stem}-2"]
    deliveries = await client.get(f"/v1/webhooks/{stem}-0/deliveries", headers=AUTH)
    assert deliveries.status_code == 200 and deliveries.json() == {"items": []}
    assert (await client.get("/v1/webhooks/nope/deliveries", headers=AUTH)).status_code == 404
