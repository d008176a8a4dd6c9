"""``spendgate api``: serve the app factory with uvicorn (uvloop + httptools).

Blocks until SIGINT/SIGTERM; uvicorn runs the lifespan (follower, relay, producer) and stops it
on the way out. Host and port come from ``SPENDGATE_API_HOST`` / ``SPENDGATE_API_PORT``.
"""

from __future__ import annotations

import logging

from spendgate.settings import Settings


def run(settings: Settings) -> None:
    """Run the API in the foreground until it is signalled to stop."""
    import uvicorn

    from spendgate.api.app import create_app
    from spendgate.api.check import with_check_fast_path

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(settings)
    uvicorn.run(
        with_check_fast_path(app, app.state.check_handler),
        host=settings.api_host,
        port=settings.api_port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
    )
