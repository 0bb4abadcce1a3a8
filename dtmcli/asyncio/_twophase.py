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
from .._twophase import T2, RunnerCore, TwoPhaseCore, refuse_not_awaitable, refuse_sync
from ._trans import AsyncTransBase
from .client import AsyncDtmLike

__all__ = ["AsyncGlobalTransaction", "AsyncTwoPhaseTrans"]

logger = logging.getLogger("dtmcli")

R = TypeVar("R")

# Aborts still running after the task that started them was cancelled again: asyncio keeps only weak
# references to tasks, so they are held here until done.
_PENDING: set[asyncio.Task[None]] = set()


def _report_late(what: str, task: asyncio.Task[None]) -> None:
    _PENDING.discard(task)
    if task.cancelled():
        # The event loop is shutting down (asyncio.run returning, a server stopping): it cancels
        # every task left, this abort too, and DTM keeps the transaction prepared.
        logger.warning(
            "%s was cancelled before DTM answered (the event loop shut down?): DTM aborts the transaction "
            "only after its timeout_to_fail", what,
        )
    elif task.exception() is not None:
        logger.error("%s finished after its caller was cancelled, and failed: %s", what, task.exception())


async def _shielded(abort: Coroutine[Any, Any, None], what: str = "abort") -> None:
    """Await ``abort`` so that cancelling the caller does not cancel it: it runs on after a second
    cancellation (until the event loop shuts down, which cancels it: that is logged)."""
    task = asyncio.ensure_future(abort)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not task.done():
            _PENDING.add(task)
            task.add_done_callback(functools.partial(_report_late, what))
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
        return _shielded(self.abort(reason), f"abort of {self.trans_type} {self.gid}")

    def _unsure_abort(self, reason: str) -> Awaitable[None]:
        return _shielded(self._drive(self._unsure_abort_flow(reason)), f"abort of {self.trans_type} {self.gid}")

    def _cancel_requested(self) -> bool:
        task = asyncio.current_task()
        cancelling = getattr(task, "cancelling", None)  # Python 3.11+
        return bool(cancelling()) if cancelling is not None else False


class AsyncGlobalTransaction(RunnerCore[T2]):
    """A TCC or XA global transaction for asyncio code: ``async with``, a decorator, or :meth:`run`.

    * ``async with gt as trans:`` prepares and yields the transaction; a clean exit submits, an
      exception aborts with ``rollback_reason`` and propagates unchanged.
    * ``@gt`` decorates ``async def func(trans, *args, **kwargs)``; each call runs a new transaction.
    * ``await gt.run(callback)`` runs ``await callback(trans)`` in a new transaction and returns its result.

    The body must be a coroutine function (or a lambda returning a coroutine): a plain ``def`` or an
    async generator function is refused with DtmInvalidInput before anything is sent. A
    cancellation (``asyncio.CancelledError``) of the body aborts the transaction, shielded so that
    a second cancellation cannot stop the abort, then propagates; the abort then runs on by itself
    until DTM answers, unless the event loop shuts down first (``asyncio.run`` returning, a server
    stopping), which cancels it: that is logged, and DTM aborts the transaction after its
    ``timeout_to_fail``. A branch call cut off alone (``asyncio.wait_for`` around it) whose
    TimeoutError the body catches also aborts, and the exit raises a DtmError naming the branch. A
    prepare or submit cancelled before DTM answered is followed by a (shielded) abort.
    Entered by several tasks at once, each exit finishes the transaction its own task entered
    (see :class:`dtmcli.GlobalTransaction`).
    """

    async def __aenter__(self) -> T2:
        trans = self._factory()
        await arun(self._begin_flow(trans))
        return self._entered_now(trans)

    async def __aexit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        await arun(self._take_entered()._finish_flow(exc))

    async def _run(self, body: Callable[[T2], Awaitable[R]]) -> R:
        def checked(trans: T2) -> Awaitable[R]:
            awaitable = body(trans)
            refuse_not_awaitable(self._kind, body, awaitable)  # raised before the submit: aborts
            return awaitable

        result: R = await arun(self._run_flow(checked))
        return result

    def run(self, callback: Callable[[T2], Awaitable[R]]) -> Awaitable[R]:
        """Run ``await callback(trans)`` in a new global transaction; await it for what the callback returns.

        ``callback`` must be a coroutine function, or a lambda returning a coroutine (checked now,
        before anything is sent; what a lambda returns is checked before the submit).
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
