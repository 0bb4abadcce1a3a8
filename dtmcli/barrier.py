"""Sub-transaction barrier: idempotency, null compensation and suspension control for branch handlers.

``BranchBarrier`` holds the identity of one branch call (trans_type, gid, branch_id, op) and hands
out barrier ids ``01``, ``02``, ... for each protected local transaction inside that call
(protocol.md §7). Backends: SQL (:meth:`BranchBarrier.call`, MySQL/MariaDB and PostgreSQL through
PyMySQL, psycopg2, psycopg 3, SQLAlchemy or Django), Redis
(:meth:`BranchBarrier.redis_check_adjust_amount`) and MongoDB (:meth:`BranchBarrier.mongo_call`).

The DDL ships in ``dtmcli/sql/``; print it with ``python -m dtmcli.sql ddl mysql`` (or
``postgres`` / ``mongo``) or create it with :func:`create_schema`.
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

from ._barrier import mongo as _mongo
from ._barrier import redis as _redis
from ._barrier import sql as _sql
from ._barrier.core import (
    DEFAULT_TABLE,
    ORIGIN_OP,
    BarrierConflict,
    BarrierDatabaseError,
    Decision,
    decide,
    validate_table,
)
from ._barrier.decorator import barrier
from ._barrier.redis import DEFAULT_EXPIRE as REDIS_DEFAULT_EXPIRE
from ._barrier.xa import xa_handle_phase2, xa_local_transaction, xa_preflight
from ._consts import MSG, MSG_BRANCH_ID, OP_MSG
from ._validate import check_branch_id, check_received_gid
from .errors import DtmInvalidInput

__all__ = [
    "BarrierConflict",
    "BarrierDatabaseError",
    "BranchBarrier",
    "DEFAULT_TABLE",
    "Decision",
    "ORIGIN_OP",
    "REDIS_DEFAULT_EXPIRE",
    "barrier",
    "create_mongo_schema",
    "create_schema",
    "ddl",
    "decide",
    "main",
    "query_prepared",
    "query_prepared_mongo",
    "query_prepared_redis",
    "xa_handle_phase2",
    "xa_local_transaction",
    "xa_preflight",
]

R = TypeVar("R")

_MAX_OP_LEN = 45
_WORD_RE = re.compile(rf"[A-Za-z_][A-Za-z0-9_]{{0,{_MAX_OP_LEN - 1}}}")


class BranchBarrier:
    """The barrier identity of one branch call; every field must be non-empty.

    ``table`` is the SQL table (``schema.name``) or Mongo ``database.collection`` the barrier
    writes to; it defaults to :attr:`default_table` (``dtm_barrier.barrier``).
    """

    default_table: str = DEFAULT_TABLE
    """Class-wide default barrier table; set it once at start-up to move every barrier."""

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
        self.table = validate_table(table if table is not None else self.default_table)
        self.barrier_id = 0
        self.last_decision: Optional[Decision] = None
        self._lock = threading.Lock()

    @classmethod
    def from_query(cls, query: Mapping[str, Any], *, table: Optional[str] = None) -> BranchBarrier:
        """Build from a callback's query parameters (``trans_type``, ``gid``, ``branch_id``, ``op``)."""
        values = {k: query.get(k) for k in ("trans_type", "gid", "branch_id", "op")}
        missing = [k for k, v in values.items() if not v]
        if missing:
            raise DtmInvalidInput(f"barrier needs {', '.join(missing)} in the request query")
        return cls(
            str(values["trans_type"]), str(values["gid"]), str(values["branch_id"]), str(values["op"]), table=table
        )

    @classmethod
    def for_msg(cls, gid: str, *, table: Optional[str] = None) -> BranchBarrier:
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

    # -- SQL ---------------------------------------------------------------------------------

    def call(self, conn: Any, busi: Callable[[Any], R], *, dialect: Optional[str] = None) -> Optional[R]:
        """Run ``busi(conn)`` under the barrier in one local transaction on ``conn``.

        ``conn`` is a DB-API connection (PyMySQL, psycopg2, psycopg; the barrier begins, commits
        or rolls back, and refuses a connection with an open transaction), or a SQLAlchemy
        Connection/Session or Django connection (the barrier joins an open transaction through a
        savepoint and the caller commits; otherwise it owns the transaction). Returns ``busi``'s
        result, or ``None`` when the call was a duplicate, suspended or a null compensation.
        Raises DtmDuplicated for a repeated msg, BarrierConflict (retryable, 425) on lock waits and
        deadlocks, BarrierDatabaseError on database failures, or what ``busi`` raised.
        """
        return _sql.barrier_call(conn, self, busi, table=self.table, dialect=dialect, on_decision=self._record)

    def call_with_db(self, db: Any, busi: Callable[[Any], R], *, dialect: Optional[str] = None) -> Optional[R]:
        """Like :meth:`call`, taking the connection from ``db``.

        ``db`` is a connection (used as is), a SQLAlchemy Engine (a connection is checked out and
        returned) or a zero-argument factory returning a DB-API connection, which is closed
        afterwards (for pools, close returns it to the pool).
        """
        if callable(db) and not hasattr(db, "cursor") and not hasattr(db, "execute"):
            conn = db()
            try:
                return self.call(conn, busi, dialect=dialect)
            finally:
                conn.close()
        if type(db).__module__.startswith("sqlalchemy") and hasattr(db, "connect") and hasattr(db, "dispose"):
            with db.connect() as sa_conn:
                return self.call(sa_conn, busi, dialect=dialect)
        return self.call(db, busi, dialect=dialect)

    def query_prepared(self, conn: Any, *, dialect: Optional[str] = None) -> None:
        """The msg ``query_prepared`` check for this barrier's gid; raises DtmFailure when rolled back."""
        _sql.query_prepared(conn, self.trans_type, self.gid, table=self.table, dialect=dialect)

    # -- Redis -------------------------------------------------------------------------------

    def redis_check_adjust_amount(
        self, client: Any, key: str, amount: int, expire: int = REDIS_DEFAULT_EXPIRE, *, layout: str = "go"
    ) -> Decision:
        """Adjust the integer at ``key`` by ``amount`` under the barrier, in one atomic Lua script.

        Raises DtmFailure when ``key`` is missing or would go negative; DtmDuplicated for a
        repeated msg. Returns RUN (applied), DUPLICATE or NULL_COMPENSATION (no effect). Barrier
        keys expire after ``expire`` seconds; ``layout="cluster"`` puts them in ``key``'s slot.
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
        """Run ``busi(session)`` under the barrier in one MongoDB transaction (needs a replica set)."""
        return _mongo.barrier_call(client, self, busi, table=self.table, on_decision=self._record)

    def mongo_query_prepared(self, client: Any) -> None:
        """The msg ``query_prepared`` check on MongoDB; raises DtmFailure when rolled back."""
        _mongo.query_prepared(client, self.trans_type, self.gid, table=self.table)

    def __repr__(self) -> str:
        return f"BranchBarrier({self.trans_type!r}, {self.gid!r}, {self.branch_id!r}, {self.op!r})"


def _msg_barrier(query: Any, table: Optional[str]) -> BranchBarrier:
    if isinstance(query, BranchBarrier):
        return query
    if isinstance(query, str):
        return BranchBarrier.for_msg(query, table=table)
    return BranchBarrier.from_query(query, table=table)


def query_prepared(query: Any, conn: Any, *, table: Optional[str] = None, dialect: Optional[str] = None) -> None:
    """Answer DTM's msg ``query_prepared`` from the SQL barrier table.

    ``query`` is the request's query mapping, a BranchBarrier or a gid. Returns when the local
    transaction committed; raises DtmFailure (answer 409) when it was rolled back or never ran.
    """
    _msg_barrier(query, table).query_prepared(conn, dialect=dialect)


def query_prepared_redis(
    query: Any, client: Any, expire: int = REDIS_DEFAULT_EXPIRE, *, layout: str = "go", key: Optional[str] = None
) -> None:
    """:func:`query_prepared` for the Redis barrier."""
    _msg_barrier(query, None).redis_query_prepared(client, expire, layout=layout, key=key)


def query_prepared_mongo(query: Any, client: Any, *, table: Optional[str] = None) -> None:
    """:func:`query_prepared` for the MongoDB barrier."""
    _msg_barrier(query, table).mongo_query_prepared(client)


def create_schema(conn: Any, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None) -> None:
    """Create the SQL barrier schema and table if missing (idempotent)."""
    _sql.create_schema(conn, table=table, dialect=dialect)


def create_mongo_schema(client: Any, *, table: str = DEFAULT_TABLE) -> None:
    """Create the MongoDB barrier collection's unique index if missing (idempotent)."""
    _mongo.create_schema(client, table=table)


def ddl(dialect: str, table: str = DEFAULT_TABLE) -> str:
    """The barrier DDL for ``mysql``, ``postgres`` or ``mongo`` (a mongosh script)."""
    return _sql.ddl(dialect, table)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dtmcli.sql ddl {mysql,postgres,mongo} [--table T]``: print the DDL; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m dtmcli.sql", description="dtmcli barrier tools")
    sub = parser.add_subparsers(dest="command", required=True)
    ddl_parser = sub.add_parser("ddl", help="print the barrier DDL")
    ddl_parser.add_argument("dialect", choices=["mysql", "mariadb", "postgres", "postgresql", "mongo"])
    ddl_parser.add_argument("--table", default=DEFAULT_TABLE, help="barrier table (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        sys.stdout.write(ddl(args.dialect, args.table))
    except DtmInvalidInput as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
