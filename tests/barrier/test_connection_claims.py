"""One connection, one barrier call at a time (review r2, C1).

Two barrier calls running at once on one connection share its transaction: one call's rollback
undoes the other's rows, and a call answers SUCCESS for work that was never committed (or commits
work without its barrier row). The barrier holds the connection for its call, from before its first
await (asyncio) or across threads (blocking), and refuses a second call of another task or thread
with DtmInvalidInput before it touches the connection. The same task or thread may nest calls.
A single async connection or session given as ``@barrier(db=...)`` of an ``async def`` handler (or
to a query_prepared endpoint) is refused when decorating: every concurrent request would share it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from conftest import EFFECT_TABLE, _prepare, execute, mysql_connect, psycopg2_connect, query_all
from services import MYSQL, POSTGRES, require
from test_async_sql import (
    ASERVICE,
    barrier_rows,
    busi_for,
    call_op,
    effects,
    open_account,
    opened,
    run,
)

from dtmcli import DtmInvalidInput, local_gid
from dtmcli.asyncio import barrier as abarrier
from dtmcli.asyncio.barrier import BranchBarrier as AsyncBarrier
from dtmcli.barrier import BranchBarrier, Decision, barrier

IN_USE = "in use by another barrier call"
CLAIM_DRIVERS = ("aiomysql", "asyncpg", "psycopg_async", "sa_asyncpg", "sa_aiomysql", "sa_psycopg_session")


@pytest.fixture(params=CLAIM_DRIVERS)
def cdriver(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    require(ASERVICE[name])
    _prepare(ASERVICE[name])
    return name


# -- asyncio: concurrent calls on one connection -----------------------------------------------------------------------

def test_concurrent_async_calls_on_one_connection_never_share_its_transaction(cdriver: str) -> None:
    """Before: both calls began (psycopg and aiomysql send nothing at begin), then ran in one transaction."""

    async def body() -> None:
        async with opened(cdriver) as d:
            conn, sync = await d.connect(), d.sync()
            ga, gb = local_gid(), local_gid()
            open_account(sync, ga)
            open_account(sync, gb)
            first, second = await asyncio.gather(
                call_op(d, conn, "saga", ga, "action"), call_op(d, conn, "saga", gb, "action"),
                return_exceptions=True,
            )
            assert first == ("did action", Decision.RUN)
            assert isinstance(second, DtmInvalidInput) and IN_USE in str(second), second
            assert effects(sync, ga) == ["action"] and len(barrier_rows(sync, ga)) == 1
            assert effects(sync, gb) == [] and barrier_rows(sync, gb) == []  # refused before touching anything
            # the connection is free again: DTM's retry of the refused call runs normally
            assert await call_op(d, conn, "saga", gb, "action") == ("did action", Decision.RUN)
            assert effects(sync, gb) == ["action"]
            sync.close()

    run(body())


def test_a_failed_call_releases_the_connection(cdriver: str) -> None:
    async def body() -> None:
        async with opened(cdriver) as d:
            conn, sync = await d.connect(), d.sync()
            gid = local_gid()

            async def fails(tx: Any) -> None:
                raise ValueError("business error")

            with pytest.raises(ValueError):
                await AsyncBarrier("saga", gid, "01", "action").call(conn, fails)
            open_account(sync, gid)
            assert await call_op(d, conn, "saga", gid, "action") == ("did action", Decision.RUN)
            sync.close()

    run(body())


def test_a_nested_call_of_the_same_task_is_not_refused() -> None:
    """A barrier call inside a business function (same task, sequential) joins through a savepoint."""
    require("postgres")
    _prepare("postgres")

    async def body() -> None:
        async with opened("sa_psycopg_session") as d:
            session, sync = await d.connect(), d.sync()
            gid = local_gid()

            async def outer(tx: Any) -> str:
                await d.run(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)", (gid, "outer"))
                bb = AsyncBarrier("saga", gid, "02", "action")
                inner = await bb.call(tx, lambda t: d.run(t, f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)",
                                                          (gid, "inner")))
                assert bb.last_decision is Decision.RUN and inner is None
                return "outer done"

            assert await AsyncBarrier("saga", gid, "01", "action").call(session, outer) == "outer done"
            assert effects(sync, gid) == ["inner", "outer"]
            sync.close()

    run(body())


def test_concurrent_query_prepared_on_one_connection(cdriver: str) -> None:
    async def body() -> None:
        async with opened(cdriver) as d:
            conn, sync = await d.connect(), d.sync()
            ga, gb = local_gid(), local_gid()
            answers = await asyncio.gather(abarrier.query_prepared(ga, conn), abarrier.query_prepared(gb, conn),
                                           return_exceptions=True)
            assert type(answers[0]).__name__ == "DtmFailure"  # never prepared: rolled back
            assert isinstance(answers[1], DtmInvalidInput) and IN_USE in str(answers[1])
            assert barrier_rows(sync, gb) == []
            sync.close()

    run(body())


# -- blocking: one connection, two threads ----------------------------------------------------------------------------

SYNC_KINDS = ("pymysql", "psycopg2", "sa_session_mysql", "sa_connection_pg")


def _sync_conn(kind: str) -> tuple[Any, Any, Any]:
    """(connection for the barrier, blocking reader, engine or None)."""
    if kind == "pymysql":
        require("mysql")
        _prepare("mysql")
        return mysql_connect(), mysql_connect(), None
    if kind == "psycopg2":
        require("postgres")
        _prepare("postgres")
        return psycopg2_connect(), psycopg2_connect(), None
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    if kind == "sa_session_mysql":
        require("mysql")
        _prepare("mysql")
        engine = create_engine(f"mysql+pymysql://{MYSQL['user']}@{MYSQL['host']}:{MYSQL['port']}/{MYSQL['database']}"
                               "?charset=utf8mb4")
        return Session(engine), mysql_connect(), engine
    require("postgres")
    _prepare("postgres")
    engine = create_engine(f"postgresql+psycopg2://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/"
                           f"{POSTGRES['dbname']}")
    return engine.connect(), psycopg2_connect(), engine


def _insert_effect(tx: Any, gid: str, op: str) -> None:
    sql = f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)"
    if type(tx).__module__.startswith("sqlalchemy"):
        from sqlalchemy import text

        tx.execute(text(sql.replace("%s", ":g", 1).replace("%s", ":o", 1)), {"g": gid, "o": op})
    else:
        execute(tx, sql, (gid, op))


@pytest.mark.parametrize("kind", SYNC_KINDS)
def test_a_blocking_connection_used_by_another_thread_is_refused(kind: str) -> None:
    """Before: PyMySQL/psycopg2 got "open transaction" only once the first call had inserted (and the
    check itself touched a connection another thread was using); a SQLAlchemy Session or Connection
    let the second thread join the first one's transaction through a savepoint."""
    conn, reader, engine = _sync_conn(kind)
    ga, gb = local_gid(), local_gid()
    in_busi, release = threading.Event(), threading.Event()
    outcome: list[Any] = []

    def busi_a(tx: Any) -> str:
        _insert_effect(tx, ga, "action")
        in_busi.set()
        assert release.wait(10)
        return "a"

    def first() -> None:
        try:
            outcome.append(BranchBarrier("saga", ga, "01", "action").call(conn, busi_a))
        except BaseException as exc:  # reported by the assertion below
            outcome.append(exc)

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert in_busi.wait(10)
        with pytest.raises(DtmInvalidInput, match=IN_USE):
            BranchBarrier("saga", gb, "01", "action").call(conn, lambda tx: _insert_effect(tx, gb, "action"))
    finally:
        release.set()
        worker.join(10)
    try:
        assert outcome == ["a"]
        rows = query_all(reader, f"select gid, op from {EFFECT_TABLE} where gid in (%s, %s)", (ga, gb))
        assert rows == [(ga, "action")]
        # released: the same thread (or any other) may use it now
        bb = BranchBarrier("saga", gb, "01", "action")
        bb.call(conn, lambda tx: _insert_effect(tx, gb, "action"))
        assert bb.last_decision is Decision.RUN
        assert query_all(reader, f"select op from {EFFECT_TABLE} where gid = %s", (gb,)) == [("action",)]
    finally:
        conn.close()
        reader.close()
        if engine is not None:
            engine.dispose()


def test_a_nested_call_of_the_same_thread_is_not_refused() -> None:
    conn, reader, engine = _sync_conn("sa_session_mysql")
    gid = local_gid()
    try:
        def outer(tx: Any) -> str:
            _insert_effect(tx, gid, "outer")
            BranchBarrier("saga", gid, "02", "action").call(tx, lambda t: _insert_effect(t, gid, "inner"))
            return "outer done"

        assert BranchBarrier("saga", gid, "01", "action").call(conn, outer) == "outer done"
        assert sorted(query_all(reader, f"select op from {EFFECT_TABLE} where gid = %s", (gid,))) == [
            ("inner",), ("outer",)]
    finally:
        conn.close()
        reader.close()
        engine.dispose()


# -- a single async connection given when decorating ------------------------------------------------------------------

class _FakePsycopgAsyncConnection:
    """Stands in for psycopg's ``AsyncConnection`` (only the class's module and name are read)."""

    def cursor(self) -> None:
        raise AssertionError("never used")


_FakePsycopgAsyncConnection.__module__ = "psycopg.connection_async"
_FakePsycopgAsyncConnection.__name__ = _FakePsycopgAsyncConnection.__qualname__ = "AsyncConnection"


def _single_async_sources() -> list[Any]:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(f"postgresql+asyncpg://{POSTGRES['user']}@{POSTGRES['host']}/{POSTGRES['dbname']}")
    return [_FakePsycopgAsyncConnection(), AsyncSession(engine)]


def test_a_single_async_connection_is_refused_when_decorating_an_async_handler() -> None:
    """Before: accepted, and every concurrent request shared the one connection (repro_decorator_shared_conn)."""
    for source in _single_async_sources():
        with pytest.raises(DtmInvalidInput, match="single connection or session"):

            @barrier(db=source)
            async def handler(query: Any, info: Any, tx: Any = None) -> None:
                raise AssertionError("never runs")


def test_a_single_async_connection_is_refused_by_the_query_prepared_views() -> None:
    from dtmcli.contrib.starlette import query_prepared_endpoint

    for source in _single_async_sources():
        with pytest.raises(DtmInvalidInput, match="single connection or session"):
            query_prepared_endpoint(source)


def test_pools_engines_and_factories_are_accepted_when_decorating() -> None:
    import functools

    import asyncpg
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    engine = create_async_engine(f"postgresql+asyncpg://{POSTGRES['user']}@{POSTGRES['host']}/{POSTGRES['dbname']}")

    async def factory() -> Any:
        raise AssertionError("never called")

    for source in (engine, async_sessionmaker(engine), functools.partial(asyncpg.connect, "postgresql://x"), factory):
        @barrier(db=source)
        async def handler(query: Any, info: Any, tx: Any = None) -> None:
            return None


def test_the_decorator_still_serves_one_request_after_a_refused_concurrent_one(cdriver: str) -> None:
    """db_arg: the handler's own (per-request) connection; two requests given the same object are
    serialised by refusal, never merged."""
    async def body() -> None:
        async with opened(cdriver) as d:
            conn, sync = await d.connect(), d.sync()

            @barrier(db_arg="conn")
            async def handler(query: Any, info: Any, conn: Any, tx: Any = None) -> None:
                await busi_for(d, "saga", info.gid, "action")(tx)
                await asyncio.sleep(0.05)

            ga, gb = local_gid(), local_gid()
            open_account(sync, ga)
            open_account(sync, gb)
            answers = await asyncio.gather(
                handler({"gid": ga, "trans_type": "saga", "branch_id": "01", "op": "action"}, conn=conn),
                handler({"gid": gb, "trans_type": "saga", "branch_id": "01", "op": "action"}, conn=conn),
            )
            assert [a.status for a in answers] == [200, 500]
            assert IN_USE in answers[1].body["message"]
            assert effects(sync, ga) == ["action"] and effects(sync, gb) == []
            sync.close()

    run(body())
