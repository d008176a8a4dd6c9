"""``/healthz``, ``/readyz`` and ``/metrics`` (no authentication)."""

# No "from __future__ import annotations": FastAPI must see the Annotated aliases.
from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from spendgate.api.deps import GateDep

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="200 once config, decisions and state are caught up (503 before)")
async def readyz(gate: GateDep) -> JSONResponse:
    ready = gate.follower.ready
    body = {"ready": ready, "state_lag_ms": gate.lag_ms()}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics")
async def prometheus(gate: GateDep) -> Response:
    data, content_type = gate.metrics.render()
    return Response(data, media_type=content_type)
