"""The asyncio Redis and MongoDB barriers: the blocking barriers' flows, awaited on async clients.

Redis: the same Lua scripts, keys and decisions (:func:`dtmcli._barrier.redis.adjust_flow`,
:func:`~dtmcli._barrier.redis.prepared_flow`) run on a ``redis.asyncio`` client (EVALSHA, SCRIPT LOAD
after NOSCRIPT). MongoDB (**experimental**, like the blocking one): the barrier flow on a pymongo
``AsyncMongoClient`` session transaction, through :class:`dtmcli._barrier.mongo.MongoStoreBase`.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from .. import _flow
from .._barrier import redis as _redis
from .._barrier.core import DEFAULT_TABLE, BarrierIdentity, Decision, arun_barrier, prepared_flow
from .._barrier.mongo import (
    MongoStoreBase,
    barrier_key,
    barrier_where,
    check_client,
    collection,
    inserted,
    msg_where,
    set_on_insert,
)
from ._barrier_common import shielded

__all__ = ["check_adjust_amount", "mongo_barrier_call", "mongo_query_prepared", "redis_query_prepared"]


async def check_adjust_amount(
    client: Any,
    key: str,
    amount: int,
    *,
    trans_type: str,
    gid: str,
    branch_id: str,
    op: str,
    barrier_id: str,
    expire: int = _redis.DEFAULT_EXPIRE,
    layout: str = "go",
) -> Decision:
    """:func:`dtmcli._barrier.redis.check_adjust_amount` on a ``redis.asyncio`` client."""
    _redis.check_client(client, asyncio=True)
    flow = _redis.adjust_flow(key, amount, trans_type=trans_type, gid=gid, branch_id=branch_id, op=op,
                              barrier_id=barrier_id, expire=expire, layout=layout)
    return await _flow.arun(flow, client)


async def redis_query_prepared(
    client: Any, gid: str, *, expire: int = _redis.DEFAULT_EXPIRE, layout: str = "go", key: Optional[str] = None
) -> None:
    """:func:`dtmcli._barrier.redis.query_prepared` on a ``redis.asyncio`` client."""
    _redis.check_client(client, asyncio=True)
    await _flow.arun(_redis.prepared_flow(gid, expire=expire, layout=layout, key=key), client)


class _AsyncMongoStore(MongoStoreBase):
    """The asyncio MongoDB store (pymongo ``AsyncMongoClient``): the shared store, its calls awaited."""

    async def begin(self) -> None:
        if self.tx is not None:
            await shielded(self.tx.start_transaction())

    async def insert_if_absent(self, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str,
                               reason: str) -> int:
        result = await self.coll.update_one(barrier_key(gid, branch_id, op, barrier_id),
                                            set_on_insert(trans_type, reason), upsert=True, session=self.tx)
        return inserted(result)

    async def read_reason(self, gid: str, branch_id: str, op: str, barrier_id: str) -> Optional[str]:
        doc = await self.coll.find_one(barrier_key(gid, branch_id, op, barrier_id))
        return doc.get("reason") if doc else None

    async def commit(self) -> None:
        if self.tx is not None:
            await self.tx.commit_transaction()

    async def rollback(self, cause: BaseException) -> None:
        if self.tx is not None:
            await shielded(_flow.arun(self.rollback_flow(cause), self.tx))


async def mongo_barrier_call(
    client: Any,
    barrier: BarrierIdentity,
    busi: Callable[[Any], Any],
    *,
    table: str = DEFAULT_TABLE,
    on_decision: Optional[Callable[[Decision], None]] = None,
) -> Any:
    """Await ``busi(session)`` under the barrier in one MongoDB transaction. **Experimental.**"""
    check_client(client, asyncio=True)
    coll = collection(client, table)
    session = client.start_session()
    if inspect.isawaitable(session):  # not pymongo's AsyncMongoClient today; cheap to honour
        session = await session
    try:
        return await arun_barrier(_AsyncMongoStore(coll, session, barrier_where(barrier)), barrier, busi,
                                  on_decision)
    finally:
        await shielded(session.end_session())


async def mongo_query_prepared(client: Any, trans_type: str, gid: str, *, table: str = DEFAULT_TABLE) -> None:
    """The msg ``query_prepared`` check on an ``AsyncMongoClient`` (**experimental**); DtmFailure when rolled back."""
    check_client(client, asyncio=True)
    store = _AsyncMongoStore(collection(client, table), None, msg_where(gid))
    await _flow.arun(prepared_flow(store, trans_type, gid), store)
