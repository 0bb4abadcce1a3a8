"""The asyncio driver of the TCC/XA core: awaited prepare/submit/abort, a shielded abort, and the
``async with`` / decorator / ``run`` runner (the decisions are :mod:`dtmcli._twophase`'s flows)."""

from __future__ import annotations

import asyncio
import functools
import logging
from types import TracebackType
from typing import Any, Awaitable, Callable, Coroutine, Optional, TypeVar

from .._consts import DEFAULT_DTM
from .._flow import arun
from .._twophase import T2, RunnerCore, TwoPhaseCore, refuse_sync
from ._trans import AsyncTransBase
from .client import AsyncDtmLike

__all__ = ["AsyncGlobalTransaction", "AsyncTwoPhaseTrans"]

logger = logging.getLogger("dtmcli")

R = TypeVar("R")

# Aborts still running after the task that started them was cancelled again: asyncio keeps only weak
# references to tasks, so they are held here until done.
_PENDING: set[asyncio.Task[None]] = set()


def _report_late(task: asyncio.Task[None]) -> None:
    _PENDING.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error("abort finished after its caller was cancelled, and failed: %s", task.exception())


async def _shielded(abort: Coroutine[Any, Any, None]) -> None:
    """Await ``abort`` so that cancelling the caller does not cancel it: it runs to its end regardless."""
    task = asyncio.ensure_future(abort)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            _PENDING.add(task)
            task.add_done_callback(_report_late)
        raise


class AsyncTwoPhaseTrans(TwoPhaseCore, AsyncTransBase):
    """Base of the asyncio :class:`~dtmcli.asyncio.Tcc` and :class:`~dtmcli.asyncio.Xa`.

    Same lifecycle, branch ids and errors as the sync classes. Branch calls may run concurrently
    (``asyncio.gather``): each takes its own branch id.
    """

    def __init__(self, dtm: AsyncDtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)

    async def prepare(self) -> None:
        """Create the global transaction on DTM as ``prepared`` (see :meth:`dtmcli.Tcc.prepare`)."""
        await self._run("prepare", self._prepare_flow)

    async def submit(self) -> None:
        """Submit: DTM confirms/commits every registered branch (see :meth:`dtmcli.Tcc.submit`)."""
        await self._run("submit", self._submit_flow)

    async def abort(self, reason: Optional[str] = None) -> None:
        """Abort: DTM cancels/rolls back every registered branch. ``reason`` is stored (clipped)."""
        await self._run("abort", lambda: self._abort_flow(reason))

    def _cleanup_abort(self, reason: str) -> Awaitable[None]:
        # The abort after a failed or cancelled body must reach DTM even when the task is cancelled
        # (again) meanwhile: otherwise the transaction would wait for timeout_to_fail.
        return _shielded(self.abort(reason))


class AsyncGlobalTransaction(RunnerCore[T2]):
    """A TCC or XA global transaction for asyncio code: ``async with``, a decorator, or :meth:`run`.

    * ``async with gt as trans:`` prepares and yields the transaction; a clean exit submits, an
      exception aborts with ``rollback_reason`` and propagates unchanged.
    * ``@gt`` decorates ``async def func(trans, *args, **kwargs)``; each call runs a new transaction.
    * ``await gt.run(callback)`` runs ``await callback(trans)`` in a new transaction and returns its result.

    The body must be a coroutine function: a plain ``def`` is refused with DtmInvalidInput before
    anything is sent. A cancellation (``asyncio.CancelledError``) of the body aborts the
    transaction, shielded so that a second cancellation cannot stop the abort, then propagates.
    Entered by several tasks at once, each exit finishes the transaction its own task entered
    (see :class:`dtmcli.GlobalTransaction`).
    """

    async def __aenter__(self) -> T2:
        trans = self._factory()
        await trans.prepare()
        return self._entered_now(trans)

    async def __aexit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        await arun(self._take_entered()._finish_flow(exc))

    async def _run(self, body: Callable[[T2], Awaitable[R]]) -> R:
        result: R = await arun(self._run_flow(body))
        return result

    def run(self, callback: Callable[[T2], Awaitable[R]]) -> Awaitable[R]:
        """Run ``await callback(trans)`` in a new global transaction; await it for what the callback returns.

        ``callback`` must be a coroutine function (checked now, before anything is sent).
        """
        refuse_sync(self._kind, callback)
        return self._run(callback)

    def __call__(self, func: Callable[..., Awaitable[R]]) -> Callable[..., Coroutine[Any, Any, R]]:
        """Decorate ``async def func(trans, ...)`` so each call runs in its own global transaction."""
        refuse_sync(self._kind, func)

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> R:
            return await self._run(lambda trans: func(trans, *args, **kwargs))

        return wrapper
