"""Sub-transaction barrier for asyncio: the :mod:`dtmcli.barrier` API with every database call awaited.

>>> bb = BranchBarrier.from_query(request.query_params)
>>> await bb.call(conn, busi)  # async def busi(conn): ...

The same table, rows and decisions as the blocking barrier: both run the one barrier flow
(:mod:`dtmcli._barrier.core`) and share the SQL statements, Lua scripts and error mapping; only the
I/O differs. SQL on asyncpg, psycopg 3 ``AsyncConnection``, aiomysql and SQLAlchemy
``AsyncConnection``/``AsyncSession``/``AsyncEngine``; Redis on ``redis.asyncio``; MongoDB on pymongo's
``AsyncMongoClient`` (**experimental**). A connection serves one barrier call at a time: a call from
another task on a connection in use is refused (DtmInvalidInput), so concurrent calls take their
connections from a pool, engine or factory. A cancelled barrier call rolls its local transaction
back and re-raises the cancellation; a SQL rollback that the database does not finish within
``CANCEL_GRACE`` seconds (``dtmcli.asyncio._barrier_common``, 5) closes the connection instead.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, TypeVar

from .._barrier.branch_barrier import BarrierBase, msg_barrier
from .._barrier.core import DEFAULT_TABLE, ORIGIN_OP, BarrierConflict, BarrierDatabaseError, Decision
from .._barrier.redis import DEFAULT_EXPIRE as REDIS_DEFAULT_EXPIRE
from . import _barrier_nosql as _nosql
from . import _barrier_sql as _sql

__all__ = [
    "BarrierConflict",
    "BarrierDatabaseError",
    "BranchBarrier",
    "DEFAULT_TABLE",
    "Decision",
    "ORIGIN_OP",
    "REDIS_DEFAULT_EXPIRE",
    "query_prepared",
    "query_prepared_mongo",
    "query_prepared_redis",
]

R = TypeVar("R")

Busi = Callable[[Any], Awaitable[R]]
"""An ``async def`` business function of the barrier's transaction handle (a plain function works too)."""


class BranchBarrier(BarrierBase):
    """The barrier identity of one branch call and its awaited calls on each store.

    Built like :class:`dtmcli.barrier.BranchBarrier` (``from_query``, ``from_info``, ``for_msg``);
    ``table`` defaults to ``dtmcli.barrier.BranchBarrier.default_table`` unless :attr:`default_table`
    is set on this class.
    """

    # -- SQL ---------------------------------------------------------------------------------

    async def call(
        self, conn: Any, busi: Busi[R], *, dialect: Optional[str] = None, join_transaction: bool = True
    ) -> Optional[R]:
        """Await ``busi(conn)`` under the barrier in one local transaction on ``conn``.

        ``conn`` is an asyncpg connection, a psycopg ``AsyncConnection`` or an aiomysql connection
        (the barrier begins, commits or rolls back, and refuses a connection with an open
        transaction), or a SQLAlchemy ``AsyncConnection``/``AsyncSession`` (the barrier joins an open
        transaction through a savepoint and the caller commits; otherwise it owns the transaction;
        ``join_transaction=False`` refuses an open one instead). A connection serves one call at a
        time: a call on it from another task (``asyncio.gather``, concurrent requests) is refused
        with DtmInvalidInput before it touches the connection, so give concurrent calls a pool,
        engine or factory (:meth:`call_with_db`). Returns ``busi``'s result, or ``None`` when the
        call was a duplicate, suspended or a null compensation. Raises DtmDuplicated for a repeated
        msg, BarrierConflict (retryable, 425) on lock waits and deadlocks, BarrierDatabaseError on
        database failures (also when MySQL rolled the transaction back under ``busi``, which caught
        the deadlock), or what ``busi`` raised.
        """
        result: Optional[R] = await _sql.barrier_call(conn, self, busi, table=self.table, dialect=dialect,
                                                      on_decision=self._record, join=join_transaction)
        return result

    async def call_with_db(
        self, db: Any, busi: Busi[R], *, dialect: Optional[str] = None, join_transaction: bool = True
    ) -> Optional[R]:
        """Like :meth:`call`, taking the connection from ``db``: a SQLAlchemy ``AsyncEngine``, an
        asyncpg/aiomysql pool, a zero-argument factory (see
        :func:`dtmcli.asyncio._barrier_sql.connection_from`), or a connection or session (used as is:
        one call at a time)."""
        async with _sql.connection_from(db) as conn:
            return await self.call(conn, busi, dialect=dialect, join_transaction=join_transaction)

    async def query_prepared(self, db: Any, *, dialect: Optional[str] = None) -> None:
        """The msg ``query_prepared`` check for this barrier's gid on ``db`` (any :meth:`call_with_db`
        source); raises DtmFailure when rolled back."""
        await _sql.query_prepared(db, self.trans_type, self.gid, table=self.table, dialect=dialect)

    # -- Redis -------------------------------------------------------------------------------

    async def redis_check_adjust_amount(
        self, client: Any, key: str, amount: int, expire: int = REDIS_DEFAULT_EXPIRE, *, layout: str = "go"
    ) -> Decision:
        """Adjust the integer at ``key`` by ``amount`` under the barrier on a ``redis.asyncio`` client
        (see :meth:`dtmcli.barrier.BranchBarrier.redis_check_adjust_amount`: same script, keys, results)."""
        decision = await _nosql.check_adjust_amount(
            client, key, amount, trans_type=self.trans_type, gid=self.gid, branch_id=self.branch_id, op=self.op,
            barrier_id=self.next_barrier_id(), expire=expire, layout=layout,
        )
        self.last_decision = decision
        return decision

    async def redis_query_prepared(
        self, client: Any, expire: int = REDIS_DEFAULT_EXPIRE, *, layout: str = "go", key: Optional[str] = None
    ) -> None:
        """The msg ``query_prepared`` check on a ``redis.asyncio`` client; raises DtmFailure when rolled back."""
        await _nosql.redis_query_prepared(client, self.gid, expire=expire, layout=layout, key=key)

    # -- MongoDB -----------------------------------------------------------------------------

    async def mongo_call(self, client: Any, busi: Busi[R]) -> Optional[R]:
        """Await ``busi(session)`` in one MongoDB transaction on an ``AsyncMongoClient``. **Experimental.**"""
        result: Optional[R] = await _nosql.mongo_barrier_call(client, self, busi, table=self.table,
                                                              on_decision=self._record)
        return result

    async def mongo_query_prepared(self, client: Any) -> None:
        """The msg ``query_prepared`` check on an ``AsyncMongoClient`` (**experimental**); DtmFailure on rollback."""
        await _nosql.mongo_query_prepared(client, self.trans_type, self.gid, table=self.table)


async def query_prepared(query: Any, conn: Any, *, table: Optional[str] = None, dialect: Optional[str] = None) -> None:
    """Answer DTM's msg ``query_prepared`` from the SQL barrier table, awaited.

    ``query`` is the request's query mapping, a BranchBarrier or a gid; ``conn`` any
    :meth:`BranchBarrier.call_with_db` source. Returns when the local transaction committed; raises
    DtmFailure (answer 409) when it was rolled back or never ran.
    """
    await msg_barrier(BranchBarrier, query, table).query_prepared(conn, dialect=dialect)


async def query_prepared_redis(
    query: Any, client: Any, expire: int = REDIS_DEFAULT_EXPIRE, *, layout: str = "go", key: Optional[str] = None
) -> None:
    """:func:`query_prepared` for the Redis barrier (a ``redis.asyncio`` client)."""
    await msg_barrier(BranchBarrier, query, None).redis_query_prepared(client, expire, layout=layout, key=key)


async def query_prepared_mongo(query: Any, client: Any, *, table: Optional[str] = None) -> None:
    """:func:`query_prepared` for the MongoDB barrier (an ``AsyncMongoClient``; **experimental**)."""
    await msg_barrier(BranchBarrier, query, table).mongo_query_prepared(client)
