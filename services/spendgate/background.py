"""Tasks a caller stops waiting for but lets finish: one rule for every "answer at the bound" path."""

from __future__ import annotations

import asyncio
from typing import Any


def abandon(task: asyncio.Future[Any], keep: set[asyncio.Future[Any]], *, cancel: bool = True) -> None:
    """Let ``task`` end in the background (cancelled first unless ``cancel`` is False).

    ``keep`` holds a reference until it is done (asyncio keeps only weak ones, so an unreferenced
    task could vanish mid-way), and its exception is retrieved, so nothing warns about it.
    """
    if cancel:
        task.cancel()
    keep.add(task)
    task.add_done_callback(keep.discard)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
