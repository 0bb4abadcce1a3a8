"""MySQL/MariaDB: a transaction the server rolled back under the business function is refused (review r2, M3).

InnoDB answers a deadlock (and a lock wait timeout under innodb_rollback_on_timeout) by rolling back
the whole transaction, barrier rows included. Business code that catches the error and goes on
(retrying its statement) continues in a new transaction: the barrier used to commit what came after
and answer SUCCESS with no barrier row, so a later compensation was a null one and the committed
effect was never undone. Before COMMIT the barrier now re-reads the op's row in the transaction
(MySQL only: one indexed SELECT) and refuses, rolling back, when it is gone.

The rollback is provoked two ways: the business function sends ROLLBACK itself (deterministic, every
MySQL flavour of connection), and a real deadlock with a heavier opponent transaction (PyMySQL).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pymysql
import pytest
from conftest import EFFECT_TABLE, _prepare, execute, mysql_connect, query_all
from services import MYSQL, require

from dtmcli import local_gid
from dtmcli._barrier import core
from dtmcli._barrier.sql import SqlStoreBase
from dtmcli._flow import Call, StoreOp
from dtmcli.asyncio.barrier import BranchBarrier as AsyncBarrier
from dtmcli.barrier import BarrierDatabaseError, BranchBarrier, Decision

GONE = "barrier row of this call is gone"
SA_MYSQL = f"{MYSQL['user']}@{MYSQL['host']}:{MYSQL['port']}/{MYSQL['database']}?charset=utf8mb4"


@pytest.fixture(autouse=True)
def _mysql() -> None:
    require("mysql")
    _prepare("mysql")


def effects(gid: str) -> list[tuple[Any, ...]]:
    conn = mysql_connect()
    try:
        return query_all(conn, f"select op from {EFFECT_TABLE} where gid = %s", (gid,))
    finally:
        conn.close()


def barrier_rows(gid: str) -> list[tuple[Any, ...]]:
    conn = mysql_connect()
    try:
        return query_all(conn, "select op from dtm_barrier.barrier where gid = %s", (gid,))
    finally:
        conn.close()


# -- blocking ---------------------------------------------------------------------------------------------------------

def _run_sync(tx: Any, sql: str, params: tuple[Any, ...] = ()) -> None:
    if type(tx).__module__.startswith("sqlalchemy"):
        from sqlalchemy import text

        tx.execute(text(sql.replace("%s", ":p0", 1).replace("%s", ":p1", 1)),
                    dict(zip(("p0", "p1"), params)))
    else:
        execute(tx, sql, params)


@pytest.mark.parametrize("source", ["pymysql", "sa_connection"])
def test_blocking_barrier_refuses_a_transaction_rolled_back_under_the_business_function(source: str) -> None:
    from sqlalchemy import create_engine

    engine = create_engine(f"mysql+pymysql://{SA_MYSQL}")
    conn = mysql_connect() if source == "pymysql" else engine.connect()
    gid = local_gid()

    def busi(tx: Any) -> str:
        _run_sync(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)", (gid, "before"))
        _run_sync(tx, "rollback")  # what InnoDB does on a deadlock; the business code goes on
        _run_sync(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)", (gid, "after"))
        return "ok"

    try:
        with pytest.raises(BarrierDatabaseError, match=GONE):
            BranchBarrier("saga", gid, "01", "action").call(conn, busi)
        assert effects(gid) == [] and barrier_rows(gid) == []  # "after" was rolled back with the refusal
        bb = BranchBarrier("saga", gid, "01", "action")  # DTM retries: the op runs normally
        bb.call(conn, lambda tx: _run_sync(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)",
                                           (gid, "action")))
        assert bb.last_decision is Decision.RUN
        assert effects(gid) == [("action",)] and barrier_rows(gid) == [("action",)]
    finally:
        conn.close()
        engine.dispose()


def refused_after_a_caught_deadlock(mysql_db: Any, autocommit: bool = False) -> tuple[Any, str, str, str]:
    """A real deadlock in a database of its own: the barrier's transaction (the lighter one) is InnoDB's victim,
    and the business code catches the error, retries its statement and goes on writing. The call must be
    refused (the barrier row is gone). ``autocommit``: the caller's connection has it on (the business code
    must still see it off). Returns ``(conn, gid, schema, table)`` for the caller's own checks."""
    schema, connect = mysql_db
    table = f"{schema}.barrier"
    setup = connect()
    from dtmcli.barrier import create_schema

    create_schema(setup, table=table)
    for stmt in (f"create table {schema}.locks (id int primary key, v int) engine=innodb",
                 f"create table {schema}.bulk (id int auto_increment primary key, v int) engine=innodb",
                 f"create table {schema}.effect (gid varchar(128), op varchar(45)) engine=innodb",
                 f"insert into {schema}.locks values (1, 0), (2, 0)"):
        execute(setup, stmt)
    setup.commit()
    gid = local_gid()
    go = threading.Event()
    caught: list[int] = []

    def opponent() -> None:
        """Heavier (so InnoDB picks the barrier's transaction): lock row 2, then want row 1."""
        c = connect()
        cur = c.cursor()
        cur.executemany(f"insert into {schema}.bulk(v) values (%s)", [(i,) for i in range(200)])
        cur.execute(f"select v from {schema}.locks where id = 2 for update")
        go.set()
        time.sleep(0.3)
        try:
            cur.execute(f"select v from {schema}.locks where id = 1 for update")
        finally:
            c.rollback()

    def busi(tx: Any) -> str:
        assert tx.get_autocommit() is False  # the call runs with autocommit off
        cur = tx.cursor()
        cur.execute(f"select v from {schema}.locks where id = 1 for update")
        worker.start()
        assert go.wait(10)
        try:
            cur.execute(f"update {schema}.locks set v = v + 1 where id = 2")
        except pymysql.err.OperationalError as exc:
            caught.append(exc.args[0])
            cur.execute(f"update {schema}.locks set v = v + 1 where id = 2")  # "retry the statement"
        cur.execute(f"insert into {schema}.effect values (%s, 'action')", (gid,))
        return "ok"

    worker = threading.Thread(target=opponent)
    conn = connect()
    if autocommit:
        conn.autocommit(True)
    try:
        with pytest.raises(BarrierDatabaseError, match=GONE):
            BranchBarrier("saga", gid, "01", "action", table=table).call(conn, busi)
    finally:
        worker.join(10)
    assert caught == [1213]
    return conn, gid, schema, table


def test_a_real_deadlock_caught_by_the_business_code(mysql_db: Any) -> None:
    """The reviewer's scenario: nothing the business code did, and no barrier row, is committed."""
    _, gid, schema, table = refused_after_a_caught_deadlock(mysql_db)
    reader = mysql_db[1]()
    assert query_all(reader, f"select op from {schema}.effect where gid = %s", (gid,)) == []
    assert query_all(reader, f"select op from {table} where gid = %s", (gid,)) == []


# -- asyncio ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["aiomysql", "sa_aiomysql"])
def test_asyncio_barrier_refuses_a_transaction_rolled_back_under_the_business_function(source: str) -> None:
    from test_async_sql import opened

    async def body() -> None:
        async with opened(source) as d:
            conn = await d.connect()
            gid = local_gid()

            async def busi(tx: Any) -> str:
                await d.run(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)", (gid, "before"))
                await d.run(tx, "rollback")
                await d.run(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)", (gid, "after"))
                return "ok"

            with pytest.raises(BarrierDatabaseError, match=GONE):
                await AsyncBarrier("saga", gid, "01", "action").call(conn, busi)
            assert effects(gid) == [] and barrier_rows(gid) == []
            # the compensation of the refused action is a null one, and nothing of the action remains
            bb = AsyncBarrier("saga", gid, "01", "compensate")
            await bb.call(conn, lambda tx: None)
            assert bb.last_decision is Decision.NULL_COMPENSATION

    asyncio.run(body())


# -- the flow: one extra step on MySQL, after a business call only ----------------------------------------------------

class _Errors:
    tx = "tx"

    def __init__(self, recheck: bool) -> None:
        self.recheck_row = recheck

    def map_error(self, exc: BaseException, what: str) -> Any:
        return BarrierDatabaseError(f"{what}: {exc}")

    def busi_error(self, exc: Exception) -> Any:
        return None


def _steps(recheck: bool, op: str = "action", current: int = 1, gone: bool = False) -> list[str]:
    flow = core.barrier_flow(_Errors(recheck), BranchBarrier("saga", "g1", "01", op), lambda tx: "done")
    steps: list[str] = []
    value: Any = None
    try:
        effect = flow.send(None)
        while True:
            steps.append(effect.name if isinstance(effect, StoreOp) else "call")
            if isinstance(effect, StoreOp) and effect.name == "require_row" and gone:
                effect = flow.throw(BarrierDatabaseError(GONE))
                continue
            value = current if isinstance(effect, StoreOp) and effect.name == "insert_if_absent" else None
            if isinstance(effect, Call):
                value = "done"
            effect = flow.send(value)
    except StopIteration:
        steps.append("returned")
    except BarrierDatabaseError:
        steps.append("raised")
    return steps


def test_the_row_is_required_before_commit_only_when_the_business_function_ran() -> None:
    assert _steps(True) == ["begin", "insert_if_absent", "call", "require_row", "commit", "returned"]
    assert _steps(True, current=0) == ["begin", "insert_if_absent", "commit", "returned"]  # duplicate: no busi
    assert _steps(False) == ["begin", "insert_if_absent", "call", "commit", "returned"]  # PostgreSQL, Mongo
    assert _steps(True, gone=True) == ["begin", "insert_if_absent", "call", "require_row", "rollback", "raised"]


def test_only_mysql_stores_recheck() -> None:
    class A:
        def __init__(self, dialect: str) -> None:
            self.dialect = dialect

    assert SqlStoreBase(None, A("mysql"), "t", {}).recheck_row is True
    assert SqlStoreBase(None, A("postgres"), "t", {}).recheck_row is False
