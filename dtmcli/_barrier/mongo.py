"""MongoDB barrier backend (**experimental**): :func:`~dtmcli._barrier.core.run_barrier` on a
session transaction (protocol.md §7).

Experimental: no MongoDB server is available where dtmcli is developed; the flow is tested with the
shared decision logic and an in-memory fake, and against a real replica set only when
``DTM_TEST_MONGO_URL`` is set.

Multi-document transactions need a replica set or a mongos; a standalone server is reported as
such. The insert-if-absent is an upsert with ``$setOnInsert`` on the unique key, so concurrent
calls cannot both "insert" the same marker.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, TypeVar

from .._consts import MSG_BRANCH_ID, OP_MSG
from ..errors import DtmError
from .core import (
    DEFAULT_TABLE,
    MSG_BARRIER_ID,
    REASON_ROLLBACK,
    BarrierConflict,
    BarrierDatabaseError,
    BarrierIdentity,
    Decision,
    run_barrier,
    settle_prepared,
    split_table,
)

__all__ = ["barrier_call", "create_schema", "insert_if_absent", "map_mongo_error", "query_prepared"]

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


def _collection(client: Any, table: str) -> Any:
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


def insert_if_absent(coll: Any, session: Any, key: dict[str, str], trans_type: str, reason: str) -> int:
    """Insert the barrier document unless its unique key exists; 1 when inserted, else 0."""
    result = coll.update_one(
        key, {"$setOnInsert": {"trans_type": trans_type, "reason": reason}}, upsert=True, session=session
    )
    return 1 if result.upserted_id is not None else 0


def _key(gid: str, branch_id: str, op: str, barrier_id: str) -> dict[str, str]:
    return dict(zip(_KEY_FIELDS, (gid, branch_id, op, barrier_id)))


class _MongoStore:
    """The MongoDB adapter of :func:`~dtmcli._barrier.core.run_barrier`: one session transaction."""

    def __init__(self, coll: Any, session: Any, barrier: BarrierIdentity) -> None:
        self.coll = coll
        self.tx = session
        self.where: dict[str, Any] = {"gid": barrier.gid, "branch_id": barrier.branch_id, "op": barrier.op}

    def begin(self) -> None:
        self.tx.start_transaction()

    def insert_if_absent(self, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str,
                         reason: str) -> int:
        return insert_if_absent(self.coll, self.tx, _key(gid, branch_id, op, barrier_id), trans_type, reason)

    def commit(self) -> None:
        self.tx.commit_transaction()

    def rollback(self, cause: BaseException) -> None:
        try:
            if self.tx.in_transaction:
                self.tx.abort_transaction()
        except Exception as exc:
            logger.warning("mongo barrier %s: abort after %s failed too: %s", self.where, type(cause).__name__, exc)

    def map_error(self, exc: BaseException, what: str) -> DtmError:
        return map_mongo_error(exc, "start transaction" if what == "begin" else what, self.where)

    def busi_error(self, exc: Exception) -> Optional[DtmError]:
        return None


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
    coll = _collection(client, table)
    session = client.start_session()
    try:
        return run_barrier(_MongoStore(coll, session, barrier), barrier, busi, on_decision)
    finally:
        session.end_session()


def query_prepared(client: Any, trans_type: str, gid: str, *, table: str = DEFAULT_TABLE) -> None:
    """The msg ``query_prepared`` check on MongoDB (**experimental**): return on success, DtmFailure on rollback."""
    coll = _collection(client, table)
    key = _key(gid, MSG_BRANCH_ID, OP_MSG, MSG_BARRIER_ID)
    where: dict[str, Any] = {"gid": gid, "branch_id": MSG_BRANCH_ID, "op": OP_MSG}
    try:
        insert_if_absent(coll, None, key, trans_type, REASON_ROLLBACK)
        doc = coll.find_one(key)
    except Exception as exc:
        raise map_mongo_error(exc, "query_prepared", where) from exc
    settle_prepared(doc.get("reason") if doc else None, gid)


def create_schema(client: Any, *, table: str = DEFAULT_TABLE) -> None:
    """Create the unique index on (gid, branch_id, op, barrier_id) if it does not exist (**experimental**)."""
    coll = _collection(client, table)
    coll.create_index([(field, 1) for field in _KEY_FIELDS], unique=True)
