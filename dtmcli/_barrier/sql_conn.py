"""SQL connections for the barrier: dialects, error mapping, transaction adapters, connection sources.

Drivers are never imported here at module level: the connection object tells which adapter and
dialect to use (``type(conn).__module__``), and SQLAlchemy/Django are imported only when such an
object is passed in. :func:`connection_from` is the one resolver of database sources, shared by the
barrier, msg, query_prepared and XA. The decisions the asyncio adapters
(``dtmcli/asyncio/_barrier_sql.py``) share with these live here too: error mapping (asyncpg and
aiomysql included), :func:`begin_plan`, :func:`savepoint_plan`, :func:`is_aborted`,
:func:`charset_flow`, and :func:`claimed` (one barrier call per connection at a time).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import weakref
from typing import Any, Iterator, Mapping, Optional

from .. import _flow
from .._dbkind import ASYNC, object_kind
from .._flow import Flow, StoreOp
from ..errors import DtmError, DtmInvalidInput
from .core import BarrierConflict, BarrierDatabaseError, BarrierIdentity

__all__ = [
    "DIALECTS",
    "MARIADB",
    "MYSQL",
    "POSTGRES",
    "adapt",
    "aborted_error",
    "begin_plan",
    "charset_flow",
    "claimed",
    "connection_charset",
    "connection_from",
    "connection_in_use_error",
    "detect_dialect",
    "is_connection_error",
    "is_retryable",
    "map_db_error",
    "mariadb_version",
    "mysql_autocommit",
    "mysql_autocommit_switch",
    "is_aborted",
    "joined_transaction_error",
    "normalize_dialect",
    "open_transaction_error",
    "rolled_back_error",
    "row_values",
    "savepoint_plan",
    "require_utf8mb4",
    "require_utf8mb4_flow",
]

MYSQL = "mysql"
MARIADB = "mariadb"  # a MySQL dialect; differs only in the DDL's collation
POSTGRES = "postgres"
DIALECTS = (MYSQL, POSTGRES)
_DIALECT_ALIASES = {"mysql": MYSQL, "mariadb": MYSQL, "postgres": POSTGRES, "postgresql": POSTGRES, "pg": POSTGRES}

_MYSQL_DRIVERS = ("pymysql", "MySQLdb", "mysql")
_PG_DRIVERS = ("psycopg2", "psycopg")
_DRIVERS = _MYSQL_DRIVERS + _PG_DRIVERS
# Drivers whose exceptions the error mapping reads: the blocking ones and the asyncio ones (aiomysql
# raises PyMySQL's exceptions; asyncpg's carry a SQLSTATE like psycopg's).
_ERROR_DRIVERS = (*_DRIVERS, "asyncpg", "aiomysql")

# Lock wait timeout / deadlock (MySQL); deadlock, lock not available, serialization failure (PostgreSQL).
_MYSQL_RETRYABLE = frozenset({1205, 1213})
_PG_RETRYABLE = frozenset({"40P01", "55P03", "40001"})
# Connection-level failures: gone away, lost, killed, shutdown, packet out of order, not connected.
_MYSQL_CONNECTION = frozenset({1053, 1927, 2006, 2013, 2014, 2055})


logger = logging.getLogger("dtmcli")


def normalize_dialect(dialect: str) -> str:
    """``mysql`` or ``postgres`` for any accepted spelling; DtmInvalidInput otherwise."""
    name = _DIALECT_ALIASES.get(str(dialect).lower())
    if name is None:
        raise DtmInvalidInput(f"unknown barrier dialect {dialect!r}; use one of {', '.join(DIALECTS)}")
    return name


# --- error mapping ---------------------------------------------------------------------------


def _driver_error(exc: BaseException) -> Optional[BaseException]:
    """The DB-API driver exception behind ``exc`` (itself, SQLAlchemy's ``orig``, Django's cause)."""
    seen = 0
    current: Optional[BaseException] = exc
    while current is not None and seen < 4:
        if type(current).__module__.split(".")[0] in _ERROR_DRIVERS:
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


def map_db_error(exc: BaseException, what: str, barrier: Optional[BarrierIdentity] = None) -> DtmError:
    """The typed error for a database exception: BarrierConflict when retryable, else BarrierDatabaseError."""
    where: dict[str, Any] = {}
    if barrier is not None:
        where = {"gid": barrier.gid, "branch_id": barrier.branch_id, "op": barrier.op}
    return _map_db_error(exc, what, where)


def _map_db_error(exc: BaseException, what: str, where: Mapping[str, Any]) -> DtmError:
    if is_retryable(exc):
        return BarrierConflict(f"barrier {what}: lock conflict, retry later: {exc}", **where)
    return BarrierDatabaseError(f"barrier {what} failed: {type(exc).__name__}: {exc}", **where)


def _is_db_exception(exc: BaseException) -> bool:
    return _driver_error(exc) is not None or type(exc).__module__.split(".")[0] in ("sqlalchemy", "django")


# --- decisions the blocking and asyncio adapters share ---------------------------------------------

IMPLICIT, AUTOCOMMIT_OFF, BEGIN = "implicit", "autocommit_off", "begin"
SAVE_AUTOCOMMIT = "save_autocommit"

# MySQL: the statements that turn autocommit off for a barrier call and put the caller's mode back.
# Setting autocommit from 0 to 1 commits the open transaction (MySQL's implicit commit), so each
# restoring statement is also the call's COMMIT: no round trip is added to the BEGIN + COMMIT they
# replace. The second one saves an unknown mode in a user variable and puts it back (to 0 again
# after the commit when it was 0).
_AUTOCOMMIT_OFF_SQL = "set autocommit = 0"
_SAVE_AUTOCOMMIT_SQL = "set @dtmcli_autocommit = @@session.autocommit, autocommit = 0"
_RESTORE_ON_SQL = "set autocommit = 1"
_RESTORE_SAVED_SQL = "set autocommit = 1, autocommit = @dtmcli_autocommit"


def open_transaction_error() -> DtmInvalidInput:
    """The error for a plain driver connection that already has a transaction open."""
    return DtmInvalidInput(
        "the connection has an open transaction; commit or roll it back before a barrier call, "
        "or pass a SQLAlchemy/Django transaction for the barrier to join"
    )


def begin_plan(postgres: bool, in_transaction: bool, autocommit: Optional[bool]) -> str:
    """How the barrier opens its transaction on a plain driver connection (not SQLAlchemy/Django).

    ``autocommit`` is the connection's setting, ``None`` when the driver cannot tell it. Returns
    ``implicit`` (the first statement opens the transaction: no BEGIN round trip), ``autocommit_off``
    (autocommit on: turn it off for the call, restore it after) or, on MySQL when the mode is
    unknown, ``save_autocommit`` (save the session's mode in a user variable while turning it off).
    A BEGIN alone is not enough on MySQL: InnoDB's rollback on a deadlock ends the transaction, the
    session falls back to autocommit, and business statements after a caught deadlock would commit
    one by one before the barrier could refuse them. A connection with a transaction already open
    is refused (DtmInvalidInput): the barrier would commit the caller's work.
    """
    if in_transaction:
        raise open_transaction_error()
    if postgres:
        return AUTOCOMMIT_OFF if autocommit else IMPLICIT
    if autocommit is None:
        return SAVE_AUTOCOMMIT
    return AUTOCOMMIT_OFF if autocommit else IMPLICIT


def mysql_autocommit_switch(plan: str) -> tuple[str, str]:
    """MySQL: ``(statement turning autocommit off, statement restoring the caller's mode)`` for a
    :func:`begin_plan` of ``autocommit_off`` or ``save_autocommit``; ``("", "")`` for ``implicit``.

    The restoring statement commits too: it is the COMMIT (inside MariaDB's checked COMMIT it
    follows the COMMIT), or it runs after the ROLLBACK: the caller's mode is back on every path.
    """
    if plan == AUTOCOMMIT_OFF:
        return _AUTOCOMMIT_OFF_SQL, _RESTORE_ON_SQL
    if plan == SAVE_AUTOCOMMIT:
        return _SAVE_AUTOCOMMIT_SQL, _RESTORE_SAVED_SQL
    return "", ""


def mysql_autocommit(raw: Any) -> Optional[bool]:
    """Whether a MySQL driver connection is in autocommit mode, from the server status of its last
    answer (no round trip): PyMySQL, aiomysql and mysqlclient ``get_autocommit()``, mysql-connector's
    C extension; ``None`` when the driver cannot tell without asking the server."""
    get = getattr(raw, "get_autocommit", None)
    if callable(get):
        return bool(get())
    cmysql = getattr(raw, "_cmysql", None)
    status = getattr(cmysql, "st_server_status", None)
    if callable(status):
        return bool(int(status()) & 2)  # SERVER_STATUS_AUTOCOMMIT
    return None


def dbapi_autocommit(raw: Any, dialect: Any = None) -> Optional[bool]:
    """Whether a driver connection commits every statement on its own; ``None`` when it cannot tell.

    ``raw`` is a DB-API connection or SQLAlchemy's adapted async one; ``dialect``, a SQLAlchemy dialect,
    is asked first where it can tell (SQLAlchemy >= 2.1). Then what :func:`mysql_autocommit` reads without a
    round trip, then a boolean ``autocommit`` (psycopg2, psycopg, SQLAlchemy's asyncpg adapter; pure-Python
    mysql-connector asks its server).
    """
    detect = getattr(dialect, "detect_autocommit_setting", None)
    if callable(detect):
        try:
            return bool(detect(raw))
        except NotImplementedError:
            pass
    known = mysql_autocommit(raw)
    if known is not None:
        return known
    value = getattr(raw, "autocommit", None)
    return value if isinstance(value, bool) else None


def autocommit_refused() -> DtmInvalidInput:
    """The error for a SQLAlchemy connection or session in AUTOCOMMIT mode, raised before anything is written."""
    return DtmInvalidInput(
        "the SQLAlchemy connection is in AUTOCOMMIT mode: the barrier rows and the business writes would each "
        "commit on their own, and a failure half-way would leave the barrier marking work done that was not; "
        "use a connection with a transactional isolation level, e.g. "
        "conn.execution_options(isolation_level='READ COMMITTED')"
    )


def refuse_pipeline(raw: Any) -> None:
    """Refuse a psycopg 3 connection in pipeline mode (DtmInvalidInput), before anything is sent.

    Inside ``conn.pipeline()`` a statement's row count is unknown (-1) until the pipeline syncs, so
    the barrier could not tell a first delivery from a duplicate, a repeated msg or a late Try.
    """
    status = getattr(getattr(raw, "pgconn", None), "pipeline_status", 0)
    if int(status) != 0:  # pq.PipelineStatus.OFF
        raise DtmInvalidInput(
            "the psycopg connection is in pipeline mode: row counts are unknown until the pipeline syncs, and "
            "the barrier must know whether its row was new before running the business function; call the "
            "barrier outside conn.pipeline()"
        )


def django_transaction_error(in_atomic: bool) -> DtmInvalidInput:
    """The error for a Django connection whose transaction the barrier cannot rely on being committed."""
    if in_atomic:
        return DtmInvalidInput(
            "the Django connection is inside transaction.atomic(): the barrier would only release a savepoint, and "
            "its work commits when (and if) the caller's block does; call it outside atomic blocks"
        )
    return DtmInvalidInput(
        "the Django connection has autocommit turned off by hand (transaction.set_autocommit(False)): Django's "
        "atomic() then commits nothing on exit, so nothing would commit the barrier's work when the call ends; "
        "turn autocommit back on"
    )


def is_django_source(db: Any) -> bool:
    """Whether ``db`` names or is a Django connection (``"django"``, ``"django:<alias>"``, a connection)."""
    if isinstance(db, str):
        return db == "django" or db.startswith("django:")
    return type(db).__module__.split(".")[0] == "django"


def _django_connection(db: Any) -> Any:
    """The Django connection ``"django"`` / ``"django:<alias>"`` names, or this thread's one for ``db``'s alias."""
    from django.db import connections

    if not isinstance(db, str):
        return connections[db.alias]
    return connections[db.split(":", 1)[1] if ":" in db else "default"]


def refuse_open_transaction(db: Any) -> None:
    """Refuse (DtmInvalidInput) a SQLAlchemy Connection/Session (sync or asyncio) with a transaction open, or a
    Django connection inside an atomic block, where the caller needs the barrier's own committed transaction
    (a msg's local work, before its submit). Sources resolved later (factories, engines) are checked then."""
    if is_django_source(db):
        if _django_connection(db).in_atomic_block:
            raise django_transaction_error(True)
        return
    in_transaction = getattr(db, "in_transaction", None)
    if type(db).__module__.startswith("sqlalchemy") and callable(in_transaction):
        savepoint_plan(in_transaction(), join=False)  # the adapters' own rule: raises when one is open


def is_aborted(raw: Any, conn: Any = None) -> bool:
    """Whether the PostgreSQL transaction on driver connection ``raw`` is aborted (psycopg2, psycopg 3
    blocking or async), or ``conn`` is marked for rollback (Django). No round trip."""
    driver = type(raw).__module__.split(".")[0]
    if driver == "psycopg2":
        aborted = raw.get_transaction_status() == 3  # psycopg2.extensions.TRANSACTION_STATUS_INERROR
    elif driver == "psycopg":
        aborted = int(raw.info.transaction_status) == 3  # psycopg.pq.TransactionStatus.INERROR
    else:
        aborted = False
    return aborted or getattr(conn, "needs_rollback", False) is True


def aborted_error() -> BarrierDatabaseError:
    """The error for a transaction the business code left aborted (refused before COMMIT)."""
    return BarrierDatabaseError(
        "the transaction was aborted by a database error the business code caught; nothing is "
        "committed (let the error propagate, or roll back to a savepoint before going on)"
    )


def joined_transaction_error() -> DtmInvalidInput:
    """The error for a SQLAlchemy Connection/Session with a transaction open where the barrier must own its own."""
    return DtmInvalidInput(
        "the SQLAlchemy session or connection already has a transaction open (something used it before the "
        "handler, e.g. a dependency that read through it): the barrier would only release a savepoint and "
        "answer SUCCESS for work the caller may never commit; give the handler a session of its own, or "
        "commit or roll back first"
    )


def savepoint_plan(in_transaction: bool, join: bool) -> bool:
    """Whether the barrier on a SQLAlchemy Connection/Session runs in a savepoint of the caller's transaction.

    ``join`` is False where the barrier answers DTM itself right after the call (``@barrier``): a
    savepoint is not durable until the caller commits, so an open transaction is refused then
    (:func:`joined_transaction_error`) rather than answered SUCCESS for.
    """
    if in_transaction and not join:
        raise joined_transaction_error()
    return in_transaction


def rolled_back_error(where: Optional[Mapping[str, Any]] = None) -> BarrierDatabaseError:
    """The error for a MySQL transaction the server rolled back under the business code (refused before COMMIT)."""
    return BarrierDatabaseError(
        "the barrier row of this call is gone: the database rolled the whole transaction back (a deadlock, or a "
        "lock wait timeout with innodb_rollback_on_timeout) and the business code caught the error and went "
        "on; nothing is committed (let the error propagate)",
        **(where or {}),
    )


def restore_quietly(adapter: Any, restore: str) -> None:
    """Put the caller's autocommit mode back after a rollback (blocking adapter); a failure is logged:
    the rollback's outcome is what the caller gets, and a lost connection has no mode left to restore."""
    try:
        adapter.execute(restore, ())
    except Exception as exc:
        logger.warning("barrier: restoring the connection's autocommit mode failed: %s", exc)


# --- one call per connection at a time --------------------------------------------------------

# id(connection) -> (connection, owner, depth) while barrier calls run on it. The entry holds the
# connection itself, so its id cannot be reused meanwhile; entries live only as long as a call.
_claims: dict[int, tuple[Any, Any, int]] = {}
_claims_lock = threading.Lock()


def connection_in_use_error(conn: Any) -> DtmInvalidInput:
    """The error for a connection another barrier call (another thread or asyncio task) is using."""
    return DtmInvalidInput(
        f"the {type(conn).__module__}.{type(conn).__name__} is in use by another barrier call (another thread "
        "or asyncio task): one connection runs one transaction at a time, and two calls on it would share "
        "it; give the barrier a pool, engine or connection factory so that each call has a connection of its own"
    )


@contextlib.contextmanager
def claimed(conn: Any, owner: Any) -> Iterator[None]:
    """Hold ``conn`` for one barrier call of ``owner`` (a thread id, or an asyncio task) for the block.

    Entered without any I/O, so an asyncio caller holds the connection before its first await. A
    second call of another owner is refused (:func:`connection_in_use_error`) before it touches
    the connection; the same owner may nest calls (a barrier call inside a business function),
    which are sequential.
    """
    key = id(conn)
    with _claims_lock:
        held = _claims.get(key)
        if held is not None and held[1] != owner:
            raise connection_in_use_error(conn)
        _claims[key] = (conn, owner, held[2] + 1 if held is not None else 1)
    try:
        yield
    finally:
        with _claims_lock:
            _, _, depth = _claims[key]
            if depth > 1:
                _claims[key] = (conn, owner, depth - 1)
            else:
                del _claims[key]


def is_async_connection(conn: Any) -> bool:
    """Whether ``conn`` is an asyncio driver's connection, pool, engine or session (awaited calls)."""
    return object_kind(conn) == ASYNC


# --- adapters ---------------------------------------------------------------------------------


class _Adapter:
    """One way of running the barrier's statements in a local transaction."""

    dialect: str
    conn: Any
    driver: str = ""
    restore_sql = ""
    """MySQL: the statement putting the caller's autocommit mode back, pending until the call ends."""
    last_id: Optional[int] = None
    """MySQL: ``lastrowid`` of the last :meth:`execute` (the id of the row an INSERT created, else 0)."""

    def begin(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        raise NotImplementedError

    def rollback(self) -> None:
        raise NotImplementedError

    def execute(self, sql: str, params: tuple[str, ...]) -> int:
        """Run ``sql`` (``%s`` placeholders) and return ``cursor.rowcount``."""
        raise NotImplementedError

    def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def fetch_one(self, sql: str, params: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
        rows = self.fetch_all(sql, params)
        return rows[0] if rows else None

    def dbapi_connection(self) -> Any:
        """The driver's own connection behind this adapter (inside the barrier's transaction)."""
        return self.conn

    def refuse_aborted(self) -> None:
        """Before COMMIT: refuse a PostgreSQL transaction the business code left aborted.

        A database error the business code caught and swallowed aborts a PostgreSQL transaction, and
        psycopg then turns COMMIT into a silent ROLLBACK: the barrier would answer SUCCESS for work
        (and barrier rows) that never committed, and DTM would never call again.
        """
        if is_aborted(self.dbapi_connection(), self.conn):  # Django marks it too
            raise aborted_error()

    def target(self) -> tuple[str, ...]:
        """Which database this connection talks to, for the once-per-target table check."""
        return raw_target(self.driver, self.conn)

    owns_commit = False
    """Whether the barrier sends its COMMIT itself (a plain driver connection), so that a statement
    that checks and commits (:meth:`commit_by`) can stand in for it; SQLAlchemy and Django commit
    through their own transaction objects."""

    def commit_by(self, sql: str, params: tuple[Any, ...]) -> None:
        """Commit by running ``sql``, a statement that ends the transaction itself (see :attr:`owns_commit`)."""
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
        if self.driver in _PG_DRIVERS:
            refuse_pipeline(self.conn)
            if begin_plan(True, self._in_transaction(), bool(self.conn.autocommit)) == AUTOCOMMIT_OFF:
                self._restore_autocommit = True
                self.conn.autocommit = False
            return  # psycopg opens the transaction with the first statement
        unknown = self.driver not in _DRIVERS and not hasattr(self.conn, "begin")
        if unknown and not hasattr(self.conn, "start_transaction"):
            # A driver we do not know, without a transaction API: it may commit on its own (client-side
            # autocommit), whatever the server's mode.
            raise self._cannot_begin()
        if self.dialect == MYSQL:
            plan = begin_plan(False, self._in_transaction(), mysql_autocommit(self.conn))
            off, restore = mysql_autocommit_switch(plan)
            if off:
                self.execute(off, ())
                self.restore_sql = restore
            return  # with autocommit off, the first statement opens the transaction
        # Another DB-API driver given dialect='postgres': its own BEGIN.
        if hasattr(self.conn, "begin"):
            self.conn.begin()
        else:
            self.conn.start_transaction()

    def _cannot_begin(self) -> DtmInvalidInput:
        return DtmInvalidInput(
            f"cannot open a transaction on a {type(self.conn).__module__}.{type(self.conn).__name__} "
            "connection: use PyMySQL, MySQLdb, mysql-connector, psycopg2 or psycopg, or a SQLAlchemy "
            "Connection/Session"
        )

    def _done(self) -> None:
        if self._restore_autocommit is not None:
            self.conn.autocommit = self._restore_autocommit
            self._restore_autocommit = None

    def commit(self) -> None:
        self.refuse_aborted()
        if self.restore_sql:
            self.execute(self.restore_sql, ())  # commits, and the caller's autocommit mode is back
        else:
            self.conn.commit()
        self.restore_sql = ""  # a failure above leaves it for the rollback that follows
        self._done()

    owns_commit = True

    def commit_by(self, sql: str, params: tuple[Any, ...]) -> None:
        """Run ``sql``; it includes :attr:`restore_sql` after its COMMIT (see :func:`checked_commit_sql`)."""
        self.refuse_aborted()
        self.execute(sql, params)
        self.restore_sql = ""
        self._done()

    def rollback(self) -> None:
        try:
            self.conn.rollback()
        finally:
            if not getattr(self.conn, "closed", False):
                self._done()
                restore, self.restore_sql = self.restore_sql, ""
                if restore:
                    restore_quietly(self, restore)

    def execute(self, sql: str, params: tuple[str, ...]) -> int:
        cur = self.conn.cursor()
        try:
            cur.execute(sql, params)
            self.last_id = getattr(cur, "lastrowid", None) if self.dialect == MYSQL else None
            return int(cur.rowcount)
        finally:
            cur.close()

    def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        cur = self.conn.cursor()
        try:
            cur.execute(sql, params)
            return [row_values(row) for row in cur.fetchall()]
        finally:
            cur.close()

    def fetch_one(self, sql: str, params: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
        cur = self.conn.cursor()
        try:
            cur.execute(sql, params)
            row = cur.fetchone()
            return row_values(row) if row is not None else None
        finally:
            cur.close()


def _to_named(sql: str) -> str:
    count = iter(range(100))
    return re.sub(r"%s", lambda _m: f":p{next(count)}", sql)


class _SqlAlchemyAdapter(_Adapter):
    """A SQLAlchemy Connection or Session: join its transaction through a savepoint, or own one."""

    def __init__(self, conn: Any, dialect: Optional[str], join: bool = True, atomic: bool = True) -> None:
        self.conn = conn
        self._bind = conn.get_bind() if hasattr(conn, "get_bind") else conn  # Session -> its Engine/Connection
        self.dialect = normalize_dialect(dialect or self._bind.dialect.name)
        self.join = join
        self.atomic = atomic
        self._trans: Any = None

    def begin(self) -> None:
        # In AUTOCOMMIT mode begin() opens nothing on the database and every statement commits alone.
        if savepoint_plan(self.conn.in_transaction(), self.join):
            self._refuse_autocommit()
            self._trans = self.conn.begin_nested()
            return
        self._trans = self.conn.begin()  # sends nothing yet: a Session's connection() needs it first
        try:
            self._refuse_autocommit()
        except BaseException:
            self._trans.rollback()
            raise

    def _refuse_autocommit(self) -> None:
        if self.atomic and dbapi_autocommit(self.dbapi_connection(), self._bind.dialect):
            raise autocommit_refused()

    def commit(self) -> None:
        self.refuse_aborted()
        self._trans.commit()

    def rollback(self) -> None:
        self._trans.rollback()

    def dbapi_connection(self) -> Any:
        sa_conn = self.conn.connection() if hasattr(self.conn, "get_bind") else self.conn  # Session -> Connection
        return sa_conn.connection.dbapi_connection

    def target(self) -> tuple[str, ...]:
        return ("sqlalchemy", repr(self._bind.engine.url))

    def execute(self, sql: str, params: tuple[str, ...]) -> int:
        from sqlalchemy import text

        result = self.conn.execute(text(_to_named(sql)), {f"p{i}": v for i, v in enumerate(params)})
        self.last_id = getattr(result, "lastrowid", None) if self.dialect == MYSQL else None
        return int(result.rowcount)

    def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        from sqlalchemy import text

        result = self.conn.execute(text(_to_named(sql)), {f"p{i}": v for i, v in enumerate(params)})
        return [tuple(row) for row in result.fetchall()]


class _DjangoAdapter(_Adapter):
    """A Django connection: runs inside ``transaction.atomic`` (a savepoint when already in one)."""

    def __init__(self, conn: Any, dialect: Optional[str], join: bool = True) -> None:
        from django.db import connections

        self.conn = connections[conn.alias]
        self.dialect = normalize_dialect(dialect or self.conn.vendor)
        self.join = join
        self._atomic: Any = None

    def begin(self) -> None:
        from django.db import transaction

        in_atomic = bool(self.conn.in_atomic_block)
        # Autocommit turned off by hand: Django's atomic() then commits nothing on exit, whether the block
        # is the barrier's own or an outer one entered after set_autocommit(False) (commit_on_exit False).
        if not self.conn.get_autocommit() and not (in_atomic and self.conn.commit_on_exit):
            raise django_transaction_error(False)
        if in_atomic and not self.join:
            raise django_transaction_error(True)
        self._atomic = transaction.atomic(using=self.conn.alias)
        self._atomic.__enter__()

    def commit(self) -> None:
        self.refuse_aborted()
        atomic, self._atomic = self._atomic, None
        atomic.__exit__(None, None, None)

    def rollback(self) -> None:
        # A failed commit has already left the atomic block (Django rolls the savepoint back itself);
        # exiting it again would pop the caller's enclosing atomic block and roll back its work.
        atomic, self._atomic = self._atomic, None
        if atomic is not None:
            atomic.__exit__(DtmError, DtmError("barrier rollback"), None)

    def dbapi_connection(self) -> Any:
        return self.conn.connection

    def target(self) -> tuple[str, ...]:
        return ("django", str(self.conn.alias))

    def execute(self, sql: str, params: tuple[str, ...]) -> int:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            self.last_id = getattr(cur, "lastrowid", None) if self.dialect == MYSQL else None
            return int(cur.rowcount)

    def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return [row_values(row) for row in cur.fetchall()]


def detect_dialect(conn: Any) -> str:
    """``mysql`` or ``postgres`` from a DB-API, SQLAlchemy or Django connection."""
    return adapt(conn, None).dialect


def adapt(conn: Any, dialect: Optional[str], join: bool = True, atomic: bool = True) -> _Adapter:
    """The adapter for ``conn``; ``dialect`` overrides detection (needed for unknown DB-API drivers).

    ``join=False`` refuses a SQLAlchemy Connection/Session with a transaction open (see :func:`savepoint_plan`)
    and a Django connection inside an atomic block. ``atomic=False`` (msg ``query_prepared``, whose statements
    each commit on their own there) accepts a SQLAlchemy connection in AUTOCOMMIT mode, which the barrier's own
    transaction refuses. A Django connection with autocommit turned off by hand is refused either way: nothing
    would commit what the call wrote.
    """
    module = type(conn).__module__
    top = module.split(".")[0]
    if is_async_connection(conn):
        raise DtmInvalidInput(
            f"{module}.{type(conn).__name__} is an asyncio connection: the blocking barrier cannot await it; "
            "use dtmcli.asyncio.BranchBarrier (await bb.call(conn, busi))"
        )
    if top == "sqlalchemy":
        return _SqlAlchemyAdapter(conn, dialect, join, atomic)
    if top == "django":
        return _DjangoAdapter(conn, dialect, join)
    if top in _MYSQL_DRIVERS:
        return _DbApiAdapter(conn, normalize_dialect(dialect or MYSQL))
    if top in _PG_DRIVERS:
        return _DbApiAdapter(conn, normalize_dialect(dialect or POSTGRES))
    if dialect is not None and hasattr(conn, "cursor") and hasattr(conn, "commit"):
        return _DbApiAdapter(conn, normalize_dialect(dialect))
    raise DtmInvalidInput(
        f"cannot tell the SQL dialect of a {module}.{type(conn).__name__}; pass dialect='mysql' or 'postgres'"
    )


# --- connection character set (MySQL) ------------------------------------------------------------

# Character sets of connections whose driver does not expose it, read once per connection object.
_charsets: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def connection_charset(adapter: _Adapter) -> str:
    """The character set of a MySQL connection (``utf8mb4``, ``utf8``, ``latin1`` ...), lower case.

    PyMySQL, mysqlclient and aiomysql (``character_set_name()``) and mysql-connector (``charset``)
    tell it without a round trip; for other drivers ``@@character_set_connection`` is read once per
    connection.
    """
    return _flow.run(charset_flow(adapter), adapter)


def charset_flow(adapter: Any) -> Flow[str]:
    """:func:`connection_charset` as a flow over ``adapter`` (blocking or asyncio): may yield one ``fetch_one``."""
    raw = adapter.dbapi_connection()
    name = getattr(raw, "character_set_name", None)
    if callable(name):
        return _text(name()).lower()
    charset = getattr(raw, "charset", None)
    if isinstance(charset, str):
        return charset.lower()
    try:
        return _charsets[raw]
    except (KeyError, TypeError):  # TypeError: the connection cannot be weakly referenced
        pass
    row = yield StoreOp("fetch_one", "select @@character_set_connection", ())
    value = _text(row[0]).lower() if row else ""
    with contextlib.suppress(TypeError):
        _charsets[raw] = value
    return value


def require_utf8mb4(adapter: _Adapter, where: Optional[dict[str, Any]] = None) -> None:
    """Refuse a MySQL connection whose character set is not utf8mb4 (see :func:`require_utf8mb4_flow`)."""
    _flow.run(require_utf8mb4_flow(adapter, where), adapter)


def require_utf8mb4_flow(adapter: Any, where: Optional[Mapping[str, Any]] = None) -> Flow[None]:
    """Refuse a MySQL connection whose character set is not utf8mb4 (BarrierDatabaseError).

    Over such a connection (``utf8`` = utf8mb3 cannot hold characters beyond U+FFFF) the server turns
    a character it cannot convert into ``?`` and INSERT IGNORE keeps only a warning: two distinct
    gids would then share barrier rows and the second transaction's business effect would be
    skipped as a duplicate. DTM passes any non-control character in a gid, so refuse up front.
    """
    if adapter.dialect != MYSQL:
        return
    charset = yield from charset_flow(adapter)
    if charset == "utf8mb4":
        return
    raise BarrierDatabaseError(
        f"the MySQL connection's character set is {charset or 'unknown'!r}, not utf8mb4: ids with characters "
        "it cannot hold would be stored as '?' and distinct transactions would share barrier rows; connect "
        "with charset utf8mb4 (e.g. pymysql.connect(..., charset='utf8mb4'))",
        **(where or {}),
    )


# --- connection sources -------------------------------------------------------------------------


def _is_factory(db: Any) -> bool:
    return callable(db) and not hasattr(db, "cursor") and not hasattr(db, "execute")


@contextlib.contextmanager
def connection_from(db: Any) -> Iterator[Any]:
    """The one place that turns every accepted database source into a connection for one call.

    ``db`` is a connection (DB-API, SQLAlchemy Connection/Session or Django connection: used as
    is), a SQLAlchemy Engine (a connection is checked out and returned), ``"django"`` /
    ``"django:<alias>"`` (that Django connection), or a zero-argument factory such as a pool's
    ``connection`` (called, and the connection closed afterwards; for pools, close returns it).
    """
    if isinstance(db, str):
        if is_django_source(db):
            yield _django_connection(db)
            return
        raise DtmInvalidInput(f"db {db!r}: pass a connection, factory, engine, 'django' or 'django:<alias>'")
    if _is_factory(db):
        conn = db()
        try:
            yield conn
        finally:
            conn.close()
        return
    if type(db).__module__.startswith("sqlalchemy") and hasattr(db, "connect") and hasattr(db, "dispose"):
        with db.connect() as sa_conn:
            yield sa_conn
        return
    yield db


def raw_target(driver: str, conn: Any) -> tuple[str, ...]:
    """Which database a plain driver connection talks to (host, port, database), from its attributes."""
    info = getattr(conn, "info", None)
    if info is not None and hasattr(info, "dbname"):  # psycopg2 >= 2.8, psycopg 3
        return (driver, str(info.host), str(info.port), str(info.dbname))
    return (driver, str(getattr(conn, "host", "")), str(getattr(conn, "port", "")),
            _text(getattr(conn, "db", "") or ""))


def mariadb_version(raw: Any) -> Optional[tuple[int, int]]:
    """``(major, minor)`` of the MariaDB server behind a MySQL driver connection, ``None`` for MySQL or unknown.

    Read from the version the server sent in its handshake (PyMySQL, aiomysql, mysqlclient and
    mysql-connector keep it on the connection, and a reconnect replaces it): no round trip, nothing cached.
    """
    try:
        text = _server_info(raw)
    except Exception:  # a closed connection, an unknown driver: no MariaDB-only statements
        return None
    if "mariadb" not in text.lower():
        return None
    # MariaDB 10+ announces itself as "5.5.5-10.11.6-MariaDB..." to old clients.
    match = re.match(r"(?:5\.5\.5-)?(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _server_info(raw: Any) -> str:
    """The handshake's version string: mysql-connector's ``server_info`` property (its
    ``get_server_info()`` is deprecated and warns), PyMySQL/aiomysql ``server_version``, else
    ``get_server_info()`` (mysqlclient)."""
    for name in ("server_info", "server_version"):
        value = getattr(raw, name, None)
        if isinstance(value, (str, bytes, bytearray)):
            return _text(value)
    info = getattr(raw, "get_server_info", None)
    return _text(info()) if callable(info) else ""


def row_values(row: Any) -> tuple[Any, ...]:
    """A fetched row as the tuple of its values, whatever the connection's row type.

    A connection made with a dict-row cursor (PyMySQL ``DictCursor``, psycopg2 ``RealDictCursor``,
    psycopg ``dict_row``) returns mappings, whose ``tuple()`` is the column names: the barrier would
    read ``'reason'`` as the stored reason (query_prepared then answered SUCCESS for a msg never
    committed) and ``'op'`` as the op an insert returned.
    """
    return tuple(row.values()) if isinstance(row, Mapping) else tuple(row)


def _text(value: Any) -> str:
    """A driver value as str (some drivers return bytes for names and versions)."""
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)
