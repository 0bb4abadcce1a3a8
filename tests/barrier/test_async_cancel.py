"""Cancelled asyncio barrier calls on real PostgreSQL and MariaDB: the local transaction is rolled back.

A handler task cancelled (a client gone, a timeout) while the business coroutine, a barrier insert or
query_prepared is awaited must leave no barrier row and no business row behind, leave the connection
out of any transaction, re-raise the cancellation, and let DTM's redelivery run normally. The rollback
runs to its end even when the task is cancelled again meanwhile.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest
from conftest import EFFECT_TABLE, _prepare, execute
from services import require
from test_async_sql import ASERVICE, START, Driver, balance, barrier_rows, busi_for, effects, open_account, opened, run

from dtmcli import DtmFailure, local_gid
from dtmcli.asyncio import barrier as abarrier
from dtmcli.asyncio.barrier import BranchBarrier
from dtmcli.barrier import Decision

CDRIVERS = ("asyncpg", "psycopg_async", "aiomysql", "sa_asyncpg", "sa_aiomysql")


@pytest.fixture(params=CDRIVERS)
def cdriver(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    require(ASERVICE[name])
    _prepare(ASERVICE[name])
    return name


def in_transaction(d: Driver, conn: Any) -> bool:
    """Whether ``conn`` still has a transaction open (a closed aiomysql connection has none: the server ended it)."""
    if d.name == "asyncpg":
        return bool(conn.is_in_transaction())
    if d.name == "psycopg_async":
        return int(conn.info.transaction_status) != 0
    if d.name == "aiomysql":
        return not conn.closed and bool(conn.get_transaction_status())
    return bool(conn.in_transaction())


async def cancel_when(task: asyncio.Future[Any], ready: asyncio.Event, storm: bool = False) -> None:
    """Cancel ``task`` once ``ready`` is set; with ``storm``, keep cancelling it until it is done."""
    await ready.wait()
    task.cancel()
    while storm and not task.done():
        await asyncio.sleep(0)
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def blocking_busi(d: Driver, gid: str, ready: asyncio.Event, server_side: bool) -> Callable[[Any], Any]:
    """Writes business rows, then waits: on the event loop, or in a statement the server runs for a while."""

    async def busi(tx: Any) -> None:
        await busi_for(d, "saga", gid, "action")(tx)
        ready.set()
        if server_side:
            await d.run(tx, "select sleep(2)" if d.service == "mysql" else "select pg_sleep(5)")
        else:
            await asyncio.Event().wait()

    return busi


@pytest.mark.parametrize("server_side", [False, True], ids=["awaiting", "in_statement"])
def test_cancelled_business_call_rolls_back_and_the_redelivery_runs(
    cdriver: str, server_side: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        async with opened(cdriver) as d:
            conn, sync = await d.connect(), d.sync()
            gid = local_gid()
            open_account(sync, gid)
            ready = asyncio.Event()
            task = asyncio.ensure_future(
                BranchBarrier("saga", gid, "01", "action").call(conn, blocking_busi(d, gid, ready, server_side)))
            await cancel_when(task, ready)
            assert not in_transaction(d, conn)
            assert barrier_rows(sync, gid) == [] and effects(sync, gid) == [] and balance(sync, gid) == START
            assert "rollback failed" not in caplog.text
            if d.name == "aiomysql" and server_side:
                assert conn.closed  # aiomysql drops a connection cancelled mid-statement; the server rolled back
                conn = await d.connect()
            bb = BranchBarrier("saga", gid, "01", "action")
            assert await bb.call(conn, busi_for(d, "saga", gid, "action")) == "did action"  # DTM's redelivery
            assert bb.last_decision is Decision.RUN
            assert effects(sync, gid) == ["action"] and balance(sync, gid) == START + 10
            sync.close()

    run(body())


def test_rollback_finishes_under_a_storm_of_cancellations(cdriver: str) -> None:
    """The task is cancelled again and again while it rolls back: the rollback still completes (shielded),
    so the connection is not left inside the transaction holding the barrier rows."""

    async def body() -> None:
        async with opened(cdriver) as d:
            conn, sync = await d.connect(), d.sync()
            for _round in range(5):
                gid = local_gid()
                open_account(sync, gid)
                ready = asyncio.Event()
                task = asyncio.ensure_future(
                    BranchBarrier("saga", gid, "01", "action").call(conn, blocking_busi(d, gid, ready, False)))
                await cancel_when(task, ready, storm=True)
                assert not in_transaction(d, conn)
                assert barrier_rows(sync, gid) == [] and effects(sync, gid) == []
                assert await BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: "again") == "again"
            sync.close()

    run(body())


def test_cancelled_while_an_insert_waits_for_a_lock(cdriver: str) -> None:
    async def body() -> None:
        async with opened(cdriver) as d:
            conn, sync = await d.connect(), d.sync()
            holder = d.sync()
            gid = local_gid()
            execute(holder, "insert into dtm_barrier.barrier(trans_type, gid, branch_id, op, barrier_id, reason) "
                            "values ('saga', %s, '01', 'compensate', '01', 'compensate')", (gid,))  # uncommitted
            started = asyncio.Event()

            async def call() -> Any:
                started.set()
                return await BranchBarrier("saga", gid, "01", "compensate").call(conn, lambda tx: "ran")

            task = asyncio.ensure_future(call())
            await started.wait()
            # The INSERT of both rows waits on the lock of the compensate row (one statement where the server
            # has INSERT ... RETURNING or ON CONFLICT ... RETURNING; else the origin-op row is inserted first)
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not in_transaction(d, conn)
            holder.rollback()
            holder.close()
            assert barrier_rows(sync, gid) == []  # not even the origin op's row (null compensation marker)
            if d.name == "aiomysql" and conn.closed:
                conn = await d.connect()
            bb = BranchBarrier("saga", gid, "01", "compensate")
            assert await bb.call(conn, lambda tx: "ran") is None
            assert bb.last_decision is Decision.NULL_COMPENSATION
            sync.close()

    run(body())


def test_cancelled_query_prepared_writes_no_rollback_marker(cdriver: str) -> None:
    """query_prepared cancelled while the msg's local transaction holds its row: nothing is written, so the
    local transaction still commits (a rollback marker left behind would turn it into a duplicate)."""

    async def body() -> None:
        async with opened(cdriver) as d:
            local, checker, sync = await d.connect(), await d.connect(), d.sync()
            gid = local_gid()
            inserted, release = asyncio.Event(), asyncio.Event()

            async def busi(tx: Any) -> str:
                await d.run(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, 'msg')", (gid,))
                inserted.set()
                await release.wait()
                return "done"

            local_task = asyncio.ensure_future(BranchBarrier.for_msg(gid).call(local, busi))
            await inserted.wait()
            query_task = asyncio.ensure_future(abarrier.query_prepared(gid, checker))
            await asyncio.sleep(0.3)  # blocked on the msg row's lock
            query_task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await query_task
            assert not in_transaction(d, checker)
            release.set()
            assert await local_task == "done"
            assert barrier_rows(sync, gid) == [("msg", "00", "msg", "01", "msg")]
            if d.name == "aiomysql" and checker.closed:
                checker = await d.connect()
            await abarrier.query_prepared(gid, checker)  # committed
            with pytest.raises(DtmFailure):
                await abarrier.query_prepared(local_gid(), checker)
            sync.close()

    run(body())


def test_a_timeout_is_a_cancellation_too(cdriver: str) -> None:
    async def body() -> None:
        async with opened(cdriver) as d:
            conn, sync = await d.connect(), d.sync()
            gid = local_gid()
            open_account(sync, gid)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(BranchBarrier("saga", gid, "01", "action").call(
                    conn, blocking_busi(d, gid, asyncio.Event(), False)), 0.3)
            assert not in_transaction(d, conn)
            assert barrier_rows(sync, gid) == [] and effects(sync, gid) == []
            sync.close()

    run(body())


def test_cancelled_call_on_a_pool_returns_a_clean_connection(mysql_ready: None, postgres_ready: None) -> None:
    async def body() -> None:
        import aiomysql
        import asyncpg
        from services import MYSQL, POSTGRES

        pg_pool = await asyncpg.create_pool(host=POSTGRES["host"], user=POSTGRES["user"],
                                            database=POSTGRES["dbname"], min_size=1, max_size=1)
        my_pool = await aiomysql.create_pool(host=MYSQL["host"], user=MYSQL["user"], db=MYSQL["database"],
                                             minsize=1, maxsize=1)
        try:
            for pool, name in ((pg_pool, "asyncpg"), (my_pool, "aiomysql")):
                d = Driver(name)
                sync = d.sync()
                gid = local_gid()
                open_account(sync, gid)
                ready = asyncio.Event()
                task = asyncio.ensure_future(BranchBarrier("saga", gid, "01", "action").call_with_db(
                    pool, blocking_busi(d, gid, ready, False)))
                await cancel_when(task, ready)
                assert barrier_rows(sync, gid) == [] and effects(sync, gid) == []
                bb = BranchBarrier("saga", gid, "01", "action")
                assert await bb.call_with_db(pool, busi_for(d, "saga", gid, "action")) == "did action"
                assert balance(sync, gid) == START + 10
                sync.close()
        finally:
            await pg_pool.close()
            my_pool.close()
            await my_pool.wait_closed()

    run(body())
