"""Sub-transaction barrier: idempotency, null compensation and suspension control for branch handlers.

``BranchBarrier`` holds the identity of one branch call (trans_type, gid, branch_id, op) and hands
out barrier ids ``01``, ``02``, ... for each protected local transaction inside that call
(protocol.md §7). Backends: SQL (:meth:`BranchBarrier.call`, MySQL/MariaDB and PostgreSQL through
PyMySQL, psycopg2, psycopg 3, SQLAlchemy or Django), Redis
(:meth:`BranchBarrier.redis_check_adjust_amount`) and MongoDB (:meth:`BranchBarrier.mongo_call`, experimental).
The asyncio twin, on async drivers, is :mod:`dtmcli.asyncio.barrier`: the same flows, tables and rows.

In a handler, ``BranchBarrier.from_info(info)`` is the barrier of the parsed call; the
:func:`barrier` decorator (``@barrier(db=...)``, for Flask, Django, FastAPI ``DtmRoute`` routes
and plain handlers) runs a handler's database work inside it.

The DDL ships in ``dtmcli/sql/``; print it with ``python -m dtmcli.sql ddl mysql`` (or
``postgres`` / ``mongo``) or create it with :func:`create_schema`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from ._barrier import mongo as _mongo
from ._barrier import sql as _sql
from ._barrier.branch_barrier import BranchBarrier, msg_barrier
from ._barrier.core import (
    DEFAULT_TABLE,
    ORIGIN_OP,
    BarrierConflict,
    BarrierDatabaseError,
    Decision,
    decide,
)
from ._barrier.redis import DEFAULT_EXPIRE as REDIS_DEFAULT_EXPIRE
from ._barrier.sql import Finding, barrier_preflight
from ._barrier.xa import xa_handle_phase2, xa_local_transaction, xa_preflight
from ._barrier_decorator import barrier
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
    "Finding",
    "barrier_preflight",
]


def _msg_barrier(query: Any, table: Optional[str]) -> BranchBarrier:
    return msg_barrier(BranchBarrier, query, table)


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
    """:func:`query_prepared` for the MongoDB barrier (**experimental**)."""
    _msg_barrier(query, table).mongo_query_prepared(client)


def create_schema(conn: Any, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None) -> None:
    """Create the SQL barrier schema and table if missing (idempotent)."""
    _sql.create_schema(conn, table=table, dialect=dialect)


def create_mongo_schema(client: Any, *, table: str = DEFAULT_TABLE) -> None:
    """Create the MongoDB barrier collection's unique index if missing (idempotent; **experimental**)."""
    _mongo.create_schema(client, table=table)


def ddl(dialect: str, table: str = DEFAULT_TABLE) -> str:
    """The barrier DDL for ``mysql`` (MySQL 8), ``mariadb``, ``postgres`` or ``mongo`` (a mongosh script)."""
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
