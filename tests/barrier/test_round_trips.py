"""Round trips of one barrier call, per decision, per database and driver (issue 15, target 2).

Every connection goes through a TCP proxy that counts round trips: a burst of client bytes that
follows an answer of the server (or starts the connection) is one. The counts are pinned exactly,
so a round trip that comes back (an extra SELECT, a separate BEGIN, two INSERTs where one does)
fails here. The business function runs one statement when the barrier runs it.

Before this round (per call, business statement included): MariaDB/PyMySQL 4 for a first action
(INSERT, business, SELECT re-check, COMMIT), 3 for a null compensation (two INSERTs, COMMIT), 5 for
a compensation that runs; PostgreSQL/psycopg2 4, 4 and 5.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
from typing import Any, Awaitable, Callable, Iterator

import pytest
from conftest import EFFECT_TABLE, _prepare, execute, query_all
from services import MYSQL, POSTGRES, require

from dtmcli import DtmDuplicated, local_gid
from dtmcli._barrier import sql as barrier_sql
from dtmcli.asyncio.barrier import BranchBarrier as AsyncBarrier
from dtmcli.barrier import BarrierDatabaseError, BranchBarrier, Decision

GONE = "barrier row of this call is gone"


class TripCounter:
    """A TCP proxy to one server counting round trips over all its connections."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.trips = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        self._threads: list[threading.Thread] = []
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._start(self._pump, client, server)

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        client_turn = False  # whether the last bytes seen came from the client
        try:
            while not self._closed:
                ready, _, _ = select.select([client, server], [], [], 0.2)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is client:
                        if not client_turn:
                            with self._lock:  # counted before the bytes go on: the answer comes after
                                self.trips += 1
                            client_turn = True
                        server.sendall(data)
                    else:
                        client_turn = False
                        client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()

    def reset(self) -> None:
        with self._lock:
            self.trips = 0

    def close(self) -> None:
        self._closed = True
        self._listener.close()


@pytest.fixture(scope="module")
def mysql_proxy() -> Iterator[TripCounter]:
    require("mysql")
    _prepare("mysql")
    proxy = TripCounter(str(MYSQL["host"]), int(MYSQL["port"]))
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def pg_proxy() -> Iterator[TripCounter]:
    require("postgres")
    _prepare("postgres")
    proxy = TripCounter(str(POSTGRES["host"]), int(POSTGRES["port"]))
    yield proxy
    proxy.close()


# -- the scenarios: one per decision ------------------------------------------------------------------------------

def _busi_sql(gid: str, op: str) -> tuple[str, tuple[str, str]]:
    return f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)", (gid, op)


SCENARIOS = ("run", "null_compensation", "compensation_runs", "duplicate", "msg_duplicated")
# Uncounted runs of each scenario first: drivers prepare a statement server-side after some uses
# (psycopg 3 at the 5th, asyncpg at the first), a one-time trip that is not the barrier's.
WARM_UP = (False,) * 6


def _calls(scenario: str) -> tuple[list[tuple[str, str, str]], tuple[str, str, str, str]]:
    """(setup calls, the counted call): (trans_type, branch_id, op) and the counted call's expected decision."""
    if scenario == "run":
        return [], ("saga", "01", "action", "run")
    if scenario == "null_compensation":
        return [], ("saga", "01", "compensate", "null_compensation")
    if scenario == "compensation_runs":
        return [("saga", "01", "action")], ("saga", "01", "compensate", "run")
    if scenario == "duplicate":
        return [("saga", "01", "action")], ("saga", "01", "action", "duplicate")
    return [("msg", "00", "msg")], ("msg", "00", "msg", "msg_duplicated")


RunSql = Callable[[Any, str, tuple[Any, ...]], Any]


def _busi(run_sql: RunSql, gid: str, op: str) -> Callable[[Any], Any]:
    """The business function: one statement (awaitable when ``run_sql`` is async)."""
    return lambda tx: run_sql(tx, *_busi_sql(gid, op))


def count_sync(proxy: TripCounter, conn: Any, run_sql: RunSql) -> dict[str, int]:
    """Round trips of each scenario's counted call on ``conn`` (after uncounted warm-up runs)."""
    counts: dict[str, int] = {}
    for scenario in SCENARIOS:
        setup, (trans_type, branch, op, expected) = _calls(scenario)
        for counted in (*WARM_UP, True):
            gid = local_gid()
            for s_type, s_branch, s_op in setup:
                BranchBarrier(s_type, gid, s_branch, s_op).call(conn, _busi(run_sql, gid, s_op))
            bb = BranchBarrier(trans_type, gid, branch, op)
            proxy.reset()
            if expected == "msg_duplicated":
                with pytest.raises(DtmDuplicated):
                    bb.call(conn, _busi(run_sql, gid, op))
            else:
                bb.call(conn, _busi(run_sql, gid, op))
                assert bb.last_decision is Decision(expected)
            if counted:
                counts[scenario] = proxy.trips
    return counts


def count_async(proxy: TripCounter, connect: Callable[[], Awaitable[Any]], run_sql: RunSql) -> dict[str, int]:
    """:func:`count_sync` for the asyncio barrier, on a connection ``connect`` opens (closed after)."""

    async def body() -> dict[str, int]:
        conn = await connect()
        try:
            return await scenarios(conn)
        finally:
            closing = conn.close()
            if asyncio.iscoroutine(closing):
                await closing

    async def scenarios(conn: Any) -> dict[str, int]:
        counts: dict[str, int] = {}
        for scenario in SCENARIOS:
            setup, (trans_type, branch, op, expected) = _calls(scenario)
            for counted in (*WARM_UP, True):
                gid = local_gid()
                for s_type, s_branch, s_op in setup:
                    await AsyncBarrier(s_type, gid, s_branch, s_op).call(conn, _busi(run_sql, gid, s_op))
                bb = AsyncBarrier(trans_type, gid, branch, op)
                proxy.reset()
                if expected == "msg_duplicated":
                    with pytest.raises(DtmDuplicated):
                        await bb.call(conn, _busi(run_sql, gid, op))
                else:
                    await bb.call(conn, _busi(run_sql, gid, op))
                    assert bb.last_decision is Decision(expected)
                if counted:
                    counts[scenario] = proxy.trips
        return counts

    return asyncio.run(body())


def _expect(run: int, null: int, comp: int, dup: int, msg: int) -> dict[str, int]:
    return dict(zip(SCENARIOS, (run, null, comp, dup, msg)))


# MariaDB, plain driver connection: one INSERT (both rows of a compensation in one INSERT IGNORE ...
# RETURNING), the business statement, and the row check inside the COMMIT's statement.
MARIADB = _expect(run=3, null=2, comp=3, dup=2, msg=2)
# MySQL 8 (no RETURNING, no compound statements): two INSERTs for a compensation, a separate re-check.
MYSQL8 = _expect(run=4, null=3, comp=5, dup=2, msg=2)
# psycopg2 / psycopg: their own BEGIN, one INSERT (ON CONFLICT DO NOTHING RETURNING for two rows), COMMIT.
POSTGRES_COUNTS = _expect(run=4, null=3, comp=4, dup=3, msg=3)


# -- MariaDB ------------------------------------------------------------------------------------------------------

def _pymysql(proxy: TripCounter, autocommit: bool = False) -> Any:
    import pymysql

    return pymysql.connect(host="127.0.0.1", port=proxy.port, user=MYSQL["user"], password=MYSQL["password"],
                           database=MYSQL["database"], autocommit=autocommit, charset="utf8mb4")


def test_pymysql_on_mariadb(mysql_proxy: TripCounter) -> None:
    conn = _pymysql(mysql_proxy)
    try:
        assert count_sync(mysql_proxy, conn, execute) == MARIADB
    finally:
        conn.close()


def test_pymysql_on_mysql8_keeps_the_separate_statements(mysql_proxy: TripCounter) -> None:
    """A server that is not MariaDB (told by the handshake's version) gets two INSERTs and the SELECT re-check."""
    conn = _pymysql(mysql_proxy)
    conn.server_version = "8.0.36"  # what a MySQL 8 handshake says
    try:
        assert count_sync(mysql_proxy, conn, execute) == MYSQL8
    finally:
        conn.close()


def test_mariadb_before_10_5_has_no_insert_returning(mysql_proxy: TripCounter) -> None:
    conn = _pymysql(mysql_proxy)
    conn.server_version = "5.5.5-10.4.30-MariaDB"
    try:
        assert count_sync(mysql_proxy, conn, execute) == _expect(run=3, null=3, comp=4, dup=2, msg=2)
    finally:
        conn.close()


# An autocommit connection: the barrier turns autocommit off for the call (one statement, where a BEGIN was)
# and the statement putting it back is the COMMIT (inside the checked COMMIT when the business ran). Only the
# msg duplicate, which rolls back, pays one more: the ROLLBACK and the restore.
MARIADB_AUTOCOMMIT = _expect(run=4, null=3, comp=4, dup=3, msg=4)


def test_pymysql_autocommit_on_mariadb(mysql_proxy: TripCounter) -> None:
    conn = _pymysql(mysql_proxy, autocommit=True)
    try:
        assert count_sync(mysql_proxy, conn, execute) == MARIADB_AUTOCOMMIT
        assert conn.get_autocommit() is True
    finally:
        conn.close()


def test_sqlalchemy_on_mariadb_checks_the_row_separately(mysql_proxy: TripCounter) -> None:
    """SQLAlchemy commits through its own transaction object: the re-check stays a SELECT (one more trip)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(f"mysql+pymysql://{MYSQL['user']}@127.0.0.1:{mysql_proxy.port}/{MYSQL['database']}"
                           "?charset=utf8mb4")

    def run_sql(tx: Any, sql: str, params: tuple[Any, ...]) -> None:
        tx.execute(text(sql.replace("%s", ":a", 1).replace("%s", ":b", 1)), dict(zip("ab", params)))

    try:
        with engine.connect() as conn:
            assert count_sync(mysql_proxy, conn, run_sql) == _expect(run=4, null=2, comp=4, dup=2, msg=2)
    finally:
        engine.dispose()


@pytest.mark.parametrize("autocommit", [False, True])
def test_aiomysql_on_mariadb(mysql_proxy: TripCounter, autocommit: bool) -> None:
    import aiomysql

    async def run_sql(tx: Any, sql: str, params: tuple[Any, ...]) -> None:
        cur = await tx.cursor()
        await cur.execute(sql, params)
        await cur.close()

    async def connect() -> Any:
        return await aiomysql.connect(host="127.0.0.1", port=mysql_proxy.port, user=MYSQL["user"],
                                      password=MYSQL["password"], db=MYSQL["database"], autocommit=autocommit,
                                      charset="utf8mb4")

    assert count_async(mysql_proxy, connect, run_sql) == (MARIADB_AUTOCOMMIT if autocommit else MARIADB)


# -- PostgreSQL ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_blocking_postgres_drivers(pg_proxy: TripCounter, driver: str) -> None:
    kw = {"host": "127.0.0.1", "port": pg_proxy.port, "user": POSTGRES["user"], "dbname": POSTGRES["dbname"]}
    if driver == "psycopg2":
        import psycopg2

        conn = psycopg2.connect(**kw)
    else:
        import psycopg

        conn = psycopg.connect(**kw)
    try:
        assert count_sync(pg_proxy, conn, execute) == POSTGRES_COUNTS
    finally:
        conn.close()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg_async"])
def test_asyncio_postgres_drivers(pg_proxy: TripCounter, driver: str) -> None:
    from dtmcli._barrier.sql import numbered

    async def connect() -> Any:
        if driver == "asyncpg":
            import asyncpg

            return await asyncpg.connect(host="127.0.0.1", port=pg_proxy.port, user=POSTGRES["user"],
                                         database=POSTGRES["dbname"])
        import psycopg

        return await psycopg.AsyncConnection.connect(host="127.0.0.1", port=pg_proxy.port, user=POSTGRES["user"],
                                                     dbname=POSTGRES["dbname"])

    async def run_sql(tx: Any, sql: str, params: tuple[Any, ...]) -> None:
        if driver == "asyncpg":
            await tx.execute(numbered(sql), *params)
        else:
            async with tx.cursor() as cur:
                await cur.execute(sql, params)

    counts = count_async(pg_proxy, connect, run_sql)
    if driver == "asyncpg":  # asyncpg cannot tell an aborted transaction: one `select 1` before COMMIT
        assert counts == _expect(run=5, null=3, comp=5, dup=3, msg=3)
    else:
        assert counts == POSTGRES_COUNTS


# -- the row check inside MariaDB's COMMIT is as strong as the SELECT it replaces ---------------------------------

def _rolled_back_under_busi(conn: Any, gid: str) -> Callable[[Any], str]:
    def busi(tx: Any) -> str:
        execute(tx, *_busi_sql(gid, "before"))
        execute(tx, "rollback")  # what InnoDB does on a deadlock; the business code goes on
        execute(tx, *_busi_sql(gid, "after"))
        return "ok"

    return busi


def _rows(gid: str) -> tuple[list[Any], list[Any]]:
    from conftest import mysql_connect

    reader = mysql_connect()
    try:
        return (query_all(reader, f"select op from {EFFECT_TABLE} where gid = %s", (gid,)),
                query_all(reader, "select op from dtm_barrier.barrier where gid = %s", (gid,)))
    finally:
        reader.close()


@pytest.mark.parametrize("op", ["action", "compensate"])
def test_checked_commit_refuses_a_transaction_rolled_back_under_the_business(mysql_proxy: TripCounter,
                                                                            op: str) -> None:
    conn = _pymysql(mysql_proxy)
    gid = local_gid()
    try:
        # Uncounted: the once-per-(database, table) check runs on the first call through this proxy's
        # port, whichever test comes first (this one alone, or first under another order).
        BranchBarrier("saga", local_gid(), "01", "action").call(conn, lambda tx: None)
        if op == "compensate":
            BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: None)
        mysql_proxy.reset()
        with pytest.raises(BarrierDatabaseError, match=GONE):
            BranchBarrier("saga", gid, "01", op).call(conn, _rolled_back_under_busi(conn, gid))
        # INSERT, 3 business statements, the checked COMMIT (refused), ROLLBACK: no separate SELECT
        assert mysql_proxy.trips == 6
        effects, rows = _rows(gid)
        assert effects == [] and rows == ([("action",)] if op == "compensate" else [])
    finally:
        conn.close()


def test_a_server_refusing_the_compound_statement_falls_back_to_the_select(
    mysql_proxy: TripCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A parse error of the checked COMMIT (a server or sql_mode that does not know it): the separate
    check runs, the guard holds, and the connection keeps the separate check from then on."""
    monkeypatch.setattr(barrier_sql, "_checked_commit_sql", lambda table, by_id=False, restore="": (
        f"begin not atomic nonsense({', '.join(['%s'] * (5 if by_id else 4))}) {table}; end"))
    conn = _pymysql(mysql_proxy)
    gid = local_gid()
    try:
        with pytest.raises(BarrierDatabaseError, match=GONE):
            BranchBarrier("saga", gid, "01", "action").call(conn, _rolled_back_under_busi(conn, gid))
        assert _rows(gid) == ([], [])
        assert conn in barrier_sql._no_compound
        gid2 = local_gid()
        mysql_proxy.reset()
        bb = BranchBarrier("saga", gid2, "01", "action")
        bb.call(conn, lambda tx: execute(tx, *_busi_sql(gid2, "action")))
        assert bb.last_decision is Decision.RUN and mysql_proxy.trips == 4  # INSERT, business, SELECT, COMMIT
        assert _rows(gid2) == ([("action",)], [("action",)])
    finally:
        conn.close()


def test_other_errors_of_the_checked_commit_are_not_taken_for_a_rolled_back_transaction(
    mysql_proxy: TripCounter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the barrier's own SIGNAL means "row gone"; any other error of that statement is a commit failure."""
    monkeypatch.setattr(barrier_sql, "_checked_commit_sql", lambda table, by_id=False, restore="": (
        f"begin not atomic if {' or '.join(['%s is null'] * (5 if by_id else 4))} or 1 = 1 then signal sqlstate "
        "'45000' set message_text = 'something else'; end if; commit; end"))
    conn = _pymysql(mysql_proxy)
    gid = local_gid()
    try:
        with pytest.raises(BarrierDatabaseError, match=r"commit failed.*something else"):
            BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: execute(tx, *_busi_sql(gid, "a")))
        assert _rows(gid) == ([], [])
    finally:
        conn.close()


# -- the ops returned by the two-row INSERT are compared exactly ---------------------------------------------------

def test_returned_ops_are_compared_exactly() -> None:
    ops = barrier_sql._returned_ops
    assert ops([("action",), ("compensate",)], "action", "compensate") == (1, 1)
    assert ops([(b"compensate",)], "action", "compensate") == (0, 1)
    assert ops([], "try", "cancel") == (0, 0)
    assert ops([("try" + " " * 42,)], "try", "cancel") == (1, 0)  # a char(45) column pads
    for wrong in ([("Action",)], [("action ",), ("action",)], [("act",)], [("compensate\x00",)]):
        with pytest.raises(BarrierDatabaseError, match="unexpected ops"):
            ops(wrong, "action", "compensate")


def test_two_row_insert_returns_only_the_rows_it_inserted(mysql_proxy: TripCounter, pg_proxy: TripCounter) -> None:
    """The statement the decisions rest on, on both servers: RETURNING names exactly the new rows."""
    from conftest import mysql_connect, psycopg2_connect

    for connect, dialect in ((mysql_connect, "mysql"), (psycopg2_connect, "postgres")):
        conn = connect()
        try:
            gid = local_gid()
            sql = barrier_sql._insert_pair_sql(dialect, "dtm_barrier.barrier")
            params = ("tcc", gid, "01", "try", "01", "cancel", "tcc", gid, "01", "cancel", "01", "cancel")
            assert sorted(r[0] for r in _fetch(conn, sql, params)) == ["cancel", "try"]
            assert _fetch(conn, sql, params) == []
            gid2 = local_gid()
            execute(conn, barrier_sql._insert_sql(dialect, "dtm_barrier.barrier"),
                    ("tcc", gid2, "01", "try", "01", "try"))
            params2 = (*params[:1], gid2, *params[2:7], gid2, *params[8:])
            assert [r[0] for r in _fetch(conn, sql, params2)] == ["cancel"]
            conn.rollback()
        finally:
            conn.close()


def _fetch(conn: Any, sql: str, params: tuple[Any, ...]) -> list[Any]:
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
        return [tuple(r) for r in cur.fetchall()]
    finally:
        cur.close()
