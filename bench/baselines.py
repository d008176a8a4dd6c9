"""Baseline servers, run as their own processes with the same uvicorn options as ``spendgate api``.

``python -m bench.baselines floor --port P``
    the HTTP floor: a bare ASGI app answering a constant JSON body to every request.
``python -m bench.baselines redis --port P --keys N --teams T --orgs O --token TOKEN``
    the usual way to do the same check: FastAPI + pydantic body + bearer token (sha256, constant
    time compare, as spendgate does), registry and budgets in process memory, and on every check
    one ``MGET`` of the request's scope spend counters (current 1d window) from Redis
    (127.0.0.1:6379), compared with the budgets.
"""

import argparse
import hashlib
import hmac
from typing import Any

CONSTANT = (
    b'{"allowed":true,"blocked_by":[],"retry_after_s":null,"degraded":false,"state_lag_ms":0}'
)
REDIS_PREFIX = "sgbench:"


def floor_app() -> Any:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(CONSTANT)).encode())]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        more = True
        while more:  # drain the request body
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": CONSTANT})

    return app


def redis_app(keys: int, teams: int, orgs: int, token: str) -> Any:
    import redis.asyncio as aioredis
    from fastapi import Depends, FastAPI, HTTPException, Request
    from pydantic import BaseModel, ConfigDict

    registry = {f"k{i}": (f"u{i}", f"t{i % teams}") for i in range(keys)}
    team_org = {f"t{t}": f"o{t % orgs}" for t in range(teams)}
    # budgets: scope -> 1d cap in nanos (same budgets as loaded into spendgate)
    caps: dict[str, int] = {f"key:k{i}": 100 * 10**9 for i in range(keys)}
    caps.update({f"team:t{t}": 10_000 * 10**9 for t in range(teams)})
    admin_hash = hashlib.sha256(token.encode()).hexdigest()
    client = aioredis.Redis(host="127.0.0.1", port=6379, max_connections=64)

    class Body(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        key_id: str
        end_user_id: str | None = None
        model: str | None = None
        tags: list[str] = []
        user_id: str | None = None
        team_id: str | None = None
        org_id: str | None = None
        estimated_cost_usd: str | None = None

    async def auth(request: Request) -> str:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(value.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, admin_hash):
            raise HTTPException(401)
        return "admin"

    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/check")
    async def check(body: Body, _: str = Depends(auth)) -> dict[str, Any]:
        user, team = registry.get(body.key_id, (body.user_id, body.team_id))
        org = team_org.get(team or "", body.org_id)
        scopes = [f"key:{body.key_id}"]
        if user:
            scopes.append(f"user:{user}")
        if team:
            scopes.append(f"team:{team}")
        if team and user:
            scopes.append(f"member:{team}/{user}")
        if org:
            scopes.append(f"org:{org}")
        if body.end_user_id:
            scopes.append(f"end_user:{body.end_user_id}")
        if body.model:
            scopes += [f"model:{body.model}", f"key_model:{body.key_id}/{body.model}"]
        scopes += [f"tag:{t}" for t in body.tags]
        values = await client.mget([REDIS_PREFIX + s for s in scopes])
        blocked = []
        for scope, raw in zip(scopes, values, strict=True):
            cap = caps.get(scope)
            spend = int(raw) if raw is not None else 0
            if cap is not None and spend >= cap:
                blocked.append({"scope": scope, "window": "1d", "spend_usd": str(spend / 1e9),
                                "limit_usd": str(cap / 1e9), "resets_at": None})
        return {"allowed": not blocked, "blocked_by": blocked, "retry_after_s": None, "degraded": False,
                "state_lag_ms": 0}

    return app


def load_redis(keys: int, teams: int) -> int:
    """Spend counters of every key, user and team scope (nanos), as a Redis-based gate keeps them."""
    import redis

    r = redis.Redis(host="127.0.0.1", port=6379)
    stale = list(r.scan_iter(REDIS_PREFIX + "*", count=10000))
    for i in range(0, len(stale), 10000):
        r.delete(*stale[i : i + 10000])
    pipe = r.pipeline(transaction=False)
    n = 0
    for i in range(keys):
        pipe.set(f"{REDIS_PREFIX}key:k{i}", (i % 90) * 10**9 + 125_000_000)
        pipe.set(f"{REDIS_PREFIX}user:u{i}", (i % 90) * 10**9)
        pipe.set(f"{REDIS_PREFIX}member:t{i % teams}/u{i}", (i % 90) * 10**9)
        n += 3
        if n % 30000 == 0:
            pipe.execute()
    for t in range(teams):
        pipe.set(f"{REDIS_PREFIX}team:t{t}", (t % 9000) * 10**9)
        n += 1
    pipe.execute()
    r.close()
    return n


def clear_redis() -> None:
    import redis

    r = redis.Redis(host="127.0.0.1", port=6379)
    stale = list(r.scan_iter(REDIS_PREFIX + "*", count=10000))
    for i in range(0, len(stale), 10000):
        r.delete(*stale[i : i + 10000])
    r.close()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["floor", "redis"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--teams", type=int, default=1000)
    parser.add_argument("--orgs", type=int, default=10)
    parser.add_argument("--token", default="")
    args = parser.parse_args()
    app = floor_app() if args.kind == "floor" else redis_app(args.keys, args.teams, args.orgs, args.token)
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
