"""MongoDB barrier backend: the SQL algorithm inside a session transaction (protocol.md §7).

Multi-document transactions need a replica set or a mongos; a standalone server is reported as
such. The insert-if-absent is an upsert with ``$setOnInsert`` on the unique key, so concurrent
calls cannot both "insert" the same marker.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, TypeVar

from .._consts import MSG_BRANCH_ID, OP_MSG
from ..errors import DtmDuplicated, DtmError, DtmFailure
from .core import (
    DEFAULT_TABLE,
    MSG_BARRIER_ID,
    REASON_ROLLBACK,
    BarrierConflict,
    BarrierDatabaseError,
    Decision,
    decide,
    origin_op,
    validate_table,
)
from .sql import SqlBarrierIdentity

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
    validate_table(table)
    database, name = table.split(".", 1) if "." in table else ("dtm_barrier", table)
    return client[database][name]


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


def _abort(session: Any, cause: BaseException, where: dict[str, Any]) -> None:
    try:
        if session.in_transaction:
            session.abort_transaction()
    except Exception as exc:
        logger.warning("mongo barrier %s: abort after %s failed too: %s", where, type(cause).__name__, exc)


def barrier_call(
    client: Any,
    barrier: SqlBarrierIdentity,
    busi: Callable[[Any], R],
    *,
    table: str = DEFAULT_TABLE,
    on_decision: Optional[Callable[[Decision], None]] = None,
) -> Optional[R]:
    """Run ``busi(session)`` under the barrier inside one MongoDB transaction.

    Same results as the SQL call: ``busi``'s result, ``None`` when skipped (duplicate, suspended,
    null compensation), DtmDuplicated for a repeated msg; database problems raise
    BarrierDatabaseError or BarrierConflict (and a missing replica set says so).
    """
    coll = _collection(client, table)
    bid = barrier.next_barrier_id()
    origin = origin_op(barrier.op)
    where: dict[str, Any] = {"gid": barrier.gid, "branch_id": barrier.branch_id, "op": barrier.op}
    session = client.start_session()
    try:
        try:
            session.start_transaction()
        except Exception as exc:
            raise map_mongo_error(exc, "start transaction", where) from exc
        try:
            origin_affected = (
                insert_if_absent(coll, session, _key(barrier.gid, barrier.branch_id, origin, bid),
                                 barrier.trans_type, barrier.op)
                if origin else 0
            )
            current_affected = insert_if_absent(
                coll, session, _key(barrier.gid, barrier.branch_id, barrier.op, bid), barrier.trans_type, barrier.op
            )
        except Exception as exc:
            _abort(session, exc, where)
            raise map_mongo_error(exc, "insert", where) from exc
        decision = decide(barrier.op, origin_affected, current_affected)
        logger.debug("mongo barrier %s/%s: -> %s", where, bid, decision.value)
        if on_decision is not None:
            on_decision(decision)
        if decision is Decision.MSG_DUPLICATED:
            _abort(session, DtmDuplicated("duplicated"), where)
            raise DtmDuplicated("msg local transaction already done or rolled back", **where)
        result: Optional[R] = None
        if decision is Decision.RUN:
            try:
                result = busi(session)
            except BaseException as exc:
                _abort(session, exc, where)
                raise
        try:
            session.commit_transaction()
        except Exception as exc:
            _abort(session, exc, where)
            raise map_mongo_error(exc, "commit", where) from exc
        return result
    finally:
        session.end_session()


def query_prepared(client: Any, trans_type: str, gid: str, *, table: str = DEFAULT_TABLE) -> None:
    """The msg ``query_prepared`` check on MongoDB: return on success, raise DtmFailure on rollback."""
    coll = _collection(client, table)
    key = _key(gid, MSG_BRANCH_ID, OP_MSG, MSG_BARRIER_ID)
    where: dict[str, Any] = {"gid": gid, "branch_id": MSG_BRANCH_ID, "op": OP_MSG}
    try:
        insert_if_absent(coll, None, key, trans_type, REASON_ROLLBACK)
        doc = coll.find_one(key)
    except Exception as exc:
        raise map_mongo_error(exc, "query_prepared", where) from exc
    reason = doc.get("reason") if doc else None
    if reason == REASON_ROLLBACK:
        raise DtmFailure("msg local transaction was rolled back", **where)
    if reason is None:
        raise BarrierDatabaseError("query_prepared: barrier document missing after insert", **where)


def create_schema(client: Any, *, table: str = DEFAULT_TABLE) -> None:
    """Create the unique index on (gid, branch_id, op, barrier_id) if it does not exist."""
    coll = _collection(client, table)
    coll.create_index([(field, 1) for field in _KEY_FIELDS], unique=True)
