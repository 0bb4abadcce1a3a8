"""The storage-independent part of the sub-transaction barrier (protocol.md §7).

The decision of a barrier call depends only on the op and on how many rows (or documents, or keys)
the two insert-if-absent steps created; :func:`decide` is that decision. :func:`run_barrier` is
the whole flow (begin, origin-op insert, current-op insert, decide, run or skip, commit) over a
:class:`BarrierStore`, the thin per-store adapter (SQL in ``sql.py``, MongoDB in ``mongo.py``);
:func:`settle_prepared` is the shared end of the msg ``query_prepared`` check. The Redis backend
runs the same rules inside one Lua script.
"""

from __future__ import annotations

import enum
import logging
import re
from importlib import resources
from typing import Any, Callable, Mapping, Optional, Protocol, TypeVar

from .._consts import MSG_BRANCH_ID, OP_ACTION, OP_CANCEL, OP_COMPENSATE, OP_MSG, OP_ROLLBACK, OP_TRY
from ..errors import BarrierConflict, BarrierDatabaseError, DtmDuplicated, DtmError, DtmFailure, DtmInvalidInput

__all__ = [
    "BarrierConflict",
    "BarrierDatabaseError",
    "BarrierIdentity",
    "BarrierStore",
    "DEFAULT_TABLE",
    "Decision",
    "MSG_BARRIER_ID",
    "ORIGIN_OP",
    "REASON_ROLLBACK",
    "decide",
    "load_resource",
    "run_barrier",
    "settle_prepared",
    "split_table",
    "validate_table",
]

logger = logging.getLogger("dtmcli")

R = TypeVar("R")

# The op a compensating op undoes: its row is inserted first to detect null compensation.
ORIGIN_OP: Mapping[str, str] = {OP_CANCEL: OP_TRY, OP_COMPENSATE: OP_ACTION, OP_ROLLBACK: OP_ACTION}

DEFAULT_TABLE = "dtm_barrier.barrier"
MSG_BARRIER_ID = "01"
REASON_ROLLBACK = "rollback"

# Schema (database) names up to 63 characters; table names up to 48, so that the names derived
# from them in the DDL (uniq_<table>, <table>_create_time, <table>_seq) stay within the 63-character
# limit of PostgreSQL and MySQL identifiers.
_SCHEMA = r"[A-Za-z_][A-Za-z0-9_]{0,62}"
_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,47}"
_TABLE_RE = re.compile(rf"(?:{_SCHEMA}\.)?{_NAME}")


class Decision(enum.Enum):
    """What a barrier call does after its insert-if-absent steps."""

    RUN = "run"
    """First delivery: run the business function in the same transaction."""
    NULL_COMPENSATION = "null_compensation"
    """A compensation whose forward op never ran: commit the marker, skip the business function."""
    DUPLICATE = "duplicate"
    """A repeated or suspended (dangling) call: commit, skip the business function."""
    MSG_DUPLICATED = "msg_duplicated"
    """The msg local transaction already committed or was rolled back: roll back, raise DtmDuplicated."""

    @property
    def commits(self) -> bool:
        """Whether the local transaction commits when nothing else goes wrong."""
        return self is not Decision.MSG_DUPLICATED


def decide(op: str, origin_affected: int, current_affected: int) -> Decision:
    """The barrier decision from the op and the rows created by the origin-op and current-op inserts.

    ``origin_affected`` is 0 when the op has no origin op (nothing was inserted).
    """
    if op == OP_MSG and current_affected == 0:
        return Decision.MSG_DUPLICATED
    if op in ORIGIN_OP and origin_affected > 0:
        return Decision.NULL_COMPENSATION
    if current_affected == 0:
        return Decision.DUPLICATE
    return Decision.RUN


def validate_table(table: str) -> str:
    """Return ``table`` if it is ``name`` or ``schema.name`` made of plain identifiers."""
    if not isinstance(table, str) or not _TABLE_RE.fullmatch(table):
        raise DtmInvalidInput(
            f"barrier table name {table!r} must be an identifier (at most 48 characters) or schema.identifier"
        )
    return table


def split_table(table: str) -> tuple[Optional[str], str]:
    """``(schema, name)`` of a validated table name; schema is ``None`` when unqualified."""
    validate_table(table)
    if "." in table:
        schema, name = table.split(".", 1)
        return schema, name
    return None, table


def load_resource(name: str) -> str:
    """The text of a file shipped in ``dtmcli/sql/``."""
    return resources.files("dtmcli").joinpath("sql").joinpath(name).read_text(encoding="utf-8")


def origin_op(op: str) -> str:
    """The origin op of ``op``, or ``""`` when it has none."""
    return ORIGIN_OP.get(op, "")


# --- the one barrier flow ----------------------------------------------------------------------


class BarrierIdentity(Protocol):
    """What a barrier call needs from a barrier (``BranchBarrier`` provides it)."""

    trans_type: str
    gid: str
    branch_id: str
    op: str

    def next_barrier_id(self) -> str: ...


class BarrierStore(Protocol):
    """One local transaction of a barrier backend: the only part that differs per store."""

    @property
    def tx(self) -> Any:
        """What the business function receives (the connection, Session or Mongo session)."""

    def begin(self) -> None: ...

    def insert_if_absent(self, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str,
                         reason: str) -> int:
        """Insert the marker unless its key (gid, branch_id, op, barrier_id) exists; 1 if inserted, else 0."""

    def commit(self) -> None: ...

    def rollback(self, cause: BaseException) -> None:
        """Roll back after ``cause``; never raises (a failing rollback is logged).

        Also called after a failed :meth:`commit`: it must then undo nothing beyond this call's own
        transaction (a commit that already ended it leaves nothing to roll back).
        """

    def map_error(self, exc: BaseException, what: str) -> DtmError:
        """The typed error for a store failure during ``what`` (begin, insert, commit)."""

    def busi_error(self, exc: Exception) -> Optional[DtmError]:
        """A typed error replacing a store failure raised by the business function, or ``None`` to re-raise it."""


def run_barrier(
    store: BarrierStore,
    barrier: BarrierIdentity,
    busi: Callable[[Any], R],
    on_decision: Optional[Callable[[Decision], None]] = None,
) -> Optional[R]:
    """The barrier algorithm on ``store`` (protocol.md §7).

    Returns ``busi``'s result, or ``None`` when the call was a duplicate, suspended or a null
    compensation (committed without running ``busi``). Raises DtmDuplicated for a repeated msg,
    the store's typed errors for its failures, and whatever ``busi`` raised otherwise (after
    rolling the markers back with it).
    """
    bid = barrier.next_barrier_id()
    origin = origin_op(barrier.op)
    ident = (barrier.trans_type, barrier.gid, barrier.branch_id)
    try:
        store.begin()
    except DtmError:
        raise
    except Exception as exc:
        raise store.map_error(exc, "begin") from exc
    try:
        origin_affected = store.insert_if_absent(*ident, origin, bid, barrier.op) if origin else 0
        current_affected = store.insert_if_absent(*ident, barrier.op, bid, barrier.op)
    except Exception as exc:
        store.rollback(exc)
        raise store.map_error(exc, "insert") from exc
    decision = decide(barrier.op, origin_affected, current_affected)
    logger.debug(
        "barrier %s/%s/%s/%s: origin_affected=%s current_affected=%s -> %s",
        barrier.gid, barrier.branch_id, barrier.op, bid, origin_affected, current_affected, decision.value,
    )
    if on_decision is not None:
        on_decision(decision)
    if decision is Decision.MSG_DUPLICATED:
        duplicated = DtmDuplicated(
            "msg local transaction already done or rolled back", gid=barrier.gid, branch_id=barrier.branch_id,
            op=barrier.op,
        )
        store.rollback(duplicated)
        raise duplicated
    result: Optional[R] = None
    if decision is Decision.RUN:
        try:
            result = busi(store.tx)
        except BaseException as exc:
            store.rollback(exc)
            mapped = store.busi_error(exc) if isinstance(exc, Exception) and not isinstance(exc, DtmError) else None
            if mapped is not None:
                raise mapped from exc
            raise
    try:
        store.commit()
    except Exception as exc:
        store.rollback(exc)
        raise store.map_error(exc, "commit") from exc
    return result


def settle_prepared(reason: Optional[str], gid: str) -> None:
    """The msg ``query_prepared`` answer from the reason stored for (gid, 00, msg, 01).

    ``rollback`` (the marker query_prepared inserted first) raises DtmFailure; any other reason means
    the local transaction committed; no row at all is a database problem.
    """
    where = {"gid": gid, "branch_id": MSG_BRANCH_ID, "op": OP_MSG}
    if reason == REASON_ROLLBACK:
        raise DtmFailure("msg local transaction was rolled back", **where)
    if reason is None:
        raise BarrierDatabaseError("query_prepared: barrier row missing after insert", **where)
