"""The asyncio SQL barrier: async drivers' transaction adapters and the store driving the shared flows.

Every decision is the blocking barrier's: the barrier flow (:func:`dtmcli._barrier.core.barrier_flow`),
the msg check (:func:`~dtmcli._barrier.core.prepared_flow`), the SQL store's statements and steps
(:class:`dtmcli._barrier.sql.SqlStoreBase`), the error mapping, :func:`~dtmcli._barrier.sql_conn.begin_plan`,
the utf8mb4 and aborted-transaction guards. What is here only performs I/O: one adapter per driver
family (asyncpg, psycopg 3 ``AsyncConnection``, aiomysql, SQLAlchemy ``AsyncConnection`` /
``AsyncSession``), :func:`connection_from` for pools, engines and factories, and the store, which
awaits the flows and shields the steps that must finish (open, rollback) from cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from typing import Any, AsyncIterator, Callable, Optional

from .. import _flow
from .._barrier.core import DEFAULT_TABLE, BarrierIdentity, Decision, arun_barrier, prepared_flow, validate_table
from .._barrier.sql import SqlStoreBase, msg_where, numbered
from .._barrier.sql_conn import (
    AUTOCOMMIT_OFF,
    MYSQL,
    POSTGRES,
    _driver_error,
    _error_code,
    _is_factory,
    _to_named,
    aborted_error,
    autocommit_refused,
    begin_plan,
    claimed,
    dbapi_autocommit,
    is_aborted,
    mysql_autocommit_switch,
    normalize_dialect,
    raw_target,
    refuse_pipeline,
    row_values,
    savepoint_plan,
)
from .._dbkind import SYNC, kind_of
from ..errors import DtmInvalidInput
from ._barrier_common import shielded

__all__ = ["adapt", "barrier_call", "connection_from", "query_prepared", "source_shape", "terminate"]

logger = logging.getLogger("dtmcli")

_IN_FAILED_TRANSACTION = "25P02"


class _AsyncAdapter:
    """One way of running the barrier's statements in a local transaction, awaited."""

    dialect: str
    conn: Any
    driver: str = ""
    busi_ran = False
    """Set when the business function ran in this transaction (asyncpg then checks it before COMMIT)."""
    owns_commit = False
    """Whether a statement that checks and commits (:meth:`commit_by`) can stand in for the COMMIT."""
    restore_sql = ""
    """MySQL: the statement putting the caller's autocommit mode back, pending until the call ends."""
    last_id: Optional[int] = None
    """MySQL: ``lastrowid`` of the last :meth:`execute` (the id of the row an INSERT created, else 0)."""

    async def commit_by(self, sql: str, params: tuple[Any, ...]) -> None:
        """Commit by running ``sql``, a statement that ends the transaction itself."""
        raise NotImplementedError

    async def begin(self) -> None:
        raise NotImplementedError

    async def commit(self) -> None:
        raise NotImplementedError

    async def rollback(self) -> None:
        raise NotImplementedError

    async def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run ``sql`` (``%s`` placeholders) and return the number of rows it changed."""
        raise NotImplementedError

    async def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def fetch_one(self, sql: str, params: tuple[Any, ...]) -> Optional[tuple[Any, ...]]:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None

    def dbapi_connection(self) -> Any:
        """The driver's own connection behind this adapter (inside the barrier's transaction)."""
        return self.conn

    def abort(self) -> None:
        """Close the driver connection at once, without a round trip (a cancelled call whose database
        does not answer): the server rolls the transaction back, and pools discard the connection."""
        raw = self.dbapi_connection()
        if raw is not None:
            terminate(raw)

    def target(self) -> tuple[str, ...]:
        """Which database this connection talks to, for the once-per-target table check."""
        return raw_target(self.driver, self.conn)

    async def refuse_aborted(self) -> None:
        """Before COMMIT: refuse a PostgreSQL transaction the business code left aborted.

        psycopg tells the state without a round trip (:func:`~dtmcli._barrier.sql_conn.is_aborted`).
        asyncpg does not expose it, and its COMMIT of an aborted transaction is a silent ROLLBACK
        too: when the business function ran, one ``select 1`` finds out (PostgreSQL refuses it with
        SQLSTATE 25P02 in an aborted transaction).
        """
        raw = self.dbapi_connection()
        if is_aborted(raw, self.conn):
            raise aborted_error()
        if self.busi_ran and type(raw).__module__.split(".")[0] == "asyncpg":
            try:
                await self.fetch_all("select 1", ())
            except Exception as exc:
                err = _driver_error(exc)
                if err is not None and _error_code(err) == _IN_FAILED_TRANSACTION:
                    raise aborted_error() from exc
                raise


class _AsyncpgAdapter(_AsyncAdapter):
    """An asyncpg connection (or a pool's proxy of one): the barrier's transaction is an asyncpg
    ``Transaction``, so ``conn.transaction()`` inside the business function nests as a savepoint."""

    dialect = POSTGRES
    driver = "asyncpg"

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._tr: Any = None

    async def begin(self) -> None:
        begin_plan(True, self.conn.is_in_transaction(), True)  # asyncpg autocommits outside a transaction block
        self._tr = self.conn.transaction()
        await self._tr.start()

    async def commit(self) -> None:
        await self.refuse_aborted()
        await self._tr.commit()

    async def rollback(self) -> None:
        # A closed connection's transaction ended with it; a failed COMMIT left none to roll back.
        if self._tr is not None and not self.conn.is_closed() and self.conn.is_in_transaction():
            await self._tr.rollback()

    def target(self) -> tuple[str, ...]:
        # asyncpg exposes neither address nor database publicly; this key only spares repeated table checks.
        params = getattr(self.conn, "_params", None)
        return (self.driver, str(getattr(self.conn, "_addr", "")), str(getattr(params, "database", "")))

    async def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        status = await self.conn.execute(numbered(sql), *params)
        last = str(status).rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else -1

    async def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self.conn.fetch(numbered(sql), *params)]


class _PsycopgAdapter(_AsyncAdapter):
    """A psycopg 3 ``AsyncConnection``: as the blocking psycopg adapter, awaited."""

    dialect = POSTGRES
    driver = "psycopg"

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self._restore_autocommit = False

    async def begin(self) -> None:
        refuse_pipeline(self.conn)
        in_transaction = int(self.conn.info.transaction_status) != 0  # pq.TransactionStatus.IDLE
        if begin_plan(True, in_transaction, bool(self.conn.autocommit)) == AUTOCOMMIT_OFF:
            await self.conn.set_autocommit(False)
            self._restore_autocommit = True
        # otherwise psycopg opens the transaction with the first statement

    async def _done(self) -> None:
        if self._restore_autocommit and not self.conn.closed:
            self._restore_autocommit = False
            await self.conn.set_autocommit(True)

    async def commit(self) -> None:
        await self.refuse_aborted()
        await self.conn.commit()
        await self._done()

    async def rollback(self) -> None:
        if self.conn.closed:  # lost or closed: its transaction ended with it
            return
        try:
            await self.conn.rollback()
        finally:
            await self._done()

    async def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        async with self.conn.cursor() as cur:
            await cur.execute(sql, params)
            return int(cur.rowcount)

    async def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        async with self.conn.cursor() as cur:
            await cur.execute(sql, params)
            return [row_values(row) for row in await cur.fetchall()]


@functools.lru_cache(maxsize=1)
def _quiet_cursor() -> Any:
    """An aiomysql cursor class that does not fetch the server's warnings.

    aiomysql answers every statement with warnings by a ``SHOW WARNINGS`` round trip and a Python
    warning; the barrier's INSERT IGNORE of an existing row always has one (duplicate entry), which
    is its normal answer, not news.
    """
    import aiomysql

    class QuietCursor(aiomysql.Cursor):  # type: ignore[misc]
        async def _show_warnings(self, conn: Any) -> None:
            return None

    return QuietCursor


class _AiomysqlAdapter(_AsyncAdapter):
    """An aiomysql connection: as the blocking PyMySQL adapter, awaited.

    aiomysql closes a connection whose statement was cancelled; the server then rolls its
    transaction back, so the rollback of a closed connection has nothing left to do.
    """

    dialect = MYSQL
    driver = "aiomysql"

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    async def begin(self) -> None:
        plan = begin_plan(False, bool(self.conn.get_transaction_status()), bool(self.conn.get_autocommit()))
        off, restore = mysql_autocommit_switch(plan)  # as the blocking adapter (autocommit off for the call)
        if off:
            await self.execute(off, ())
            self.restore_sql = restore

    async def commit(self) -> None:
        if self.restore_sql:
            await self.execute(self.restore_sql, ())  # commits, and the caller's autocommit mode is back
        else:
            await self.conn.commit()
        self.restore_sql = ""  # a failure above leaves it for the rollback that follows

    owns_commit = True

    async def commit_by(self, sql: str, params: tuple[Any, ...]) -> None:
        await self.execute(sql, params)  # ``sql`` restores the autocommit mode after its COMMIT
        self.restore_sql = ""

    async def rollback(self) -> None:
        if self.conn.closed:  # closed: the server rolled back, and the session (and its mode) is gone
            return
        await self.conn.rollback()
        restore, self.restore_sql = self.restore_sql, ""
        if restore:
            try:
                await self.execute(restore, ())
            except Exception as exc:
                logger.warning("barrier: restoring the connection's autocommit mode failed: %s", exc)

    async def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        cur = await self.conn.cursor(_quiet_cursor())
        try:
            await cur.execute(sql, params)
            self.last_id = cur.lastrowid
            return int(cur.rowcount)
        finally:
            await cur.close()

    async def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        cur = await self.conn.cursor(_quiet_cursor())
        try:
            await cur.execute(sql, params)
            return [tuple(row) for row in await cur.fetchall()]
        finally:
            await cur.close()


class _SqlAlchemyAdapter(_AsyncAdapter):
    """A SQLAlchemy ``AsyncConnection`` or ``AsyncSession``: join its transaction through a savepoint, or own one."""

    def __init__(self, conn: Any, dialect: Optional[str], join: bool = True, atomic: bool = True) -> None:
        self.conn = conn
        self.atomic = atomic
        self._session = hasattr(conn, "sync_session")
        self._bind = conn.sync_session.get_bind() if self._session else conn
        self.dialect = normalize_dialect(dialect or self._bind.dialect.name)
        self.join = join
        self._trans: Any = None
        self._raw: Any = None

    async def begin(self) -> None:
        # In AUTOCOMMIT mode begin() opens nothing on the database and every statement commits alone.
        if savepoint_plan(self.conn.in_transaction(), self.join):
            await self._take_connection()
            self._trans = await self.conn.begin_nested()
            return
        self._trans = await self.conn.begin()  # sends nothing yet: a session's connection() needs it first
        try:
            await self._take_connection()
        except BaseException:
            await self._trans.rollback()
            raise

    async def _take_connection(self) -> None:
        """Keep the driver connection (for :meth:`dbapi_connection`); refuse one in AUTOCOMMIT mode."""
        sa_conn = await self.conn.connection() if self._session else self.conn
        pooled = sa_conn.sync_connection.connection
        self._raw = pooled.driver_connection
        if self.atomic and dbapi_autocommit(pooled.dbapi_connection, self._bind.dialect):
            raise autocommit_refused()

    async def commit(self) -> None:
        await self.refuse_aborted()
        await self._trans.commit()

    async def rollback(self) -> None:
        if self._trans is not None:
            await self._trans.rollback()

    def dbapi_connection(self) -> Any:
        return self._raw

    def target(self) -> tuple[str, ...]:
        return ("sqlalchemy", repr(self._bind.engine.url))

    async def _run(self, sql: str, params: tuple[Any, ...]) -> Any:
        from sqlalchemy import text

        return await self.conn.execute(text(_to_named(sql)), {f"p{i}": v for i, v in enumerate(params)})

    async def execute(self, sql: str, params: tuple[Any, ...]) -> int:
        result = await self._run(sql, params)
        self.last_id = getattr(result, "lastrowid", None) if self.dialect == MYSQL else None
        return int(result.rowcount)

    async def fetch_all(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in (await self._run(sql, params)).fetchall()]


def adapt(conn: Any, dialect: Optional[str], join: bool = True, atomic: bool = True) -> _AsyncAdapter:
    """The asyncio adapter for ``conn``; a blocking connection is refused (DtmInvalidInput) before any I/O.

    ``join=False`` refuses a SQLAlchemy AsyncConnection/AsyncSession with a transaction open
    (:func:`~dtmcli._barrier.sql_conn.savepoint_plan`); ``atomic=False`` (msg ``query_prepared``) accepts
    one in AUTOCOMMIT mode.
    """
    module, name = type(conn).__module__, type(conn).__name__
    top = module.split(".")[0]
    if top == "asyncpg":
        adapter: _AsyncAdapter = _AsyncpgAdapter(conn)
    elif top == "aiomysql":
        adapter = _AiomysqlAdapter(conn)
    elif top == "psycopg" and name.startswith("Async"):
        adapter = _PsycopgAdapter(conn)
    elif module.startswith("sqlalchemy.ext.asyncio"):
        return _SqlAlchemyAdapter(conn, dialect, join, atomic)
    elif kind_of(module, name) == SYNC:
        raise DtmInvalidInput(
            f"{module}.{name} is a blocking connection: the asyncio barrier would block the event loop on it; "
            "use an async driver (asyncpg, aiomysql, psycopg AsyncConnection, SQLAlchemy async) or "
            "dtmcli.barrier.BranchBarrier"
        )
    else:
        raise DtmInvalidInput(
            f"the asyncio barrier cannot use a {module}.{name}: pass an asyncpg, aiomysql, psycopg "
            "AsyncConnection or SQLAlchemy AsyncConnection/AsyncSession connection (or a pool, engine or factory)"
        )
    if dialect is not None and normalize_dialect(dialect) != adapter.dialect:
        raise DtmInvalidInput(f"dialect {dialect!r} does not match the {adapter.driver} connection ({adapter.dialect})")
    return adapter


def terminate(raw: Any) -> None:
    """Close an asyncpg, aiomysql or psycopg async connection at once, without a round trip."""
    top = type(raw).__module__.split(".")[0]
    if top == "asyncpg":
        raw.terminate()
    elif top == "aiomysql":
        raw.close()  # closes the transport; no QUIT is sent
    elif top == "psycopg" and not raw.closed:
        raw.pgconn.finish()


async def _close(conn: Any) -> None:
    closing = conn.close()
    if inspect.isawaitable(closing):
        await closing


ENGINE, POOL, FACTORY, SINGLE = "engine", "pool", "factory", "single"


def source_shape(db: Any) -> str:
    """How :func:`connection_from` gets a connection from ``db``: ``engine`` (a SQLAlchemy ``AsyncEngine``),
    ``pool`` (asyncpg/aiomysql), ``factory`` (called per call) or ``single`` (a connection or session
    used as it is, by every call given it)."""
    module = type(db).__module__
    if module.startswith("sqlalchemy.ext.asyncio") and hasattr(db, "connect") and hasattr(db, "dispose"):
        return ENGINE
    if module.split(".")[0] in ("asyncpg", "aiomysql") and hasattr(db, "acquire") and hasattr(db, "release"):
        return POOL
    return FACTORY if _is_factory(db) else SINGLE


@contextlib.asynccontextmanager
async def connection_from(db: Any) -> AsyncIterator[Any]:
    """Every accepted async database source as a connection for one call (the async twin of
    :func:`dtmcli._barrier.sql_conn.connection_from`).

    ``db`` is a connection or session (used as is); a SQLAlchemy ``AsyncEngine`` (a connection is
    checked out and returned); an asyncpg or aiomysql pool (a connection is acquired and released);
    or a zero-argument factory (an ``async def``, a pool's ``acquire``, psycopg_pool's
    ``pool.connection``, ``functools.partial(asyncpg.connect, dsn)``, an ``async_sessionmaker``):
    what it returns is entered when it is an async context manager (released or closed by its
    exit), else awaited when awaitable, and the connection closed afterwards.
    """
    if isinstance(db, str):
        raise DtmInvalidInput(f"db {db!r}: the asyncio barrier takes a connection, pool, engine, session or factory")
    shape = source_shape(db)
    if shape == ENGINE:
        async with db.connect() as sa_conn:
            yield sa_conn
        return
    if shape == POOL:
        async with db.acquire() as pooled:
            yield pooled
        return
    if shape == FACTORY:
        made = db()
        if hasattr(made, "__aenter__") and not inspect.iscoroutine(made):
            async with made as entered:
                yield entered
            return
        conn = await made if inspect.isawaitable(made) else made
        try:
            yield conn
        except BaseException as exc:
            await shielded(_close(conn), abort=lambda: terminate(conn), cancelling=not isinstance(exc, Exception))
            raise
        await shielded(_close(conn), abort=lambda: terminate(conn))
        return
    yield db


class _AsyncSqlStore(SqlStoreBase):
    """The asyncio SQL store of :func:`~dtmcli._barrier.core.arun_barrier`: the shared steps, awaited."""

    adapter: _AsyncAdapter

    async def begin(self) -> None:
        await shielded(_flow.arun(self.begin_flow(), self.adapter), abort=self.adapter.abort)

    async def insert_if_absent(self, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str,
                               reason: str) -> int:
        affected = await self.adapter.execute(*self.insert_statement(trans_type, gid, branch_id, op, barrier_id,
                                                                     reason))
        self.note_insert((gid, branch_id, op, barrier_id), affected)
        return affected

    async def read_reason(self, gid: str, branch_id: str, op: str, barrier_id: str) -> Optional[str]:
        return await _flow.arun(self.reason_flow(gid, branch_id, op, barrier_id), self.adapter)

    async def insert_pair(self, trans_type: str, gid: str, branch_id: str, origin: str, op: str, barrier_id: str,
                          reason: str) -> tuple[int, int]:
        return await _flow.arun(self.insert_pair_flow(trans_type, gid, branch_id, origin, op, barrier_id, reason),
                                self.adapter)

    async def require_row(self, gid: str, branch_id: str, op: str, barrier_id: str) -> None:
        await _flow.arun(self.require_row_flow(gid, branch_id, op, barrier_id), self.adapter)

    async def commit(self) -> None:
        await _flow.arun(self.commit_flow(), self.adapter)

    async def rollback(self, cause: BaseException) -> None:
        # After a cancellation the rollback is bounded (CANCEL_GRACE): a database that stops answering
        # must not hold the cancelled call; the connection is then closed instead.
        await shielded(_flow.arun(self.rollback_flow(cause), self.adapter), abort=self.adapter.abort,
                       cancelling=not isinstance(cause, Exception))


def _where(barrier: BarrierIdentity) -> dict[str, Any]:
    return {"gid": barrier.gid, "branch_id": barrier.branch_id, "op": barrier.op}


async def barrier_call(
    conn: Any,
    barrier: BarrierIdentity,
    busi: Callable[[Any], Any],
    *,
    table: str = DEFAULT_TABLE,
    dialect: Optional[str] = None,
    on_decision: Optional[Callable[[Decision], None]] = None,
    join: bool = True,
) -> Any:
    """Await ``busi(conn)`` under the barrier in one local transaction (the blocking ``barrier_call``'s twin).

    A cancellation while a step or ``busi`` is awaited rolls the transaction back (the rollback
    runs to its end, or for at most :data:`~dtmcli.asyncio._barrier_common.CANCEL_GRACE` seconds,
    after which the connection is closed) and is re-raised. ``conn`` is held for the call, from
    before the first await: another task's call on it meanwhile is refused (DtmInvalidInput).
    """
    validate_table(table)
    adapter = adapt(conn, dialect, join)
    store = _AsyncSqlStore(conn, adapter, table, _where(barrier))

    async def run_busi(tx: Any) -> Any:
        adapter.busi_ran = True
        result = busi(tx)
        if inspect.isawaitable(result):
            result = await result
        return result

    with claimed(conn, asyncio.current_task()):
        return await arun_barrier(store, barrier, run_busi, on_decision)


async def query_prepared(
    db: Any, trans_type: str, gid: str, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None
) -> None:
    """The msg ``query_prepared`` check on an async database source; raises DtmFailure when rolled back."""
    validate_table(table)
    async with connection_from(db) as conn:
        store = _AsyncSqlStore(conn, adapt(conn, dialect, atomic=False), table, msg_where(gid))
        with claimed(conn, asyncio.current_task()):
            await _flow.arun(prepared_flow(store, trans_type, gid), store)
