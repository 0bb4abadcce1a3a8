"""MongoDB barrier backend (**experimental**): :func:`~dtmcli._barrier.core.barrier_flow` on a
session transaction (protocol.md §7).

``MongoStoreBase`` holds what the blocking store here and the asyncio store (pymongo's
``AsyncMongoClient``, ``dtmcli/asyncio/_barrier_nosql.py``) share: the key and upsert documents,
the insert count, the abort decision and the error mapping; the stores only perform the calls.

Experimental: no MongoDB server is available where dtmcli is developed; the flow is tested with the
shared decision logic and an in-memory fake, and against a real replica set only when
``DTM_TEST_MONGO_URL`` is set.

Multi-document transactions need a replica set or a mongos; a standalone server is reported as
such. The insert-if-absent is an upsert with ``$setOnInsert`` on the unique key, so concurrent
calls cannot both "insert" the same marker.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, TypeVar

from .. import _flow
from .._consts import MSG_BRANCH_ID, OP_MSG
from .._flow import Flow, StoreOp
from ..errors import DtmError, DtmInvalidInput
from .core import (
    DEFAULT_TABLE,
    BarrierConflict,
    BarrierDatabaseError,
    BarrierIdentity,
    Decision,
    prepared_flow,
    run_barrier,
    split_table,
)

__all__ = [
    "MongoStoreBase",
    "barrier_call",
    "check_client",
    "create_schema",
    "insert_if_absent",
    "map_mongo_error",
    "query_prepared",
]

logger = logging.getLogger("dtmcli")

R = TypeVar("R")

_KEY_FIELDS = ("gid", "branch_id", "op", "barrier_id")
# IllegalOperation (standalone server), WriteConflict, DuplicateKey, LockTimeout, NoSuchTransaction.
_NO_REPLICA_SET_CODES = frozenset({20})
_CONFLICT_CODES = frozenset({112, 11000, 24, 251})
NO_REPLICA_SET_HINT = (
    "MongoDB barrier calls need multi-document transactions, which need a replica set or a mongos "
    "(a standalone mongod cannot run them): start mongod with --replSet and rs.initiate()"
)


def check_client(client: Any, *, asyncio: bool) -> None:
    """Refuse, before any call, pymongo's ``AsyncMongoClient`` given to the blocking barrier, a
    ``MongoClient`` given to the asyncio one, or a motor client (its API differs: not supported)."""
    module = type(client).__module__
    if module.split(".")[0] == "motor":
        raise DtmInvalidInput(f"{module}.{type(client).__name__}: motor is not supported by the MongoDB barrier; "
                              "use pymongo's AsyncMongoClient (pymongo >= 4.9) with the asyncio barrier")
    if module.split(".")[0] != "pymongo":
        return
    is_async = module.startswith("pymongo.asynchronous")
    if is_async and not asyncio:
        raise DtmInvalidInput(f"{module}.{type(client).__name__} is an asyncio client: use the asyncio barrier "
                              "(dtmcli.asyncio.BranchBarrier) or a pymongo.MongoClient")
    if asyncio and not is_async:
        raise DtmInvalidInput(f"{module}.{type(client).__name__} is a blocking client: the asyncio barrier needs "
                              "pymongo's AsyncMongoClient")


def collection(client: Any, table: str) -> Any:
    database, name = split_table(table)
    return client[database or "dtm_barrier"][name]


def map_mongo_error(exc: BaseException, what: str, where: dict[str, Any]) -> DtmError:
    """The typed error for a pymongo exception (no replica set, write conflict, other)."""
    code = getattr(exc, "code", None)
    labels = getattr(exc, "_error_labels", None) or set()
    text = str(exc)
    if code in _NO_REPLICA_SET_CODES or "Transaction numbers are only allowed" in text:
        return BarrierDatabaseError(f"barrier {what}: {NO_REPLICA_SET_HINT} ({text})", **where)
    if code in _CONFLICT_CODES or "TransientTransactionError" in labels:
        return BarrierConflict(f"barrier {what}: write conflict, retry later: {text}", **where)
    return BarrierDatabaseError(f"barrier {what} failed: {type(exc).__name__}: {text}", **where)


def set_on_insert(trans_type: str, reason: str) -> dict[str, Any]:
    """The upsert document of a barrier marker: written only when its key is new."""
    return {"$setOnInsert": {"trans_type": trans_type, "reason": reason}}


def inserted(result: Any) -> int:
    """1 when an ``update_one(upsert=True)`` inserted the document, else 0."""
    return 1 if result.upserted_id is not None else 0


def insert_if_absent(coll: Any, session: Any, key: dict[str, str], trans_type: str, reason: str) -> int:
    """Insert the barrier document unless its unique key exists; 1 when inserted, else 0."""
    return inserted(coll.update_one(key, set_on_insert(trans_type, reason), upsert=True, session=session))


def barrier_key(gid: str, branch_id: str, op: str, barrier_id: str) -> dict[str, str]:
    """The unique key of one barrier document."""
    return dict(zip(_KEY_FIELDS, (gid, branch_id, op, barrier_id)))



class MongoStoreBase:
    """The MongoDB store of the barrier flows, minus the driving: one session transaction.

    ``session`` is ``None`` for the msg ``query_prepared`` check, which writes outside a transaction:
    then begin, commit and rollback do nothing.
    """

    def __init__(self, coll: Any, session: Any, where: Mapping[str, Any]) -> None:
        self.coll = coll
        self.tx = session
        self.where: dict[str, Any] = dict(where)

    def rollback_flow(self, cause: BaseException) -> Flow[None]:
        """Abort the session's transaction if one is open (on the session); a failing abort is logged."""
        try:
            if self.tx is not None and self.tx.in_transaction:
                yield StoreOp("abort_transaction")
        except Exception as exc:
            logger.warning("mongo barrier %s: abort after %s failed too: %s", self.where, type(cause).__name__, exc)

    def map_error(self, exc: BaseException, what: str) -> DtmError:
        return map_mongo_error(exc, "start transaction" if what == "begin" else what, self.where)

    def busi_error(self, exc: Exception) -> Optional[DtmError]:
        return None


class _MongoStore(MongoStoreBase):
    """The blocking MongoDB store of :func:`~dtmcli._barrier.core.run_barrier`."""

    def begin(self) -> None:
        if self.tx is not None:
            self.tx.start_transaction()

    def insert_if_absent(self, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str,
                         reason: str) -> int:
        return insert_if_absent(self.coll, self.tx, barrier_key(gid, branch_id, op, barrier_id), trans_type, reason)

    def read_reason(self, gid: str, branch_id: str, op: str, barrier_id: str) -> Optional[str]:
        doc = self.coll.find_one(barrier_key(gid, branch_id, op, barrier_id))
        return doc.get("reason") if doc else None

    def commit(self) -> None:
        if self.tx is not None:
            self.tx.commit_transaction()

    def rollback(self, cause: BaseException) -> None:
        if self.tx is not None:
            _flow.run(self.rollback_flow(cause), self.tx)


def barrier_where(barrier: BarrierIdentity) -> dict[str, Any]:
    """The error labels of a barrier call."""
    return {"gid": barrier.gid, "branch_id": barrier.branch_id, "op": barrier.op}


def barrier_call(
    client: Any,
    barrier: BarrierIdentity,
    busi: Callable[[Any], R],
    *,
    table: str = DEFAULT_TABLE,
    on_decision: Optional[Callable[[Decision], None]] = None,
) -> Optional[R]:
    """Run ``busi(session)`` under the barrier inside one MongoDB transaction. **Experimental.**

    Same results as the SQL call: ``busi``'s result, ``None`` when skipped (duplicate, suspended,
    null compensation), DtmDuplicated for a repeated msg; database problems raise
    BarrierDatabaseError or BarrierConflict (and a missing replica set says so).
    """
    check_client(client, asyncio=False)
    coll = collection(client, table)
    session = client.start_session()
    try:
        return run_barrier(_MongoStore(coll, session, barrier_where(barrier)), barrier, busi, on_decision)
    finally:
        session.end_session()


def query_prepared(client: Any, trans_type: str, gid: str, *, table: str = DEFAULT_TABLE) -> None:
    """The msg ``query_prepared`` check on MongoDB (**experimental**): return on success, DtmFailure on rollback."""
    check_client(client, asyncio=False)
    store = _MongoStore(collection(client, table), None, msg_where(gid))
    _flow.run(prepared_flow(store, trans_type, gid), store)


def msg_where(gid: str) -> dict[str, Any]:
    """The error labels of the msg ``query_prepared`` check of ``gid``."""
    return {"gid": gid, "branch_id": MSG_BRANCH_ID, "op": OP_MSG}


def create_schema(client: Any, *, table: str = DEFAULT_TABLE) -> None:
    """Create the unique index on (gid, branch_id, op, barrier_id) if it does not exist (**experimental**)."""
    coll = collection(client, table)
    coll.create_index([(field, 1) for field in _KEY_FIELDS], unique=True)
