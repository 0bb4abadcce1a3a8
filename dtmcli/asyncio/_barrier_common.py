"""What the asyncio barrier stores share: finishing a cleanup step even when the caller is cancelled."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Optional, TypeVar

__all__ = ["CANCEL_GRACE", "shielded"]

logger = logging.getLogger("dtmcli")

T = TypeVar("T")

CANCEL_GRACE = 5.0
"""Seconds a cancelled call waits for a shielded step that has an ``abort`` before it aborts it.

A rollback of a database that no longer answers (a network partition) would otherwise hold the
cancelled call until TCP gives up, which can take minutes.
"""

_UNWIND = 0.1  # seconds a cancelled step gets to unwind (twice) before ``abort`` runs


async def shielded(
    step: Awaitable[T], *, abort: Optional[Callable[[], None]] = None, cancelling: bool = False
) -> T:
    """Await ``step`` to its end even if the calling task is cancelled meanwhile, then re-raise that cancellation.

    Used for the steps that must not stop halfway: opening the barrier's transaction (so a
    cancellation finds it in a known state) and rolling it back (so a cancelled call never leaves
    it open on a connection that goes back to a pool). ``asyncio.shield`` alone returns at the
    first cancellation while the step still runs; this waits for the step, however many
    cancellations arrive. A cancellation that arrived is re-raised even when the step then fails.

    With ``abort`` (a blocking call that closes the step's connection, so that the server rolls
    back and no pool reuses it), the wait is bounded: :data:`CANCEL_GRACE` seconds after the first
    cancellation, or from the start when ``cancelling`` (the step is the cleanup of a cancelled
    call), the step is cancelled, ``abort()`` runs and the cancellation is raised. Without
    ``abort`` the wait is not bounded.
    """
    loop = asyncio.get_running_loop()
    task: asyncio.Future[T] = asyncio.ensure_future(step)
    cancelled: Optional[BaseException] = None
    deadline = loop.time() + CANCEL_GRACE if cancelling and abort is not None else None
    while not task.done():
        timeout = None if deadline is None else max(deadline - loop.time(), 0.0)
        try:
            await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError as exc:
            cancelled = exc
            if deadline is None and abort is not None:
                deadline = loop.time() + CANCEL_GRACE
            continue
        if not task.done():  # the bound ran out
            await _give_up(task, abort)
            raise cancelled if cancelled is not None else asyncio.CancelledError()
    if cancelled is not None:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("a shielded step failed after a cancellation: %r", task.exception())
        raise cancelled
    return task.result()  # the step's own cancellation (the loop is shutting down) or error propagates


async def _give_up(task: asyncio.Future[Any], abort: Optional[Callable[[], None]]) -> None:
    """Cancel a step that outlived its bound (twice: some drivers close the connection on a second
    interruption), then ``abort()``; a late result or error of the step is consumed, never logged as lost."""
    task.add_done_callback(_consume)
    for _ in range(2):
        if task.done():
            break
        task.cancel()
        try:
            await asyncio.wait({task}, timeout=_UNWIND)
        except asyncio.CancelledError:
            pass  # cancelled again while giving up: we are raising a cancellation anyway
    if abort is not None:
        try:
            abort()
        except Exception as exc:
            logger.warning("aborting a connection after a cancelled step failed: %s", exc)


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()
