"""The asyncio XA: the global side of :mod:`dtmcli.xa` and the branch side of
:mod:`dtmcli.barrier`'s local XA, awaited.

>>> async with xa_global_transaction(DTM) as xa:
...     await xa.call_branch({"amount": 30}, f"{busi}/TransOutXa")

In the branch's action handler, ``await xa_local_transaction(request, connect, busi)`` runs the
local XA transaction on an asyncio connection (aiomysql, asyncpg, psycopg ``AsyncConnection``)
and registers the branch; the phase-2 handler is ``await xa_handle_phase2(request, connect)``.
Every step and decision is the sync form's (:mod:`dtmcli._barrier.xa` flows); only the I/O differs.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, TypeVar, overload

from .._barrier.core import DEFAULT_TABLE
from .._barrier.sql_conn import refuse_pipeline
from .._barrier.xa import action_info, local_transaction_flow, phase2_flow, phase2_info, preflight_flow
from .._consts import DEFAULT_DTM
from .._flow import arun
from .._twophase import BranchReply, global_transaction
from ..branch import BranchInfo
from ..errors import DtmInvalidInput
from ..xa import XaCore, register_xa_branch_flow, xa_registration
from ._barrier_common import shielded
from ._barrier_sql import adapt, connection_from
from ._twophase import AsyncGlobalTransaction, AsyncTwoPhaseTrans
from .client import AsyncDtmLike, as_async_client

__all__ = [
    "Xa",
    "register_xa_branch",
    "xa_global_transaction",
    "xa_handle_phase2",
    "xa_local_transaction",
    "xa_preflight",
]

R = TypeVar("R")


class Xa(XaCore, AsyncTwoPhaseTrans):
    """An XA global transaction for asyncio code (see :class:`dtmcli.Xa`: same checks, ids and errors).

    Usually driven by :func:`xa_global_transaction`; by hand it is ``await prepare()``, any number
    of ``await call_branch(...)``, then ``await submit()`` or ``await abort(reason)``.
    """

    def __init__(self, dtm: AsyncDtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)

    async def call_branch(self, payload: Any, url: str) -> BranchReply:
        """POST the branch's action (``op=action``, ``phase2_url=url``) and return its answer
        (see :meth:`dtmcli.Xa.call_branch`); any error makes the global transaction abort."""
        return await self._drive(self._call_branch_flow(payload, url))


@overload
def xa_global_transaction(
    dtm: AsyncDtmLike = ..., gid: Optional[str] = ..., callback: None = ..., **options: Any
) -> AsyncGlobalTransaction[Xa]: ...


@overload
def xa_global_transaction(
    dtm: AsyncDtmLike, gid: Optional[str], callback: Callable[[Xa], Awaitable[R]], **options: Any
) -> Awaitable[R]: ...


@overload
def xa_global_transaction(
    dtm: AsyncDtmLike = ..., gid: Optional[str] = ..., *, callback: Callable[[Xa], Awaitable[R]], **options: Any
) -> Awaitable[R]: ...


def xa_global_transaction(
    dtm: AsyncDtmLike = DEFAULT_DTM,
    gid: Optional[str] = None,
    callback: Optional[Callable[[Xa], Awaitable[Any]]] = None,
    **options: Any,
) -> Any:
    """Run an XA global transaction in asyncio code: ``prepare``, the body, then ``submit`` (or ``abort``).

    The shapes of :func:`dtmcli.asyncio.tcc_global_transaction`: ``async with``, a decorator on an
    ``async def``, or ``await xa_global_transaction(dtm, gid, callback)``. An error or a
    cancellation of the body aborts (with ``rollback_reason``) and propagates.
    """
    return global_transaction(AsyncGlobalTransaction, Xa, "xa_global_transaction", dtm, gid, callback, options)


async def register_xa_branch(info: BranchInfo, *, dtm: Optional[AsyncDtmLike] = None) -> None:
    """Branch side: register the XA branch of an ``op=action`` call with DTM (see :func:`dtmcli.register_xa_branch`)."""
    body = xa_registration(info)
    client = as_async_client(dtm if dtm is not None else info.require_dtm())
    await arun(register_xa_branch_flow(client, body), client)


# --- the local XA on asyncio connections -------------------------------------------------------------

def _driver_of(conn: Any) -> Optional[str]:
    module, name = type(conn).__module__, type(conn).__name__
    top = module.split(".")[0]
    if top in ("aiomysql", "asyncpg"):
        return top
    if top == "psycopg" and name.startswith("Async"):
        return "psycopg"
    return None


class _AsyncXaIO:
    """The awaited I/O of the XA flows on one aiomysql, asyncpg or psycopg ``AsyncConnection``
    (statements through the asyncio barrier's adapter), and the DTM client's ``transport`` (HTTP) or
    ``grpc_io`` (an AsyncDtmGrpcClient's, for the DtmCall effects of registerBranch)."""

    def __init__(self, conn: Any, dialect: Optional[str], transport: Any = None, grpc_io: Any = None) -> None:
        driver = _driver_of(conn)
        if driver is None:
            raise DtmInvalidInput(
                "the asyncio XA needs a dedicated asyncio connection (aiomysql, asyncpg or psycopg "
                f"AsyncConnection), not a {type(conn).__module__}.{type(conn).__name__}"
            )
        self.adapter = adapt(conn, dialect)
        self.conn, self.driver, self.dialect, self.transport = conn, driver, self.adapter.dialect, transport
        self.grpc_io = grpc_io

    def in_transaction(self) -> bool:
        conn = self.conn
        if self.driver == "aiomysql":
            return bool(conn.get_transaction_status())
        if self.driver == "asyncpg":
            return bool(conn.is_in_transaction())
        return int(conn.info.transaction_status) != 0  # psycopg.pq.TransactionStatus.IDLE

    async def set_autocommit(self, on: bool) -> Optional[bool]:
        # Run to its end even if the caller is cancelled meanwhile, so that the caller's setting is
        # restored on a dedicated connection (it is not closed afterwards).
        return await shielded(self._set_autocommit(on))

    async def _set_autocommit(self, on: bool) -> Optional[bool]:
        conn = self.conn
        if self.driver == "asyncpg" or getattr(conn, "closed", False):
            return None  # asyncpg: every statement outside an explicit BEGIN commits on its own
        current = bool(conn.get_autocommit() if self.driver == "aiomysql" else conn.autocommit)
        if current == on:
            return None
        if self.driver == "aiomysql":
            await conn.autocommit(on)
        else:
            await conn.set_autocommit(on)
        return current

    async def exec(self, sql: str) -> Optional[str]:
        if self.driver == "aiomysql":
            async with self.conn.cursor() as cur:
                await cur.execute(sql)
            return None
        if self.driver == "asyncpg":
            return str(await self.conn.execute(sql))  # the command tag
        cur = await self.conn.execute(sql)
        tag = getattr(cur, "statusmessage", None)
        return tag if isinstance(tag, str) else None

    async def exec_shielded(self, sql: str) -> Optional[str]:
        # The XA start and the abort must not stop halfway: a cancelled abort would leave the XA open
        # on a dedicated connection, holding its row locks until the application closes it (as the
        # asyncio barrier shields its begin and rollback).
        return await shielded(self.exec(sql))

    async def refuse_aborted(self) -> None:
        self.adapter.busi_ran = True  # asyncpg: probe with one statement (see _AsyncAdapter.refuse_aborted)
        await self.adapter.refuse_aborted()

    async def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        return await self.adapter.execute(sql, params)

    async def fetch_one(self, sql: str, params: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
        return await self.adapter.fetch_one(sql, params)

    async def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return await self.adapter.fetch_all(sql, params)

    # The XA flows commit and roll back only statements run in autocommit mode (nothing to do on
    # asyncpg), or on drivers that could not switch to it.
    async def commit(self) -> None:
        if self.driver != "asyncpg":
            await self.conn.commit()

    async def rollback(self) -> None:
        if self.driver != "asyncpg" and not getattr(self.conn, "closed", False):
            await self.conn.rollback()


def _open(conn: Any, dialect: Optional[str], transport: Any = None, grpc_io: Any = None) -> _AsyncXaIO:
    io = _AsyncXaIO(conn, dialect, transport, grpc_io)
    if io.driver == "psycopg":
        refuse_pipeline(conn)
    if io.in_transaction():
        raise DtmInvalidInput("the XA connection has an open local transaction; commit or roll it back first")
    return io


async def xa_local_transaction(
    query: Any,
    conn: Any,
    busi: Callable[[Any], Awaitable[R]],
    *,
    dtm: Optional[AsyncDtmLike] = None,
    table: str = DEFAULT_TABLE,
    dialect: Optional[str] = None,
) -> R:
    """Run ``await busi(conn)`` as the local XA transaction of an xa ``action`` call and prepare it.

    The asyncio form of :func:`dtmcli.barrier.xa_local_transaction`, with the same steps, checks and
    errors. ``conn`` is a factory of new asyncio connections (an ``async def`` or e.g.
    ``functools.partial(asyncpg.connect, dsn)``; the connection is closed afterwards, which
    MariaDB needs before phase 2 can see the prepared branch), a dedicated aiomysql, asyncpg or
    psycopg ``AsyncConnection`` without an open transaction, or a pool (on MariaDB a pooled
    connection keeps the prepared branch from phase 2 until it disconnects: prefer a factory).
    ``dtm`` (a URL or AsyncDtmClient) overrides the request's ``dtm``.
    """
    return await _local_transaction(query, conn, busi, dtm, table, dialect, as_async_client)


async def _local_transaction(
    query: Any,
    conn: Any,
    busi: Callable[[Any], Awaitable[R]],
    dtm: Any,
    table: str,
    dialect: Optional[str],
    as_dtm: Callable[[Any], Any],
) -> R:
    """:func:`xa_local_transaction` registering through the client ``as_dtm`` makes of the DTM source:
    an HTTP one, or a gRPC one (:func:`dtmcli.asyncio.grpc.xa_local_transaction`)."""
    info, dtm_source = action_info(query, dtm, table)
    client = as_dtm(dtm_source)
    register = register_xa_branch_flow(client, xa_registration(info))
    async with connection_from(conn) as dedicated:
        io = _open(dedicated, dialect, client.transport, getattr(client, "grpc_io", None))
        result: R = await arun(local_transaction_flow(info, io.dialect, table, busi, dedicated, register), io)
        return result


async def xa_handle_phase2(
    query: Any, conn: Any, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None
) -> None:
    """Handle DTM's phase-2 call (``op=commit`` or ``op=rollback``) of an XA branch, awaited
    (see :func:`dtmcli.barrier.xa_handle_phase2`; ``conn`` as for :func:`xa_local_transaction`)."""
    info = phase2_info(query, table)
    async with connection_from(conn) as dedicated:
        io = _open(dedicated, dialect)
        await arun(phase2_flow(info, io.dialect, table), io)


async def xa_preflight(conn: Any, *, dialect: Optional[str] = None) -> None:
    """Check that the server behind the asyncio connection ``conn`` can run XA branches
    (see :func:`dtmcli.barrier.xa_preflight`)."""
    io = _open(conn, dialect)
    await arun(preflight_flow(io.dialect), io)
