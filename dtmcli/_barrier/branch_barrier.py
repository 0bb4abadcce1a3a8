"""``BranchBarrier``: the barrier identity of one branch call and its calls on each store.

The public face is :mod:`dtmcli.barrier`, which re-exports it. :class:`BarrierBase` is the identity
part (validation, constructors, barrier ids) that the asyncio ``BranchBarrier``
(:mod:`dtmcli.asyncio.barrier`) shares. This module imports only the storage modules, never
:mod:`dtmcli.branch` at run time, so the import graph stays acyclic.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, TypeVar

from .._consts import MAX_OP_LEN, MSG, MSG_BRANCH_ID, OP_MSG
from .._validate import check_branch_id, check_received_gid
from ..errors import DtmInvalidInput
from . import mongo as _mongo
from . import redis as _redis
from . import sql as _sql
from .core import DEFAULT_TABLE, ORIGIN_OP, Decision, validate_table
from .redis import DEFAULT_EXPIRE as REDIS_DEFAULT_EXPIRE

if TYPE_CHECKING:
    from ..branch import BranchInfo

__all__ = ["BarrierBase", "BranchBarrier", "msg_barrier"]

R = TypeVar("R")
B = TypeVar("B", bound="BarrierBase")

_WORD_RE = re.compile(rf"[A-Za-z_][A-Za-z0-9_]{{0,{MAX_OP_LEN - 1}}}")


class BarrierBase:
    """The barrier identity of one branch call; every field must be non-empty.

    ``table`` is the SQL table (``schema.name``) or Mongo ``database.collection`` the barrier
    writes to; it defaults to :attr:`default_table`.
    """

    default_table: Optional[str] = None
    """Class-wide default barrier table; ``None`` follows ``dtmcli.barrier.BranchBarrier.default_table``."""

    def __init__(
        self, trans_type: str, gid: str, branch_id: str, op: str, *, table: Optional[str] = None
    ) -> None:
        check_received_gid(gid)
        check_branch_id(branch_id, gid=gid)
        for name, value in (("trans_type", trans_type), ("op", op)):
            if not isinstance(value, str) or not _WORD_RE.fullmatch(value):
                raise DtmInvalidInput(f"barrier {name} must be a short word, not {value!r}", gid=gid)
        self.trans_type = trans_type
        self.gid = gid
        self.branch_id = branch_id
        self.op = op
        default = self.default_table if self.default_table is not None else BranchBarrier.default_table
        self.table = validate_table(table if table is not None else default)
        self.barrier_id = 0
        self.last_decision: Optional[Decision] = None
        self._lock = threading.Lock()

    @classmethod
    def from_query(cls: type[B], query: Mapping[str, Any], *, table: Optional[str] = None) -> B:
        """Build from a callback's query parameters (``trans_type``, ``gid``, ``branch_id``, ``op``)."""
        values = {k: query.get(k) for k in ("trans_type", "gid", "branch_id", "op")}
        missing = [k for k, v in values.items() if not v]
        if missing:
            raise DtmInvalidInput(f"barrier needs {', '.join(missing)} in the request query")
        return cls(
            str(values["trans_type"]), str(values["gid"]), str(values["branch_id"]), str(values["op"]), table=table
        )

    @classmethod
    def from_info(cls: type[B], info: BranchInfo, *, table: Optional[str] = None) -> B:
        """The barrier of the parsed branch call ``info`` (a :class:`~dtmcli.branch.BranchInfo`).

        Barrier ids count per object: make one per request and use it for every barrier call of
        that request (two objects for one call would both use barrier id ``01``).
        """
        return cls(info.trans_type, info.gid, info.branch_id, info.op, table=table)

    @classmethod
    def from_grpc(cls: type[B], context: Any, *, table: Optional[str] = None) -> B:
        """The barrier of the gRPC branch call served with ``context`` (a grpcio or ``grpc.aio`` servicer context).

        Read from its ``dtm-*`` metadata (the ``grpc`` extra); a missing or malformed field raises
        :class:`~dtmcli.errors.BranchRequestError`.
        """
        from ..grpc.server import branch_info_from_grpc  # the optional grpc extra, only when used

        return cls.from_info(branch_info_from_grpc(context), table=table)

    @classmethod
    def for_msg(cls: type[B], gid: str, *, table: Optional[str] = None) -> B:
        """The barrier of a 2-phase message's local transaction (branch ``00``, op ``msg``)."""
        return cls(MSG, gid, MSG_BRANCH_ID, OP_MSG, table=table)

    def next_barrier_id(self) -> str:
        """The next zero-padded barrier id (``01``, ``02``, ...)."""
        with self._lock:
            self.barrier_id += 1
            return f"{self.barrier_id:02d}"

    @property
    def origin_op(self) -> Optional[str]:
        """The op this op compensates (``try`` for ``cancel``, ``action`` for ``compensate``/``rollback``)."""
        return ORIGIN_OP.get(self.op)

    def _record(self, decision: Decision) -> None:
        self.last_decision = decision

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.trans_type!r}, {self.gid!r}, {self.branch_id!r}, {self.op!r})"


class BranchBarrier(BarrierBase):
    """The barrier identity of one branch call and its blocking calls on each store.

    ``table`` is the SQL table (``schema.name``) or Mongo ``database.collection`` the barrier
    writes to; it defaults to :attr:`default_table` (``dtm_barrier.barrier``). The asyncio form is
    :class:`dtmcli.asyncio.BranchBarrier`.
    """

    default_table: str = DEFAULT_TABLE
    """Class-wide default barrier table; set it once at start-up to move every barrier (asyncio ones too)."""

    # -- SQL ---------------------------------------------------------------------------------

    def call(
        self, conn: Any, busi: Callable[[Any], R], *, dialect: Optional[str] = None, join_transaction: bool = True
    ) -> Optional[R]:
        """Run ``busi(conn)`` under the barrier in one local transaction on ``conn``.

        ``conn`` is a DB-API connection (PyMySQL, psycopg2, psycopg; the barrier begins, commits
        or rolls back, and refuses a connection with an open transaction), or a SQLAlchemy
        Connection/Session or Django connection (the barrier joins an open transaction through a
        savepoint and the caller commits; otherwise it owns the transaction). With
        ``join_transaction=False`` a SQLAlchemy Connection/Session with an open transaction is
        refused instead (DtmInvalidInput): for callers that answer DTM right after the call.
        ``conn`` serves one call at a time: a call on it from another thread meanwhile is refused
        (DtmInvalidInput). Returns ``busi``'s result, or ``None`` when the call was a duplicate,
        suspended or a null compensation. Raises DtmDuplicated for a repeated msg, BarrierConflict
        (retryable, 425) on lock waits and deadlocks, BarrierDatabaseError on database failures
        (also when MySQL rolled the transaction back under ``busi``, which caught the deadlock),
        or what ``busi`` raised.
        """
        return _sql.barrier_call(conn, self, busi, table=self.table, dialect=dialect, on_decision=self._record,
                                 join=join_transaction)

    def call_with_db(
        self, db: Any, busi: Callable[[Any], R], *, dialect: Optional[str] = None, join_transaction: bool = True
    ) -> Optional[R]:
        """Like :meth:`call`, taking the connection from ``db``.

        ``db`` is anything :func:`dtmcli._barrier.sql.connection_from` accepts: a connection (used
        as is), a SQLAlchemy Engine (a connection is checked out and returned), ``"django"`` /
        ``"django:<alias>"``, or a zero-argument factory returning a DB-API connection, which is
        closed afterwards (for pools, close returns it to the pool).
        """
        with _sql.connection_from(db) as conn:
            return self.call(conn, busi, dialect=dialect, join_transaction=join_transaction)

    def query_prepared(self, conn: Any, *, dialect: Optional[str] = None) -> None:
        """The msg ``query_prepared`` check for this barrier's gid; raises DtmFailure when rolled back."""
        _sql.query_prepared(conn, self.trans_type, self.gid, table=self.table, dialect=dialect)

    # -- Redis -------------------------------------------------------------------------------

    def redis_check_adjust_amount(
        self, client: Any, key: str, amount: int, expire: int = REDIS_DEFAULT_EXPIRE, *, layout: str = "go"
    ) -> Decision:
        """Adjust the integer at ``key`` by ``amount`` under the barrier, in one atomic Lua script.

        Raises DtmFailure when ``key`` is missing or would go negative; DtmDuplicated for a
        repeated msg; BarrierDatabaseError, with nothing written, when ``key`` holds no int64 or
        the result would leave int64 (only a call that applies the amount reads ``key``);
        DtmInvalidInput for an ``amount`` outside int64. Returns RUN (applied), DUPLICATE or
        NULL_COMPENSATION (no effect; decided before ``key`` is read). Barrier keys expire after
        ``expire`` seconds; ``layout="cluster"`` puts them in ``key``'s slot (use keys with one
        hash tag for all ops of a branch).
        """
        decision = _redis.check_adjust_amount(
            client, key, amount, trans_type=self.trans_type, gid=self.gid, branch_id=self.branch_id, op=self.op,
            barrier_id=self.next_barrier_id(), expire=expire, layout=layout,
        )
        self.last_decision = decision
        return decision

    def redis_query_prepared(
        self, client: Any, expire: int = REDIS_DEFAULT_EXPIRE, *, layout: str = "go", key: Optional[str] = None
    ) -> None:
        """The msg ``query_prepared`` check on Redis; raises DtmFailure when rolled back."""
        _redis.query_prepared(client, self.gid, expire=expire, layout=layout, key=key)

    # -- MongoDB -----------------------------------------------------------------------------

    def mongo_call(self, client: Any, busi: Callable[[Any], R]) -> Optional[R]:
        """Run ``busi(session)`` in one MongoDB transaction (replica set needed). **Experimental.**"""
        return _mongo.barrier_call(client, self, busi, table=self.table, on_decision=self._record)

    def mongo_query_prepared(self, client: Any) -> None:
        """The msg ``query_prepared`` check on MongoDB (**experimental**); DtmFailure when rolled back."""
        _mongo.query_prepared(client, self.trans_type, self.gid, table=self.table)


def msg_barrier(cls: type[B], query: Any, table: Optional[str]) -> B:
    """The barrier a module-level ``query_prepared`` answers for: ``query`` is the request's query
    mapping, a barrier (of either flavour) or a gid."""
    if isinstance(query, cls):
        return query
    if isinstance(query, BarrierBase):
        return cls(query.trans_type, query.gid, query.branch_id, query.op, table=table or query.table)
    if isinstance(query, str):
        return cls.for_msg(query, table=table)
    return cls.from_query(query, table=table)
