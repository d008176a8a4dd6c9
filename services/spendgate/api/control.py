"""Control-plane routes (CONTRACT §4): tokens, orgs, teams, keys, members, budgets, audit.

Each route (module-level; what it needs comes from ``api.deps``) parses and validates its input,
calls ``ControlService`` (which authorizes and writes in
one transaction) and renders the record. PUT is idempotent: the same body twice is one change
(the second returns the stored record and writes neither an audit nor an outbox row).

Ids travel percent-encoded in paths; key ids and budget scopes are read from the raw path so an
encoded ``/`` (``key_model:k1/openai%2Fgpt-4o``) stays inside its id part.
"""

from typing import Annotated, Any
from urllib.parse import unquote

from fastapi import APIRouter, Body, FastAPI, Query, Request, Response
from pydantic import BaseModel, ConfigDict, field_validator

from spendgate.api.auth import TokenCache
from spendgate.api.deps import After, Caller, Control, Limit, Written
from spendgate.api.errors import error_responses
from spendgate.api.paths import id_in_path, scope_in_path
from spendgate.api.visibility import WriteVisibility
from spendgate.control.service import ControlService
from spendgate.domain.authority import Role
from spendgate.domain.budgets import parse_budget
from spendgate.domain.errors import InvalidInput
from spendgate.domain.scopes import Scope, validate_id
from spendgate.records import TokenRecord, public


def _valid_id(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    try:
        return validate_id(value, field=field)
    except InvalidInput as exc:
        raise ValueError(exc.reason) from None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenCreate(_Body):
    role: Role
    team_id: str | None = None

    @field_validator("team_id")
    @classmethod
    def _team(cls, v: str | None) -> str | None:
        return _valid_id(v, "team_id")


class OrgBody(_Body):
    pass


class TeamBody(_Body):
    org_id: str | None = None

    @field_validator("org_id")
    @classmethod
    def _org(cls, v: str | None) -> str | None:
        return _valid_id(v, "org_id")


class KeyBody(_Body):
    user_id: str | None = None
    team_id: str | None = None

    @field_validator("user_id", "team_id")
    @classmethod
    def _ids(cls, v: str | None) -> str | None:
        return _valid_id(v, "id")


class MemberBody(_Body):
    pass


BUDGET_EXAMPLE = {
    "limits": [
        {"window": "1h", "max_usd": "10"},
        {"window": "1mo", "max_usd": "500", "soft_usd": "400"},
    ],
    "tz": "UTC",
}


def _scope_of(request: Request) -> Scope:
    return scope_in_path(request, "/v1/budgets/")


def _key_id_of(request: Request) -> str:
    return id_in_path(request, "/v1/keys/", "key_id")


def _cursor(after: str | None) -> str | None:
    """A paging cursor is an id (or scope) seen before: never a control character (Postgres
    refuses NUL in text) nor a lone surrogate."""
    if after is not None and any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) < 0xE000 for c in after):
        raise InvalidInput("not a cursor returned by a previous page", field="after")
    return after


def _team_filter(team_id: str | None) -> str | None:
    return None if team_id is None else validate_id(team_id, field="team_id")


def install_control_plane(
    app: FastAPI, control: ControlService, tokens: TokenCache, visibility: WriteVisibility | None = None
) -> None:
    """Mount the control plane on ``app``; the token cache follows the tokens ``control`` mints and
    revokes at once (not only through ``spend.config``)."""

    def on_change(key: str, record: object) -> None:
        if key.startswith("token/") and (record is None or isinstance(record, TokenRecord)):
            tokens.apply(record, unquote(key.removeprefix("token/")))

    control.subscribe(on_change)
    app.state.control, app.state.tokens, app.state.visibility = control, tokens, visibility
    app.include_router(router)


router = APIRouter(
    prefix="/v1",
    tags=["control plane"],
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
)

# --- tokens ----------------------------------------------------------------------------------


@router.post("/tokens", status_code=201, summary="Mint a token (admin); shown once")
async def mint_token(
    body: TokenCreate, caller: Caller, control: Control, writes: Written, response: Response
) -> dict[str, Any]:
    issued, record = await control.mint_token(caller, body.role, body.team_id)
    await writes.visible(response, record.version)
    return {"token": issued.token, **(public(record) or {})}


@router.get("/tokens", summary="List tokens (admin; never the token or its hash)")
async def list_tokens(
    caller: Caller, control: Control, limit: Limit = 100, after: After = None
) -> dict[str, Any]:
    return (await control.list_tokens(caller, limit=limit, after=_cursor(after))).to_json()


@router.delete("/tokens/{token_id}", status_code=204, summary="Revoke a token (idempotent)")
async def revoke_token(token_id: str, caller: Caller, control: Control, writes: Written) -> Response:
    record = await control.revoke_token(caller, validate_id(token_id, field="token_id"))
    return await writes.deleted(record.version)


# --- orgs ------------------------------------------------------------------------------------


@router.put("/orgs/{org_id}", summary="Create an org (idempotent)")
async def put_org(
    org_id: str,
    caller: Caller,
    control: Control,
    writes: Written,
    response: Response,
    body: OrgBody | None = None,
) -> dict[str, Any]:
    record = await control.put_org(caller, validate_id(org_id, field="org_id"))
    await writes.visible(response, record.version)
    return public(record) or {}


@router.get("/orgs/{org_id}")
async def get_org(org_id: str, caller: Caller, control: Control) -> dict[str, Any]:
    return public(await control.get_org(caller, validate_id(org_id, field="org_id"))) or {}


@router.delete("/orgs/{org_id}", status_code=204, summary="Delete an org (409 while it has teams)")
async def delete_org(org_id: str, caller: Caller, control: Control, writes: Written) -> Response:
    return await writes.deleted(await control.delete_org(caller, validate_id(org_id, field="org_id")))


@router.get("/orgs")
async def list_orgs(
    caller: Caller, control: Control, limit: Limit = 100, after: After = None
) -> dict[str, Any]:
    return (await control.list_orgs(caller, limit=limit, after=_cursor(after))).to_json()


# --- teams and members -----------------------------------------------------------------------


@router.put("/teams/{team_id}", summary="Create or change a team (idempotent)")
async def put_team(
    team_id: str,
    caller: Caller,
    control: Control,
    writes: Written,
    response: Response,
    body: TeamBody | None = None,
) -> dict[str, Any]:
    org_id = body.org_id if body else None
    record = await control.put_team(caller, validate_id(team_id, field="team_id"), org_id)
    await writes.visible(response, record.version)
    return public(record) or {}


@router.get("/teams/{team_id}")
async def get_team(team_id: str, caller: Caller, control: Control) -> dict[str, Any]:
    return public(await control.get_team(caller, validate_id(team_id, field="team_id"))) or {}


@router.delete(
    "/teams/{team_id}", status_code=204, summary="Delete a team (409 while it has keys or members)"
)
async def delete_team(team_id: str, caller: Caller, control: Control, writes: Written) -> Response:
    return await writes.deleted(await control.delete_team(caller, validate_id(team_id, field="team_id")))


@router.get("/teams")
async def list_teams(
    caller: Caller, control: Control, limit: Limit = 100, after: After = None
) -> dict[str, Any]:
    return (await control.list_teams(caller, limit=limit, after=_cursor(after))).to_json()


@router.put("/teams/{team_id}/members/{user_id}", summary="Add a member (idempotent)")
async def put_member(
    team_id: str,
    user_id: str,
    caller: Caller,
    control: Control,
    writes: Written,
    response: Response,
    body: MemberBody | None = None,
) -> dict[str, Any]:
    record = await control.put_member(
        caller, validate_id(team_id, field="team_id"), validate_id(user_id, field="user_id")
    )
    await writes.visible(response, record.version)
    return public(record) or {}


@router.get("/teams/{team_id}/members/{user_id}")
async def get_member(team_id: str, user_id: str, caller: Caller, control: Control) -> dict[str, Any]:
    record = await control.get_member(
        caller, validate_id(team_id, field="team_id"), validate_id(user_id, field="user_id")
    )
    return public(record) or {}


@router.delete("/teams/{team_id}/members/{user_id}", status_code=204)
async def delete_member(
    team_id: str, user_id: str, caller: Caller, control: Control, writes: Written
) -> Response:
    version = await control.delete_member(
        caller, validate_id(team_id, field="team_id"), validate_id(user_id, field="user_id")
    )
    return await writes.deleted(version)


@router.get("/teams/{team_id}/members")
async def list_members(
    team_id: str, caller: Caller, control: Control, limit: Limit = 100, after: After = None
) -> dict[str, Any]:
    page = await control.list_members(
        caller, validate_id(team_id, field="team_id"), limit=limit, after=_cursor(after)
    )
    return page.to_json()


# --- keys ------------------------------------------------------------------------------------


@router.put("/keys/{key_id:path}", summary="Register or change a key (idempotent)")
async def put_key(
    request: Request,
    key_id: str,
    caller: Caller,
    control: Control,
    writes: Written,
    response: Response,
    body: KeyBody | None = None,
) -> dict[str, Any]:
    body = body or KeyBody()
    record = await control.put_key(caller, _key_id_of(request), body.user_id, body.team_id)
    await writes.visible(response, record.version)
    return public(record) or {}


@router.get("/keys/{key_id:path}")
async def get_key(request: Request, key_id: str, caller: Caller, control: Control) -> dict[str, Any]:
    return public(await control.get_key(caller, _key_id_of(request))) or {}


@router.delete("/keys/{key_id:path}", status_code=204)
async def delete_key(
    request: Request, key_id: str, caller: Caller, control: Control, writes: Written
) -> Response:
    return await writes.deleted(await control.delete_key(caller, _key_id_of(request)))


@router.get("/keys", summary="List keys (all, or of one team with ?team_id=)")
async def list_keys(
    caller: Caller, control: Control, team_id: str | None = None, limit: Limit = 100, after: After = None
) -> dict[str, Any]:
    page = await control.list_keys(caller, team_id=_team_filter(team_id), limit=limit, after=_cursor(after))
    return page.to_json()


# --- budgets ---------------------------------------------------------------------------------


@router.put("/budgets/{scope:path}", summary="Set the budget of a scope (idempotent)")
async def put_budget(
    request: Request,
    scope: str,
    caller: Caller,
    control: Control,
    writes: Written,
    response: Response,
    body: Annotated[dict[str, Any], Body(examples=[BUDGET_EXAMPLE])],
) -> dict[str, Any]:
    parsed_scope = _scope_of(request)
    budget = parse_budget(body)
    record = await control.put_budget(caller, parsed_scope, budget, limits_null=body.get("limits") is None)
    await writes.visible(response, record.version)
    return public(record) or {}


@router.get("/budgets/{scope:path}")
async def get_budget(request: Request, scope: str, caller: Caller, control: Control) -> dict[str, Any]:
    return public(await control.get_budget(caller, _scope_of(request))) or {}


@router.delete("/budgets/{scope:path}", status_code=204)
async def delete_budget(
    request: Request, scope: str, caller: Caller, control: Control, writes: Written
) -> Response:
    return await writes.deleted(await control.delete_budget(caller, _scope_of(request)))


@router.get("/budgets", summary="List budgets (all, or of one team's scopes with ?team_id=)")
async def list_budgets(
    caller: Caller, control: Control, team_id: str | None = None, limit: Limit = 100, after: After = None
) -> dict[str, Any]:
    page = await control.list_budgets(
        caller, team_id=_team_filter(team_id), limit=limit, after=_cursor(after)
    )
    return page.to_json()


# --- audit -----------------------------------------------------------------------------------


@router.get("/audit", summary="The audit log, oldest first (admin)")
async def list_audit(
    caller: Caller, control: Control, limit: Limit = 100, after: Annotated[int | None, Query()] = None
) -> dict[str, Any]:
    return (await control.list_audit(caller, limit=limit, after=after)).to_json()
