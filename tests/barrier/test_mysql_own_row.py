"""MySQL/MariaDB: the barrier's transaction really holds the business work, and the row check at commit is
this call's own row (issue 15 target 2, review findings 1, 2, 4, 5).

1. A connection in autocommit mode used to get a BEGIN. InnoDB answers a deadlock by rolling the whole
   transaction back, which ends it; the session then went back to autocommit, so every business statement
   after a deadlock the business code caught committed on its own, before the barrier refused the call
   (and its message said "nothing is committed"). Each DTM retry committed it again. The barrier now turns
   autocommit off for the call and puts the caller's mode back on every path.
2. The row check at commit looked up the key. When the transaction was rolled back under the business code
   and a concurrent duplicate delivery of the same op (blocked on our row) then inserted the row, ran and
   committed, the check found that row and committed our post-rollback work too: the effect twice. The check
   is now by the id our INSERT created (MariaDB ``returning id, op``, else the INSERT's ``lastrowid``) and the
   key. A custom table without an ``id`` column keeps the key check (weaker: documented).
3. PostgreSQL has neither hole. An error aborts the transaction at once (its rows are gone and its locks
   released, so the duplicate delivery runs and commits meanwhile, exactly the MySQL interleaving), but the
   transaction block stays open in the failed state: every later statement of the business code fails
   (25P02) until the ROLLBACK, so nothing after the error can take effect, and the barrier refuses the
   aborted transaction before COMMIT. A connection in autocommit mode gets autocommit off for the call.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import warnings
from typing import Any

import pymysql
import pytest
from conftest import EFFECT_TABLE, _prepare, execute, mysql_connect, psycopg2_connect, query_all
from services import MYSQL, require

from dtmcli import DtmDuplicated, local_gid
from dtmcli._barrier import sql as barrier_sql
from dtmcli._barrier.sql_conn import (
    AUTOCOMMIT_OFF,
    IMPLICIT,
    SAVE_AUTOCOMMIT,
    begin_plan,
    mariadb_version,
    mysql_autocommit_switch,
)
from dtmcli.asyncio.barrier import BranchBarrier as AsyncBarrier
from dtmcli.barrier import BarrierDatabaseError, BranchBarrier, Decision

GONE = "barrier row of this call is gone"
ABORTED = "transaction was aborted"


@pytest.fixture
def mysql_ready() -> None:
    require("mysql")
    _prepare("mysql")


def _effects(gid: str) -> list[tuple[Any, ...]]:
    conn = mysql_connect()
    try:
        return query_all(conn, f"select op from {EFFECT_TABLE} where gid = %s order by op", (gid,))
    finally:
        conn.close()


def _barrier_rows(gid: str) -> list[tuple[Any, ...]]:
    conn = mysql_connect()
    try:
        return query_all(conn, "select op from dtm_barrier.barrier where gid = %s order by op", (gid,))
    finally:
        conn.close()


def _effect(tx: Any, gid: str, op: str) -> None:
    execute(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)", (gid, op))


def _pymysql(autocommit: bool, version: str = "") -> Any:
    conn = pymysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"], password=MYSQL["password"],
                           database=MYSQL["database"], autocommit=autocommit, charset="utf8mb4")
    if version:
        conn.server_version = version  # what that server's handshake says
    return conn


# -- 1. autocommit connections ------------------------------------------------------------------------------------

def test_plans() -> None:
    assert begin_plan(False, False, False) == IMPLICIT
    assert begin_plan(False, False, True) == AUTOCOMMIT_OFF
    assert begin_plan(False, False, None) == SAVE_AUTOCOMMIT
    assert begin_plan(True, False, True) == AUTOCOMMIT_OFF and begin_plan(True, False, False) == IMPLICIT
    assert mysql_autocommit_switch(IMPLICIT) == ("", "")
    off, restore = mysql_autocommit_switch(AUTOCOMMIT_OFF)
    assert off == "set autocommit = 0" and restore == "set autocommit = 1"  # the restore is the COMMIT too
    off, restore = mysql_autocommit_switch(SAVE_AUTOCOMMIT)
    assert "@dtmcli_autocommit = @@session.autocommit" in off and restore.startswith("set autocommit = 1, ")


def test_a_real_deadlock_on_an_autocommit_connection(mysql_db: Any) -> None:
    """The business code catches a real deadlock and goes on: nothing it did is committed, and the caller's
    autocommit mode is back afterwards. Before: its statements after the deadlock committed one by one."""
    from test_mysql_rolled_back import refused_after_a_caught_deadlock

    conn, gid, schema, table = refused_after_a_caught_deadlock(mysql_db, autocommit=True)
    assert conn.get_autocommit() is True
    reader = mysql_db[1]()
    assert query_all(reader, f"select op from {schema}.effect where gid = %s", (gid,)) == []
    assert query_all(reader, f"select v from {schema}.locks order by id") == [(0,), (0,)]
    assert query_all(reader, f"select op from {table} where gid = %s", (gid,)) == []


def _paths_sync(conn: Any, autocommit: bool) -> None:
    """Every way a call ends; after each the connection's mode is the caller's, and inside the call it is off."""
    seen: list[bool] = []

    def effect(tx: Any, gid: str, op: str) -> None:
        seen.append(bool(tx.get_autocommit()))
        _effect(tx, gid, op)

    gid = local_gid()
    BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: effect(tx, gid, "action"))  # run
    assert conn.get_autocommit() is autocommit
    BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: effect(tx, gid, "again"))  # duplicate
    assert conn.get_autocommit() is autocommit
    BranchBarrier("saga", gid, "01", "compensate").call(conn, lambda tx: effect(tx, gid, "compensate"))
    assert conn.get_autocommit() is autocommit
    gid2 = local_gid()
    BranchBarrier("saga", gid2, "01", "compensate").call(conn, lambda tx: effect(tx, gid2, "x"))  # null comp.
    assert conn.get_autocommit() is autocommit
    gid3 = local_gid()
    BranchBarrier("msg", gid3, "00", "msg").call(conn, lambda tx: None)
    with pytest.raises(DtmDuplicated):
        BranchBarrier("msg", gid3, "00", "msg").call(conn, lambda tx: None)  # msg duplicated: rolled back
    assert conn.get_autocommit() is autocommit
    gid4 = local_gid()

    def fails(tx: Any) -> None:
        effect(tx, gid4, "action")
        raise ValueError("business failure")

    with pytest.raises(ValueError):
        BranchBarrier("saga", gid4, "01", "action").call(conn, fails)
    assert conn.get_autocommit() is autocommit
    gid5 = local_gid()

    def rolled_back(tx: Any) -> None:
        effect(tx, gid5, "before")
        execute(tx, "rollback")  # InnoDB on a deadlock; the business code goes on
        effect(tx, gid5, "after")

    with pytest.raises(BarrierDatabaseError, match=GONE):
        BranchBarrier("saga", gid5, "01", "action").call(conn, rolled_back)
    assert conn.get_autocommit() is autocommit
    assert seen == [False] * len(seen) and len(seen) == 5
    assert _effects(gid) == [("action",), ("compensate",)] and _effects(gid2) == []
    assert _effects(gid4) == [] and _effects(gid5) == [] and _barrier_rows(gid5) == []


@pytest.mark.parametrize("autocommit", [True, False])
@pytest.mark.parametrize("version", ["", "8.0.36", "5.5.5-10.4.30-MariaDB"], ids=["server", "mysql8", "mariadb10.4"])
def test_every_path_restores_the_autocommit_mode(mysql_ready: None, autocommit: bool, version: str) -> None:
    conn = _pymysql(autocommit, version)
    try:
        _paths_sync(conn, autocommit)
    finally:
        conn.close()


@pytest.mark.parametrize("autocommit", [True, False])
def test_aiomysql_every_path_restores_the_autocommit_mode(mysql_ready: None, autocommit: bool) -> None:
    import aiomysql

    async def effect(tx: Any, gid: str, op: str) -> None:
        assert tx.get_autocommit() is False
        cur = await tx.cursor()
        await cur.execute(f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)", (gid, op))
        await cur.close()

    async def body() -> None:
        conn = await aiomysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                                      password=MYSQL["password"], db=MYSQL["database"], autocommit=autocommit,
                                      charset="utf8mb4")
        try:
            gid = local_gid()
            await AsyncBarrier("saga", gid, "01", "action").call(conn, lambda tx: effect(tx, gid, "action"))
            assert conn.get_autocommit() is autocommit
            await AsyncBarrier("saga", gid, "01", "compensate").call(conn, lambda tx: effect(tx, gid, "compensate"))
            assert conn.get_autocommit() is autocommit
            gid2 = local_gid()
            await AsyncBarrier("saga", gid2, "01", "compensate").call(conn, lambda tx: effect(tx, gid2, "x"))
            assert conn.get_autocommit() is autocommit

            async def rolled_back(tx: Any) -> None:
                await effect(tx, gid3, "before")
                cur = await tx.cursor()
                await cur.execute("rollback")
                await cur.close()
                await effect(tx, gid3, "after")

            gid3 = local_gid()
            with pytest.raises(BarrierDatabaseError, match=GONE):
                await AsyncBarrier("saga", gid3, "01", "action").call(conn, rolled_back)
            assert conn.get_autocommit() is autocommit
            assert _effects(gid) == [("action",), ("compensate",)] and _effects(gid2) == []
            assert _effects(gid3) == [] and _barrier_rows(gid3) == []
        finally:
            conn.close()

    asyncio.run(body())


@pytest.mark.parametrize("use_pure", [False, True], ids=["cext", "pure"])
@pytest.mark.parametrize("autocommit", [True, False])
def test_mysql_connector_autocommit_and_no_deprecated_call(mysql_ready: None, use_pure: bool,
                                                           autocommit: bool) -> None:
    """mysql-connector: its ``server_info`` is read, never the deprecated ``get_server_info()`` (under
    ``-W error`` that call raised, and the barrier silently took the slower path); an autocommit connection
    gets autocommit off for the call and back after. The C extension tells the mode from the server status;
    the pure-Python connection cannot without a query, so the mode is saved in a user variable."""
    connector = pytest.importorskip("mysql.connector")
    if not use_pure and not getattr(connector, "HAVE_CEXT", False):
        pytest.skip("mysql-connector's C extension is not available")
    conn = connector.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                             password=MYSQL["password"], database=MYSQL["database"], autocommit=autocommit,
                             charset="utf8mb4", use_pure=use_pure)
    try:
        gid = local_gid()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert mariadb_version(conn) == mariadb_version(mysql_connect())

            def busi(tx: Any) -> None:
                _effect(tx, gid, "before")
                execute(tx, "rollback")
                _effect(tx, gid, "after")

            with pytest.raises(BarrierDatabaseError, match=GONE):
                BranchBarrier("saga", gid, "01", "action").call(conn, busi)
            BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: _effect(tx, gid, "action"))
        assert conn.autocommit is autocommit
        assert _effects(gid) == [("action",)]
    finally:
        conn.close()


class _Connector:
    """The shape of a mysql-connector connection: ``server_info`` property, deprecated ``get_server_info()``."""

    server_info = "11.4.2-MariaDB-ubu2404"
    server_version = (11, 4, 2)  # a tuple there, not the version string

    def get_server_info(self) -> str:
        warnings.warn("Call to deprecated function get_server_info", DeprecationWarning, stacklevel=2)
        return self.server_info


def test_the_version_is_read_without_the_deprecated_call() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mariadb_version(_Connector()) == (11, 4)


# -- 2. the row check at commit is this call's own row ------------------------------------------------------------

def _race(t1_conn: Any, t2_conn: Any, trans_type: str, gid: str, op: str) -> dict[str, Any]:
    """T1's transaction is rolled back under its business code; T2, a duplicate delivery of the same op that
    was waiting for T1's row, inserts it, runs and commits; then T1 goes on and reaches its commit."""
    t1_in_busi, t2_done = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def t1() -> None:
        def busi(tx: Any) -> None:
            t1_in_busi.set()
            time.sleep(0.2)  # T2 is blocked on our row by now (if not, it inserts after our rollback: same case)
            execute(tx, "rollback")
            assert t2_done.wait(10)
            _effect(tx, gid, "T1")

        bb = BranchBarrier(trans_type, gid, "01", op)
        try:
            bb.call(t1_conn, busi)
            result["T1"] = bb.last_decision
        except BarrierDatabaseError as exc:
            result["T1"] = str(exc)

    def t2() -> None:
        assert t1_in_busi.wait(10)
        bb = BranchBarrier(trans_type, gid, "01", op)
        try:
            bb.call(t2_conn, lambda tx: _effect(tx, gid, "T2"))
            result["T2"] = bb.last_decision
        finally:
            t2_done.set()

    threads = [threading.Thread(target=t1), threading.Thread(target=t2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    return result


@pytest.mark.parametrize("op", ["action", "compensate"])
@pytest.mark.parametrize("version", ["", "8.0.36", "5.5.5-10.4.30-MariaDB"], ids=["server", "mysql8", "mariadb10.4"])
@pytest.mark.parametrize("autocommit", [False, True])
def test_a_concurrent_duplicate_row_does_not_pass_for_ours(mysql_ready: None, op: str, version: str,
                                                           autocommit: bool) -> None:
    """MariaDB >= 10.5: ``returning id, op`` and the id in the checked COMMIT; MariaDB 10.4: the INSERT's
    lastrowid and the checked COMMIT; MySQL 8: lastrowid and the separate SELECT by id."""
    t1_conn, t2_conn, warm = _pymysql(autocommit, version), _pymysql(False), _pymysql(autocommit, version)
    gid = local_gid()
    try:
        BranchBarrier("saga", local_gid(), "01", "action").call(warm, lambda tx: None)  # the table check has run
        if op == "compensate":
            BranchBarrier("saga", gid, "01", "action").call(warm, lambda tx: None)
        result = _race(t1_conn, t2_conn, "saga", gid, op)
    finally:
        for conn in (t1_conn, t2_conn, warm):
            conn.close()
    assert result["T2"] is Decision.RUN
    assert GONE in str(result["T1"])
    assert _effects(gid) == [("T2",)]


def test_aiomysql_a_concurrent_duplicate_row_does_not_pass_for_ours(mysql_ready: None) -> None:
    import aiomysql

    async def connect() -> Any:
        return await aiomysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                                      password=MYSQL["password"], db=MYSQL["database"], autocommit=False,
                                      charset="utf8mb4")

    async def run(sql: str, tx: Any, *params: Any) -> None:
        cur = await tx.cursor()
        await cur.execute(sql, params)
        await cur.close()

    async def body() -> dict[str, Any]:
        t1c, t2c = await connect(), await connect()
        gid = local_gid()
        t1_in_busi, t2_done = asyncio.Event(), asyncio.Event()
        result: dict[str, Any] = {}
        effect = f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)"
        try:
            await AsyncBarrier("saga", local_gid(), "01", "action").call(t1c, lambda tx: None)  # table check

            async def busi1(tx: Any) -> None:
                t1_in_busi.set()
                await asyncio.sleep(0.2)
                await run("rollback", tx)
                await asyncio.wait_for(t2_done.wait(), 10)
                await run(effect, tx, gid, "T1")

            async def t1() -> None:
                try:
                    await AsyncBarrier("saga", gid, "01", "action").call(t1c, busi1)
                    result["T1"] = "committed"
                except BarrierDatabaseError as exc:
                    result["T1"] = str(exc)

            async def t2() -> None:
                await t1_in_busi.wait()
                bb = AsyncBarrier("saga", gid, "01", "action")
                try:
                    await bb.call(t2c, lambda tx: run(effect, tx, gid, "T2"))
                    result["T2"] = bb.last_decision
                finally:
                    t2_done.set()

            await asyncio.gather(t1(), t2())
            result["gid"] = gid
            return result
        finally:
            t1c.close()
            t2c.close()

    result = asyncio.run(body())
    assert result["T2"] is Decision.RUN and GONE in str(result["T1"])
    assert _effects(result["gid"]) == [("T2",)]


def _id_less_table(conn: Any, table: str) -> None:
    execute(conn, f"create table {table} (trans_type varchar(45) not null default '', gid varchar(128) not null "
                  "default '', branch_id varchar(128) not null default '', op varchar(45) not null default '', "
                  "barrier_id varchar(45) not null default '', reason varchar(45) not null default '', "
                  "unique key uniq_barrier (gid, branch_id, op, barrier_id)) default charset = utf8mb4 "
                  "collate = utf8mb4_nopad_bin")
    conn.commit()


def test_the_table_check_learns_whether_the_table_has_an_id(mysql_db: Any) -> None:
    schema, connect = mysql_db
    conn = connect()
    barrier_sql.create_schema(conn, table=f"{schema}.barrier")
    _id_less_table(conn, f"{schema}.no_id")
    for table, has_id in ((f"{schema}.barrier", True), (f"{schema}.no_id", False)):
        assert barrier_sql.barrier_preflight(conn, table=table) == []
        adapter = barrier_sql.adapt(conn, None)
        assert barrier_sql._row_id_tables[(*adapter.target(), table)] is has_id


@pytest.mark.parametrize("version", ["", "8.0.36"], ids=["server", "mysql8"])
def test_a_table_without_id_keeps_the_key_check(mysql_db: Any, version: str) -> None:
    """Weaker (a concurrent duplicate's row passes for ours), but the rolled-back transaction is still refused."""
    schema, connect = mysql_db
    table = f"{schema}.no_id"
    _id_less_table(connect(), table)
    conn = connect()
    if version:
        conn.server_version = version
    gid = local_gid()
    ran: list[str] = []
    BranchBarrier("saga", gid, "01", "action", table=table).call(conn, lambda tx: ran.append("action"))
    BranchBarrier("saga", gid, "01", "compensate", table=table).call(conn, lambda tx: ran.append("compensate"))
    assert ran == ["action", "compensate"]
    with pytest.raises(BarrierDatabaseError, match=GONE):
        BranchBarrier("saga", local_gid(), "01", "action", table=table).call(conn, lambda tx: execute(tx, "rollback"))


def test_the_check_statements_name_the_id() -> None:
    assert "where id = %s and gid = %s" in barrier_sql._checked_commit_sql("t", True)
    assert "where gid = %s" in barrier_sql._checked_commit_sql("t", False)
    assert barrier_sql._checked_commit_sql("t", True, "set autocommit = 1").endswith("commit; set autocommit = 1; end")
    assert "returning id, op" in barrier_sql._insert_pair_sql("mysql", "t", True)
    assert barrier_sql._returned_ops([(7, "action"), (8, "compensate")], "action", "compensate") == (1, 1)


# -- a server that claims MariaDB >= 10.5 and does not parse INSERT ... RETURNING ---------------------------------

def test_insert_returning_refused_falls_back_to_two_inserts(mysql_ready: None, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(barrier_sql, "_insert_pair_sql", lambda dialect, table, with_id=False: (
        f"insert ignore into {table} nonsense({', '.join(['%s'] * 12)})"))
    conn = _pymysql(False)
    try:
        gid = local_gid()
        BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: _effect(tx, gid, "action"))
        with caplog.at_level(logging.WARNING, logger="dtmcli"):
            bb = BranchBarrier("saga", gid, "01", "compensate")
            bb.call(conn, lambda tx: _effect(tx, gid, "compensate"))
        assert bb.last_decision is Decision.RUN
        assert conn in barrier_sql._no_returning
        assert [r for r in caplog.records if "INSERT ... RETURNING" in r.getMessage()]
        gid2 = local_gid()  # later calls on this connection: two inserts, decisions unchanged
        bb = BranchBarrier("saga", gid2, "01", "compensate")
        bb.call(conn, lambda tx: _effect(tx, gid2, "x"))
        assert bb.last_decision is Decision.NULL_COMPENSATION
        assert _effects(gid) == [("action",), ("compensate",)] and _effects(gid2) == []
        assert _barrier_rows(gid2) == [("action",), ("compensate",)]
    finally:
        conn.close()


# -- 3. PostgreSQL: the aborted transaction keeps its locks, and later statements fail ----------------------------

@pytest.mark.parametrize("autocommit", [False, True])
def test_postgres_has_no_such_hole(autocommit: bool) -> None:
    """A caught error aborts T1 (its row and locks go at once, so T2, the duplicate delivery, runs and commits
    meanwhile) without ending its transaction block: T1's later statements fail, and the barrier refuses T1.
    One effect, T2's."""
    require("postgres")
    _prepare("postgres")
    import psycopg2

    t1c, t2c = psycopg2_connect(), psycopg2_connect()
    t1c.autocommit = autocommit
    gid = local_gid()
    t1_in_busi, t2_done = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def t1() -> None:
        def busi(tx: Any) -> None:
            t1_in_busi.set()
            for sql in ("select 1 / 0", f"insert into {EFFECT_TABLE}(gid, op) values ('{gid}', 'T1')"):
                try:
                    execute(tx, sql)
                except psycopg2.Error as exc:  # caught and swallowed by the business code
                    result.setdefault("errors", []).append(exc.pgcode)
            result["T2 done while T1 ran"] = t2_done.wait(10)
            try:
                execute(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, 'T1-after-T2')", (gid,))
            except psycopg2.Error as exc:
                result["errors"].append(exc.pgcode)

        try:
            BranchBarrier("saga", gid, "01", "action").call(t1c, busi)
            result["T1"] = "committed"
        except BarrierDatabaseError as exc:
            result["T1"] = str(exc)

    def t2() -> None:
        assert t1_in_busi.wait(10)
        bb = BranchBarrier("saga", gid, "01", "action")
        try:
            bb.call(t2c, lambda tx: execute(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, 'T2')", (gid,)))
            result["T2"] = bb.last_decision
        finally:
            t2_done.set()

    threads = [threading.Thread(target=t1), threading.Thread(target=t2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    try:
        # division by zero; then "current transaction is aborted" for everything after it
        assert result["errors"] == ["22012", "25P02", "25P02"]
        assert result["T2 done while T1 ran"] is True
        assert ABORTED in result["T1"] and result["T2"] is Decision.RUN
        assert t1c.autocommit is autocommit
        assert query_all(t2c, f"select op from {EFFECT_TABLE} where gid = %s", (gid,)) == [("T2",)]
    finally:
        t1c.close()
        t2c.close()
