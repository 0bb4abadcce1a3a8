"""SQL barrier backend: MySQL/MariaDB and PostgreSQL through DB-API, SQLAlchemy or Django.

Drivers are never imported here at module level: the connection object tells which adapter and
dialect to use (``type(conn).__module__``), and SQLAlchemy/Django are imported only when such an
object is passed in.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Optional, Protocol, TypeVar

from .._consts import MSG_BRANCH_ID, OP_MSG
from ..errors import DtmDuplicated, DtmError, DtmFailure, DtmInvalidInput
from .core import (
    DEFAULT_TABLE,
    MSG_BARRIER_ID,
    REASON_ROLLBACK,
    BarrierConflict,
    BarrierDatabaseError,
    Decision,
    decide,
    load_resource,
    origin_op,
    split_table,
    validate_table,
)

__all__ = [
    "DIALECTS",
    "SqlBarrierIdentity",
    "adapt",
    "barrier_call",
    "create_schema",
    "ddl",
    "detect_dialect",
    "insert_barrier",
    "map_db_error",
    "query_prepared",
]

logger = logging.getLogger("dtmcli")

R = TypeVar("R")

MYSQL = "mysql"
POSTGRES = "postgres"
DIALECTS = (MYSQL, POSTGRES)
_DIALECT_ALIASES = {"mysql": MYSQL, "mariadb": MYSQL, "postgres": POSTGRES, "postgresql": POSTGRES, "pg": POSTGRES}

_MYSQL_DRIVERS = ("pymysql", "MySQLdb", "mysql")
_PG_DRIVERS = ("psycopg2", "psycopg")
_DRIVERS = _MYSQL_DRIVERS + _PG_DRIVERS

# Lock wait timeout / deadlock (MySQL); deadlock, lock not available, serialization failure (PostgreSQL).
_MYSQL_RETRYABLE = frozenset({1205, 1213})
_PG_RETRYABLE = frozenset({"40P01", "55P03", "40001"})
# Connection-level failures: gone away, lost, killed, shutdown, packet out of order, not connected.
_MYSQL_CONNECTION = frozenset({1053, 1927, 2006, 2013, 2014, 2055})

_COLUMNS = "(trans_type, gid, branch_id, op, barrier_id, reason)"


class SqlBarrierIdentity(Protocol):
    """What the SQL backend needs from a barrier (``BranchBarrier`` provides it)."""

    trans_type: str
    gid: str
    branch_id: str
    op: str

    def next_barrier_id(self) -> str: ...


# --- dialects and statements -----------------------------------------------------------------


def normalize_dialect(dialect: str) -> str:
    """``mysql`` or ``postgres`` for any accepted spelling; DtmInvalidInput otherwise."""
    name = _DIALECT_ALIASES.get(str(dialect).lower())
    if name is None:
        raise DtmInvalidInput(f"unknown barrier dialect {dialect!r}; use one of {', '.join(DIALECTS)}")
    return name


def _insert_sql(dialect: str, table: str) -> str:
    values = "values(%s, %s, %s, %s, %s, %s)"
    if dialect == MYSQL:
        return f"insert ignore into {table}{_COLUMNS} {values}"
    # The conflict target names the unique key's columns rather than the constraint: identical for
    # the standard table (constraint uniq_barrier on these columns), and it also works for a
    # custom table next to it, whose constraint cannot share the name uniq_barrier in one schema.
    return f"insert into {table}{_COLUMNS} {values} on conflict (gid, branch_id, op, barrier_id) do nothing"


def _select_reason_sql(table: str) -> str:
    return f"select reason from {table} where gid = %s and branch_id = %s and op = %s and barrier_id = %s"


def ddl(dialect: str, table: str = DEFAULT_TABLE) -> str:
    """The barrier DDL for ``dialect`` (``mysql``/``postgres``/``mongo``), naming ``table``."""
    if str(dialect).lower() in ("mongo", "mongodb"):
        text = load_resource("barrier.mongo.js")
        database, collection = table.split(".", 1) if "." in table else ("dtm_barrier", table)
        validate_table(f"{database}.{collection}")
        return text.replace('getSiblingDB("dtm_barrier")', f'getSiblingDB("{database}")').replace(
            "db.barrier.", f"db.{collection}."
        )
    dialect = normalize_dialect(dialect)
    text = load_resource(f"barrier.{dialect}.sql")
    schema, name = split_table(table)
    if table == DEFAULT_TABLE:
        return text
    qualified = f"{schema}.{name}" if schema else name
    text = text.replace("dtm_barrier.barrier_seq", f"{schema}.{name}_seq" if schema else f"{name}_seq")
    text = text.replace("dtm_barrier.barrier ", f"{qualified} ").replace("dtm_barrier.barrier (", f"{qualified} (")
    text = re.sub(r"\bbarrier_(create|update)_time\b", rf"{name}_\1_time", text)
    if name != "barrier":  # constraint (index) names are unique per schema
        text = text.replace("CONSTRAINT uniq_barrier", f"CONSTRAINT uniq_{name}")
    if schema:
        return text.replace("dtm_barrier", schema)
    return "\n".join(line for line in text.splitlines() if "dtm_barrier" not in line) + "\n"


def ddl_statements(dialect: str, table: str = DEFAULT_TABLE) -> list[str]:
    """The DDL of :func:`ddl` split into single statements (comments removed)."""
    body = "\n".join(line for line in ddl(dialect, table).splitlines() if not line.lstrip().startswith("--"))
    return [stmt.strip() for stmt in body.split(";") if stmt.strip()]


# --- error mapping ---------------------------------------------------------------------------


def _driver_error(exc: BaseException) -> Optional[BaseException]:
    """The DB-API driver exception behind ``exc`` (itself, SQLAlchemy's ``orig``, Django's cause)."""
    seen = 0
    current: Optional[BaseException] = exc
    while current is not None and seen < 4:
        if type(current).__module__.split(".")[0] in _DRIVERS:
            return current
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
        seen += 1
    return None


def _error_code(err: BaseException) -> Any:
    """MySQL drivers: the int error number; PostgreSQL drivers: the SQLSTATE string (or None)."""
    if type(err).__module__.split(".")[0] in _MYSQL_DRIVERS:
        args = getattr(err, "args", ())
        return args[0] if args and isinstance(args[0], int) else None
    return getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)


def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is a lock wait timeout, deadlock or serialization failure."""
    err = _driver_error(exc)
    if err is None:
        return False
    code = _error_code(err)
    return code in _MYSQL_RETRYABLE or code in _PG_RETRYABLE


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a driver error of the connection (lost, killed, closed) rather than of SQL."""
    err = _driver_error(exc)
    if err is None:
        return False
    code = _error_code(err)
    if code in _MYSQL_CONNECTION or (isinstance(code, str) and code[:2] in ("08", "57")):
        return True
    return type(err).__name__ in ("OperationalError", "InterfaceError") and not isinstance(code, (int, str))


def map_db_error(exc: BaseException, what: str, barrier: Optional[SqlBarrierIdentity] = None) -> DtmError:
    """The typed error for a database exception: BarrierConflict when retryable, else BarrierDatabaseError."""
    where: dict[str, Any] = {}
    if barrier is not None:
        where = {"gid": barrier.gid, "branch_id": barrier.branch_id, "op": barrier.op}
    if is_retryable(exc):
        return BarrierConflict(f"barrier {what}: lock conflict, retry later: {exc}", **where)
    return BarrierDatabaseError(f"barrier {what} failed: {type(exc).__name__}: {exc}", **where)


def _is_db_exception(exc: BaseException) -> bool:
    return _driver_error(exc) is not None or type(exc).__module__.split(".")[0] in ("sqlalchemy", "django")


# --- adapters ---------------------------------------------------------------------------------


class _Adapter:
    """One way of running the barrier's statements in a local transaction."""

    dialect: str

    def begin(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError

    def execute(self, sql: str, params: tuple[str, ...]) -> int:
        """Run ``sql`` (``%s`` placeholders) and return ``cursor.rowcount``."""
        raise NotImplementedError

    def fetch_one(self, sql: str, params: tuple[str, ...]) -> Optional[tuple[Any, ...]]:
        raise NotImplementedError


class _DbApiAdapter(_Adapter):
    """A plain DB-API connection: the barrier opens, commits and rolls back its own transaction."""

    def __init__(self, conn: Any, dialect: str) -> None:
        self.conn = conn
        self.dialect = dialect
        self.driver = type(conn).__module__.split(".")[0]
        self._restore_autocommit: Optional[bool] = None

    def _in_transaction(self) -> bool:
        if self.driver == "psycopg2":
            import psycopg2.extensions as ext

            return bool(self.conn.get_transaction_status() != ext.TRANSACTION_STATUS_IDLE)
        if self.driver == "psycopg":
            return int(self.conn.info.transaction_status) != 0  # pq.TransactionStatus.IDLE
        if self.driver == "pymysql":
            from pymysql.constants import SERVER_STATUS

            return bool(self.conn.server_status & SERVER_STATUS.SERVER_STATUS_IN_TRANS)
        return False

    def begin(self) -> None:
        if self._in_transaction():
            raise DtmInvalidInput(
                "the connection has an open transaction; commit or roll it back before a barrier call, "
                "or pass a SQLAlchemy/Django transaction for the barrier to join"
            )
        if self.driver in _PG_DRIVERS:
            if self.conn.autocommit:
                self._restore_autocommit = True
                self.conn.autocommit = False
            return  # psycopg opens the transaction with the first statement
        if self.driver == "pymysql" and not self.conn.get_autocommit():
            return  # with autocommit off the first INSERT opens the transaction: no BEGIN round trip
        # Open the transaction explicitly: with autocommit on, the barrier rows would otherwise commit
        # on their own and a failed business call would leave them behind (every retry a "duplicate").
        if hasattr(self.conn, "begin"):  # PyMySQL, MySQLdb
            self.conn.begin()
        elif hasattr(self.conn, "start_transaction"):  # mysql-connector
            self.conn.start_transaction()
        else:
            raise DtmInvalidInput(
                f"cannot open a transaction on a {type(self.conn).__module__}.{type(self.conn).__name__} "
                "connection: use PyMySQL, MySQLdb, mysql-connector, psycopg2 or psycopg, or a SQLAlchemy "
                "Connection/Session"
            )

    def _done(self) -> None:
        if self._restore_autocommit is not None:
            self.conn.autocommit = self._restore_autocommit
            self._restore_autocommit = None

    def commit(self) -> None:
        self.conn.commit()
        self._done()

    def rollback(self) -> None:
        try:
            self.conn.rollback()
        finally:
            if not getattr(self.conn, "closed", False):
                self._done()

    def execute(self, sql: str, params: tuple[str, ...]) -> int:
        cur = self.conn.cursor()
        try:
            cur.execute(sql, params)
            return int(cur.rowcount)
        finally:
            cur.close()

    def fetch_one(self, sql: str, params: tuple[str, ...]) -> Optional[tuple[Any, ...]]:
        cur = self.conn.cursor()
        try:
            cur.execute(sql, params)
            row = cur.fetchone()
            return tuple(row) if row is not None else None
        finally:
            cur.close()


def _to_named(sql: str) -> str:
    count = iter(range(100))
    return re.sub(r"%s", lambda _m: f":p{next(count)}", sql)


class _SqlAlchemyAdapter(_Adapter):
    """A SQLAlchemy Connection or Session: join its transaction through a savepoint, or own one."""

    def __init__(self, conn: Any, dialect: Optional[str]) -> None:
        self.conn = conn
        bind = conn.get_bind() if hasattr(conn, "get_bind") else conn
        self.dialect = normalize_dialect(dialect or bind.dialect.name)
        self._trans: Any = None

    def begin(self) -> None:
        self._trans = self.conn.begin_nested() if self.conn.in_transaction() else self.conn.begin()

    def commit(self) -> None:
        self._trans.commit()

    def rollback(self) -> None:
        self._trans.rollback()

    def execute(self, sql: str, params: tuple[str, ...]) -> int:
        from sqlalchemy import text

        result = self.conn.execute(text(_to_named(sql)), {f"p{i}": v for i, v in enumerate(params)})
        return int(result.rowcount)

    def fetch_one(self, sql: str, params: tuple[str, ...]) -> Optional[tuple[Any, ...]]:
        from sqlalchemy import text

        row = self.conn.execute(text(_to_named(sql)), {f"p{i}": v for i, v in enumerate(params)}).first()
        return tuple(row) if row is not None else None


class _DjangoAdapter(_Adapter):
    """A Django connection: runs inside ``transaction.atomic`` (a savepoint when already in one)."""

    def __init__(self, conn: Any, dialect: Optional[str]) -> None:
        from django.db import connections

        self.conn = connections[conn.alias]
        self.dialect = normalize_dialect(dialect or self.conn.vendor)
        self._atomic: Any = None

    def begin(self) -> None:
        from django.db import transaction

        self._atomic = transaction.atomic(using=self.conn.alias)
        self._atomic.__enter__()

    def commit(self) -> None:
        self._atomic.__exit__(None, None, None)

    def rollback(self) -> None:
        err = DtmError("barrier rollback")
        self._atomic.__exit__(DtmError, err, None)

    def execute(self, sql: str, params: tuple[str, ...]) -> int:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return int(cur.rowcount)

    def fetch_one(self, sql: str, params: tuple[str, ...]) -> Optional[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            row = cur.fetchone()
            return tuple(row) if row is not None else None


def detect_dialect(conn: Any) -> str:
    """``mysql`` or ``postgres`` from a DB-API, SQLAlchemy or Django connection."""
    return adapt(conn, None).dialect


def adapt(conn: Any, dialect: Optional[str]) -> _Adapter:
    """The adapter for ``conn``; ``dialect`` overrides detection (needed for unknown DB-API drivers)."""
    module = type(conn).__module__
    top = module.split(".")[0]
    if top == "sqlalchemy":
        return _SqlAlchemyAdapter(conn, dialect)
    if top == "django":
        return _DjangoAdapter(conn, dialect)
    if top in _MYSQL_DRIVERS:
        return _DbApiAdapter(conn, normalize_dialect(dialect or MYSQL))
    if top in _PG_DRIVERS:
        return _DbApiAdapter(conn, normalize_dialect(dialect or POSTGRES))
    if dialect is not None and hasattr(conn, "cursor") and hasattr(conn, "commit"):
        return _DbApiAdapter(conn, normalize_dialect(dialect))
    raise DtmInvalidInput(
        f"cannot tell the SQL dialect of a {module}.{type(conn).__name__}; pass dialect='mysql' or 'postgres'"
    )


# --- the algorithm ----------------------------------------------------------------------------


def _rollback_quietly(adapter: _Adapter, what: str) -> None:
    """Roll back after a failure; a failing rollback is logged, the original error is what matters."""
    try:
        adapter.rollback()
    except Exception as rb_exc:  # the connection may be gone
        logger.warning("%s: rollback failed too: %s", what, rb_exc)


def _rollback_after(adapter: _Adapter, cause: BaseException, barrier: SqlBarrierIdentity) -> None:
    _rollback_quietly(
        adapter, f"barrier {barrier.gid}/{barrier.branch_id}/{barrier.op} after {type(cause).__name__}"
    )


def insert_barrier(
    adapter: _Adapter, table: str, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str, reason: str
) -> int:
    """INSERT-IGNORE one barrier row; the number of rows inserted (0 or 1)."""
    return adapter.execute(_insert_sql(adapter.dialect, table), (trans_type, gid, branch_id, op, barrier_id, reason))


def barrier_call(
    conn: Any,
    barrier: SqlBarrierIdentity,
    busi: Callable[[Any], R],
    *,
    table: str = DEFAULT_TABLE,
    dialect: Optional[str] = None,
    on_decision: Optional[Callable[[Decision], None]] = None,
) -> Optional[R]:
    """Run ``busi(conn)`` under the barrier in one local transaction (protocol.md §7).

    Returns ``busi``'s result, or ``None`` when the call was a duplicate, suspended or a null
    compensation (committed without running ``busi``). Raises DtmDuplicated for a repeated msg,
    BarrierConflict on lock conflicts, BarrierDatabaseError on database failures, and whatever
    ``busi`` raised otherwise (after rolling the barrier rows back with it).
    """
    validate_table(table)
    adapter = adapt(conn, dialect)
    bid = barrier.next_barrier_id()
    origin = origin_op(barrier.op)
    ident = (barrier.trans_type, barrier.gid, barrier.branch_id)
    try:
        adapter.begin()
    except DtmError:
        raise
    except Exception as exc:
        raise map_db_error(exc, "begin", barrier) from exc
    try:
        origin_affected = insert_barrier(adapter, table, *ident, origin, bid, barrier.op) if origin else 0
        current_affected = insert_barrier(adapter, table, *ident, barrier.op, bid, barrier.op)
    except Exception as exc:
        _rollback_after(adapter, exc, barrier)
        raise map_db_error(exc, "insert", barrier) from exc
    decision = decide(barrier.op, origin_affected, current_affected)
    logger.debug(
        "barrier %s/%s/%s/%s: origin_affected=%s current_affected=%s -> %s",
        barrier.gid, barrier.branch_id, barrier.op, bid, origin_affected, current_affected, decision.value,
    )
    if on_decision is not None:
        on_decision(decision)
    if decision is Decision.MSG_DUPLICATED:
        _rollback_after(adapter, DtmDuplicated("duplicated"), barrier)
        raise DtmDuplicated(
            "msg local transaction already done or rolled back", gid=barrier.gid, branch_id=barrier.branch_id,
            op=barrier.op,
        )
    result: Optional[R] = None
    if decision is Decision.RUN:
        try:
            result = busi(conn)
        except BaseException as exc:
            _rollback_after(adapter, exc, barrier)
            if isinstance(exc, Exception) and not isinstance(exc, DtmError) and _is_db_exception(exc):
                if is_retryable(exc) or is_connection_error(exc):
                    raise map_db_error(exc, "business call", barrier) from exc
            raise
    try:
        adapter.commit()
    except Exception as exc:
        _rollback_after(adapter, exc, barrier)
        raise map_db_error(exc, "commit", barrier) from exc
    return result


def query_prepared(
    conn: Any, trans_type: str, gid: str, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None
) -> None:
    """The msg ``query_prepared`` check (protocol.md §7): return on success, raise DtmFailure on rollback.

    Inserts the ``rollback`` marker for (gid, 00, msg, 01) unless the local transaction already
    inserted its row, then reads which one won.
    """
    validate_table(table)
    adapter = adapt(conn, dialect)
    where = {"gid": gid, "branch_id": MSG_BRANCH_ID, "op": OP_MSG}
    try:
        adapter.begin()
        insert_barrier(adapter, table, trans_type, gid, MSG_BRANCH_ID, OP_MSG, MSG_BARRIER_ID, REASON_ROLLBACK)
        row = adapter.fetch_one(_select_reason_sql(table), (gid, MSG_BRANCH_ID, OP_MSG, MSG_BARRIER_ID))
        adapter.commit()
    except DtmError:
        raise
    except Exception as exc:
        _rollback_quietly(adapter, f"query_prepared {gid}")
        if is_retryable(exc):
            raise BarrierConflict(f"query_prepared: lock conflict, retry later: {exc}", **where) from exc
        raise BarrierDatabaseError(f"query_prepared failed: {type(exc).__name__}: {exc}", **where) from exc
    reason = row[0] if row else None
    if reason == REASON_ROLLBACK:
        raise DtmFailure("msg local transaction was rolled back", **where)
    if reason is None:
        raise BarrierDatabaseError("query_prepared: barrier row missing after insert", **where)


def create_schema(conn: Any, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None) -> None:
    """Create the barrier schema/database and table if they do not exist (idempotent)."""
    adapter = adapt(conn, dialect)
    statements = ddl_statements(adapter.dialect, table)
    try:
        adapter.begin()
        for stmt in statements:
            adapter.execute(stmt, ())
        adapter.commit()
    except DtmError:
        raise
    except Exception as exc:
        _rollback_quietly(adapter, "create_schema")
        raise BarrierDatabaseError(f"creating the barrier schema failed: {exc}") from exc
