"""What the asyncio barrier stores share: finishing a cleanup step even when the caller is cancelled."""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, TypeVar

__all__ = ["shielded"]

T = TypeVar("T")


async def shielded(step: Awaitable[T]) -> T:
    """Await ``step`` to its end even if the calling task is cancelled meanwhile, then re-raise that cancellation.

    Used for the steps that must not stop halfway: opening the barrier's transaction (so a
    cancellation finds it in a known state) and rolling it back (so a cancelled call never leaves
    it open on a connection that goes back to a pool). ``asyncio.shield`` alone returns at the
    first cancellation while the step still runs; this waits for the step, however many
    cancellations arrive.
    """
    task: asyncio.Future[T] = asyncio.ensure_future(step)
    cancelled: Any = None
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError as exc:
            if task.done():  # the step itself was cancelled (the loop is shutting down): nothing to wait for
                raise
            cancelled = exc
    if cancelled is not None:
        raise cancelled
    return result
