"""Name resolution with a bound: the webhook routes and the notifier check where a URL points."""

from __future__ import annotations

import asyncio
import socket

RESOLVE_TIMEOUT_S = 2.0


async def resolve(host: str, timeout_s: float = RESOLVE_TIMEOUT_S) -> list[str]:
    """The addresses ``host`` resolves to (empty when it does not, within ``timeout_s``)."""
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout_s
        )
    except (OSError, TimeoutError, UnicodeError):
        return []
    return sorted({str(info[4][0]) for info in infos})
