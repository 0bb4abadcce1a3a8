"""The asyncio TCC: the same protocol as :mod:`dtmcli.tcc`, with every call awaited.

>>> async with tcc_global_transaction(DTM, timeout_to_fail=60) as tcc:
...     await asyncio.gather(
...         tcc.call_branch({"amount": 30}, f"{busi}/TransOutTry", f"{busi}/TransOutConfirm", f"{busi}/TransOutCancel"),
...         tcc.call_branch({"amount": 30}, f"{busi}/TransInTry", f"{busi}/TransInConfirm", f"{busi}/TransInCancel"),
...     )

Inside an ``async def`` try handler, ``Tcc.from_request(request)`` continues the same global
transaction with nested branches ``<branch_id>01``, ``<branch_id>02``, ... (protocol.md §10).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, TypeVar, overload

from .._consts import DEFAULT_DTM
from .._twophase import BranchReply, global_transaction
from ..tcc import TccCore
from ._twophase import AsyncGlobalTransaction, AsyncTwoPhaseTrans
from .client import AsyncDtmLike

__all__ = ["Tcc", "tcc_global_transaction"]

R = TypeVar("R")


class Tcc(TccCore, AsyncTwoPhaseTrans):
    """A TCC global transaction for asyncio code (or, from :meth:`from_request`, a nested part of one).

    Usually driven by :func:`tcc_global_transaction`; by hand it is ``await prepare()``, any number
    of ``await call_branch(...)`` (concurrently too), then ``await submit()`` or ``await abort(reason)``.
    Same checks, branch ids, errors and lifecycle as :class:`dtmcli.Tcc`. ``from_request``,
    ``from_query`` and ``from_info`` take an :class:`AsyncDtmClient` (or a URL) as ``dtm``.
    """

    def __init__(self, dtm: AsyncDtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)

    async def call_branch(self, payload: Any, try_url: str, confirm_url: str, cancel_url: str) -> BranchReply:
        """Register a branch, then POST its try; return the try's answer (see :meth:`dtmcli.Tcc.call_branch`).

        Branch calls may run concurrently (``asyncio.gather``); any error after the branch was
        registered makes the global transaction abort.
        """
        return await self._drive(self._call_branch_flow(payload, try_url, confirm_url, cancel_url))


@overload
def tcc_global_transaction(
    dtm: AsyncDtmLike = ..., gid: Optional[str] = ..., callback: None = ..., **options: Any
) -> AsyncGlobalTransaction[Tcc]: ...


@overload
def tcc_global_transaction(
    dtm: AsyncDtmLike, gid: Optional[str], callback: Callable[[Tcc], Awaitable[R]], **options: Any
) -> Awaitable[R]: ...


@overload
def tcc_global_transaction(
    dtm: AsyncDtmLike = ..., gid: Optional[str] = ..., *, callback: Callable[[Tcc], Awaitable[R]], **options: Any
) -> Awaitable[R]: ...


def tcc_global_transaction(
    dtm: AsyncDtmLike = DEFAULT_DTM,
    gid: Optional[str] = None,
    callback: Optional[Callable[[Tcc], Awaitable[Any]]] = None,
    **options: Any,
) -> Any:
    """Run a TCC global transaction in asyncio code: ``prepare``, the body, then ``submit`` (or ``abort``).

    Three shapes, as :func:`dtmcli.tcc_global_transaction` but awaited:

    * ``async with tcc_global_transaction(dtm, gid, **options) as tcc: ...``
    * ``@tcc_global_transaction(dtm, **options)`` on ``async def f(tcc, ...)``: a new transaction per call;
    * ``await tcc_global_transaction(dtm, gid, callback, **options)`` with ``async def callback(tcc)``.

    Any exception from the body aborts the transaction with ``rollback_reason`` set, then
    propagates unchanged; a cancellation aborts it too (shielded) and propagates. Gid, options and
    the kind of body (coroutine functions only) are checked here, before anything is sent.
    """
    return global_transaction(AsyncGlobalTransaction, Tcc, "tcc_global_transaction", dtm, gid, callback, options)
