"""``/ui``: the spend dashboard's static files (issue 17), shipped in the package (``spendgate/ui/``).

Plain HTML, JavaScript and CSS: no build step, nothing fetched from elsewhere at run time (the
Content-Security-Policy allows this origin only). The pages read the public API with the
token the user signs in with, kept in the tab's ``sessionStorage``; nothing here needs a token.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse, Response

from spendgate.api.errors import NotFound

UI_DIR = Path(str(resources.files("spendgate") / "ui"))
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def ui_router(directory: Path = UI_DIR) -> APIRouter:
    """``GET /ui`` (redirect), ``GET /ui/`` (the page), ``GET /ui/{asset}`` (files of ``directory``)."""
    router = APIRouter(tags=["ui"], include_in_schema=False)
    assets = {p.name: p for p in directory.iterdir() if p.suffix in TYPES} if directory.is_dir() else {}

    @router.get("/ui")
    async def ui_root() -> Response:
        return RedirectResponse("/ui/", status_code=307)

    @router.get("/ui/{asset}")
    async def ui_asset(asset: str) -> Response:
        path = assets.get(asset)
        if path is None:
            raise NotFound(f"no such dashboard file: {asset}")
        return FileResponse(path, media_type=TYPES[path.suffix], headers=HEADERS)

    @router.get("/ui/")
    async def ui_index() -> Response:
        path = assets.get("index.html")
        if path is None:
            raise NotFound("the dashboard is not installed (spendgate/ui/index.html missing)")
        return FileResponse(path, media_type=TYPES[".html"], headers=HEADERS)

    return router
