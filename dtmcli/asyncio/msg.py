"""The asyncio Msg: the builder and decisions of :class:`dtmcli.Msg`, awaited."""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, TypeVar, Union

from .._barrier.sql_conn import refuse_open_transaction
from .._consts import DEFAULT_DTM
from ..msg import MsgCore
from ._trans import AsyncTransBase
from .client import AsyncDtmLike

__all__ = ["Msg"]

R = TypeVar("R")


class Msg(MsgCore, AsyncTransBase):
    """A 2-phase message for asyncio code (see :class:`dtmcli.Msg`).

    ``await msg.do_and_submit(query_prepared, busi)`` runs ``busi(barrier)`` — a coroutine function
    or a plain one — between prepare and submit, and decides exactly as the sync form does. The
    barrier it receives is a :class:`dtmcli.asyncio.BranchBarrier`.
    """

    def __init__(self, dtm: AsyncDtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)

    async def prepare(self, query_prepared: str) -> None:
        """Create the message as ``prepared`` (see :meth:`dtmcli.Msg.prepare`)."""
        await self._drive(self._prepare_op(query_prepared))

    async def submit(self, *, recover: bool = False) -> None:
        """Submit the message, prepared or not (see :meth:`dtmcli.Msg.submit`)."""
        await self._run("submit", lambda: self._submit_flow(recover))

    async def abort(self, reason: Optional[str] = None) -> None:
        """Abort a prepared message: it becomes ``failed`` and no action runs."""
        await self._run("abort", lambda: self._abort_flow(reason))

    async def query_prepared_status(self, query_prepared: Optional[str] = None) -> None:
        """Ask the ``query_prepared`` URL what happened to the local transaction, as DTM would."""
        await self._drive(self._query_prepared_flow(query_prepared))

    def _msg_barrier(self) -> Any:
        from .barrier import BranchBarrier

        return BranchBarrier.for_msg(self.gid)

    async def prepare_and_submit(
        self, query_prepared: str, busi_call: Callable[[Any], Union[Awaitable[R], R]]
    ) -> R:
        """Prepare, await ``busi_call(barrier)``, then submit or abort (see :meth:`dtmcli.Msg.prepare_and_submit`).

        A cancellation during the local work propagates without abort or submit: the message stays
        prepared and DTM settles it through ``query_prepared`` after ``timeout_to_fail``.
        """
        result: R = await self._drive(self._do_and_submit_flow(query_prepared, busi_call))
        return result

    do_and_submit = prepare_and_submit

    async def do_and_submit_db(
        self, query_prepared: str, conn: Any, busi_call: Callable[[Any], Awaitable[R]]
    ) -> Optional[R]:
        """:meth:`prepare_and_submit` with the local work in an async SQL barrier transaction.

        ``await busi_call(tx)`` runs in one local transaction on ``conn`` (asyncpg, psycopg
        ``AsyncConnection``, aiomysql, SQLAlchemy async) that also inserts the msg barrier row; it must be the
        barrier's own transaction (a SQLAlchemy AsyncConnection/AsyncSession with one open is refused).
        """
        refuse_open_transaction(conn)  # before the prepare: nothing sent for a source that would be refused
        result: Optional[R] = await self.prepare_and_submit(
            query_prepared, lambda barrier: barrier.call_with_db(conn, busi_call, join_transaction=False)
        )
        return result
