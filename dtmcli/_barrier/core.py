"""The storage-independent part of the sub-transaction barrier (protocol.md §7).

The decision of a barrier call depends only on the op and on how many rows (or documents, or keys)
the two insert-if-absent steps created; :func:`decide` is that decision. :func:`barrier_flow` is
the whole call (begin, origin-op insert, current-op insert, decide, run or skip, commit) as a
sans-I/O flow (:mod:`dtmcli._flow`) over a store's effects; :func:`run_barrier` drives it on a
blocking :class:`BarrierStore` (SQL in ``sql.py``, MongoDB in ``mongo.py``) and
:func:`arun_barrier` on an asyncio one (``dtmcli/asyncio/_barrier_*.py``). :func:`prepared_flow`
is the msg ``query_prepared`` check, ending in :func:`settle_prepared`. The Redis backend runs the
same rules inside one Lua script.
"""

from __future__ import annotations

import enum
import logging
import re
from importlib import resources
from typing import Any, Callable, Mapping, NoReturn, Optional, Protocol, TypeVar

from .. import _flow, _otel
from .._consts import MSG_BRANCH_ID, OP_ACTION, OP_CANCEL, OP_COMPENSATE, OP_MSG, OP_ROLLBACK, OP_TRY
from .._flow import Call, Flow, StoreOp, discard_awaitable
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
    "StoreErrors",
    "arun_barrier",
    "barrier_flow",
    "decide",
    "load_resource",
    "prepared_flow",
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


class StoreErrors(Protocol):
    """The pure (no I/O) part of a store a flow reads directly: the business handle and error mapping."""

    @property
    def tx(self) -> Any:
        """What the business function receives (the connection, Session or Mongo session)."""

    def map_error(self, exc: BaseException, what: str) -> DtmError:
        """The typed error for a store failure during ``what`` (begin, insert, commit, query_prepared)."""

    def busi_error(self, exc: Exception) -> Optional[DtmError]:
        """A typed error replacing a store failure raised by the business function, or ``None`` to re-raise it."""


class BarrierStore(StoreErrors, Protocol):
    """One local transaction of a barrier backend, blocking form: the I/O the flows ask for by name.

    The asyncio stores have the same methods as coroutines (:func:`arun_barrier` awaits them).
    Optional: ``combined_insert`` (bool) with ``insert_pair(trans_type, gid, branch_id, origin_op,
    op, barrier_id, reason) -> (origin_affected, current_affected)``, and ``recheck_row`` with
    ``require_row(gid, branch_id, op, barrier_id)`` (see :func:`barrier_flow`).
    """

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


def _undo(store: StoreErrors, exc: BaseException, what: str) -> Flow[NoReturn]:
    """Roll back after ``exc``, then raise: the store's typed error for an Exception, else ``exc`` itself.

    A cancellation (asyncio.CancelledError) or KeyboardInterrupt is re-raised as it is, after the
    rollback: the local transaction never outlives the call that opened it.
    """
    yield StoreOp("rollback", exc)
    if isinstance(exc, Exception):
        raise store.map_error(exc, what) from exc
    raise exc


def _rolled_back_on_error(store: StoreErrors, steps: Flow[R], what: str) -> Flow[R]:
    """``steps`` inside the open local transaction, rolled back if they fail: a DtmError (the store's own
    typed refusal) is re-raised as it is, anything else as :func:`_undo` raises it."""
    try:
        return (yield from steps)
    except GeneratorExit:
        raise
    except DtmError as exc:
        yield StoreOp("rollback", exc)
        raise
    except BaseException as exc:
        return (yield from _undo(store, exc, what))


def _step(op: StoreOp) -> Flow[Any]:
    """One store effect as a flow."""
    return (yield op)


def barrier_flow(
    store: StoreErrors,
    barrier: BarrierIdentity,
    busi: Callable[[Any], Any],
    on_decision: Optional[Callable[[Decision], None]] = None,
) -> Flow[Any]:
    """The barrier algorithm (protocol.md §7) as a flow over a store's effects.

    Yields ``StoreOp`` begin, insert_if_absent (origin op, then current op), commit and rollback,
    and ``Call(busi, store.tx)`` for the business function. A store whose ``combined_insert`` is true
    gets one ``insert_pair`` (both rows in one statement, answering ``(origin_affected,
    current_affected)``) instead of the two inserts of an op with an origin op. A store whose
    ``recheck_row`` is true (MySQL) is also asked to ``require_row`` (the current op's row, still
    there after the business function, else a typed error) before the commit; it may defer that
    check into the commit itself (MariaDB), which then raises the typed error instead of committing.
    Returns ``busi``'s result, or ``None`` when the call was a duplicate, suspended or a null
    compensation (committed without running ``busi``). Raises DtmDuplicated for a repeated msg, the
    store's typed errors for its failures, and whatever ``busi`` raised otherwise (after rolling the
    markers back with it). An error that is not an Exception (a cancellation) at any step after
    begin rolls back and propagates unchanged.
    """
    bid = barrier.next_barrier_id()
    origin = origin_op(barrier.op)
    ident = (barrier.trans_type, barrier.gid, barrier.branch_id)
    try:
        yield StoreOp("begin")
    except DtmError:
        raise
    except GeneratorExit:
        raise
    except Exception as exc:
        raise store.map_error(exc, "begin") from exc
    except BaseException as exc:  # cancelled while opening: undo whatever was opened
        yield from _undo(store, exc, "begin")
    try:
        if origin and getattr(store, "combined_insert", False):
            # One statement inserting both rows and telling which were new (PostgreSQL, MariaDB >= 10.5).
            origin_affected, current_affected = yield StoreOp(
                "insert_pair", *ident, origin, barrier.op, bid, barrier.op)
        else:
            origin_affected = (yield StoreOp("insert_if_absent", *ident, origin, bid, barrier.op)) if origin else 0
            current_affected = yield StoreOp("insert_if_absent", *ident, barrier.op, bid, barrier.op)
    except GeneratorExit:
        raise
    except BaseException as exc:
        yield from _undo(store, exc, "insert")
    decision = decide(barrier.op, origin_affected, current_affected)
    logger.debug(
        "barrier %s/%s/%s/%s: origin_affected=%s current_affected=%s -> %s",
        barrier.gid, barrier.branch_id, barrier.op, bid, origin_affected, current_affected, decision.value,
    )
    _otel.event("dtm.barrier", decision=decision.value, barrier_id=bid)
    if on_decision is not None:
        on_decision(decision)
    if decision is Decision.MSG_DUPLICATED:
        duplicated = DtmDuplicated(
            "msg local transaction already done or rolled back", gid=barrier.gid, branch_id=barrier.branch_id,
            op=barrier.op,
        )
        yield StoreOp("rollback", duplicated)
        raise duplicated
    result: Any = None
    if decision is Decision.RUN:
        try:
            result = yield Call(busi, store.tx)
        except GeneratorExit:
            raise
        except BaseException as exc:
            yield StoreOp("rollback", exc)
            mapped = store.busi_error(exc) if isinstance(exc, Exception) and not isinstance(exc, DtmError) else None
            if mapped is not None:
                raise mapped from exc
            raise
        if getattr(store, "recheck_row", False):
            # The database may have rolled the whole transaction back under the business function
            # (MySQL: a deadlock the business code caught): the row inserted above is then gone.
            yield from _rolled_back_on_error(
                store, _step(StoreOp("require_row", barrier.gid, barrier.branch_id, barrier.op, bid)), "commit"
            )
    # A DtmError here is the store refusing to commit (an aborted or rolled-back transaction).
    yield from _rolled_back_on_error(store, _step(StoreOp("commit")), "commit")
    return result


def run_barrier(
    store: BarrierStore,
    barrier: BarrierIdentity,
    busi: Callable[[Any], R],
    on_decision: Optional[Callable[[Decision], None]] = None,
) -> Optional[R]:
    """Run :func:`barrier_flow` on a blocking ``store``; ``busi`` must not be a coroutine function.

    Returns ``busi``'s result, or ``None`` when the call was a duplicate, suspended or a null
    compensation. An awaitable returned by ``busi`` is refused (DtmInvalidInput, after rolling back):
    it would never run, yet the barrier would commit as if it had.
    """

    def checked(tx: Any) -> R:
        value = busi(tx)
        if discard_awaitable(value):
            raise DtmInvalidInput(
                "the business function returned an awaitable: the blocking barrier cannot await it; "
                "use dtmcli.asyncio.BranchBarrier for async def business functions"
            )
        return value

    return _flow.run(barrier_flow(store, barrier, checked, on_decision), store)  # type: ignore[no-any-return]


async def arun_barrier(
    store: Any,
    barrier: BarrierIdentity,
    busi: Callable[[Any], Any],
    on_decision: Optional[Callable[[Decision], None]] = None,
) -> Any:
    """Run :func:`barrier_flow` on an asyncio ``store`` (its methods are coroutines); ``busi`` may be async."""
    return await _flow.arun(barrier_flow(store, barrier, busi, on_decision), store)


# --- the msg query_prepared check -------------------------------------------------------------------


def prepared_flow(store: StoreErrors, trans_type: str, gid: str) -> Flow[None]:
    """The msg ``query_prepared`` check (protocol.md §7) as a flow; returns on success, raises DtmFailure on rollback.

    Yields ``StoreOp`` begin, insert_if_absent of the ``rollback`` marker for (gid, 00, msg, 01)
    (a no-op when the local transaction already inserted its row), ``read_reason`` of that key,
    commit; then :func:`settle_prepared` decides from the reason read.
    """
    try:
        yield StoreOp("begin")
    except (DtmError, GeneratorExit):
        raise
    except BaseException as exc:
        if isinstance(exc, Exception):
            raise store.map_error(exc, "query_prepared") from exc
        yield from _undo(store, exc, "query_prepared")
    def mark_and_read() -> Flow[Optional[str]]:
        yield StoreOp("insert_if_absent", trans_type, gid, MSG_BRANCH_ID, OP_MSG, MSG_BARRIER_ID, REASON_ROLLBACK)
        reason: Optional[str] = yield StoreOp("read_reason", gid, MSG_BRANCH_ID, OP_MSG, MSG_BARRIER_ID)
        yield StoreOp("commit")
        return reason

    settle_prepared((yield from _rolled_back_on_error(store, mark_and_read(), "query_prepared")), gid)


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
