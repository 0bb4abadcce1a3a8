"""``@barrier`` on ``async def`` handlers and the async query_prepared helpers, on real PostgreSQL (asyncpg)
and MariaDB (aiomysql), over real HTTP (FastAPI ``DtmRoute`` and Django async views under uvicorn).

Each test works in a PostgreSQL schema / MariaDB database of its own (the barrier conftest's
``pg_schema`` / ``mysql_db``), barrier table included. A database of the other kind than the handler
is refused before any statement runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Annotated, Any, AsyncIterator, Callable, Iterator
from urllib.parse import urlencode

import httpx
import pytest
import requests
from barrier.conftest import mysql_db, pg_schema  # noqa: F401  (fixtures: a fresh database / schema)
from django.urls import path
from fastapi import APIRouter, Depends, FastAPI
from services import MYSQL, POSTGRES
from starlette.requests import Request
from web_servers import serve_asgi

from dtmcli import BranchInfo, DtmInvalidInput, local_gid
from dtmcli._barrier_decorator import SyncAsyncMismatch, db_kind
from dtmcli.barrier import BranchBarrier, barrier, create_schema
from dtmcli.branch import BranchResponse, current_branch_info
from dtmcli.contrib.fastapi import BranchDep, DtmRoute, query_prepared_endpoint

DELTA = {"action": -10, "compensate": 10}


@dataclass
class Db:
    """One fresh database for a test: its async factory and the sync helpers to check it."""

    driver: str
    schema: str
    sync_connect: Callable[[], Any]

    @property
    def barrier_table(self) -> str:
        return f"{self.schema}.barrier"

    @property
    def balance_table(self) -> str:
        return f"{self.schema}.balance"

    def connect(self) -> Callable[[], Any]:
        """An async connection factory (a coroutine function behind functools.partial)."""
        if self.driver == "asyncpg":
            import asyncpg

            return functools.partial(asyncpg.connect, host=POSTGRES["host"], port=POSTGRES["port"],
                                     user=POSTGRES["user"], database=POSTGRES["dbname"])
        import aiomysql

        return functools.partial(aiomysql.connect, host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                                 password=MYSQL["password"], db=self.schema, autocommit=False, charset="utf8mb4")

    async def add(self, tx: Any, gid: str, delta: int) -> None:
        """The business update, on the barrier's transaction."""
        if self.driver == "asyncpg":
            await tx.execute(f"update {self.balance_table} set balance = balance + $1 where user_id = $2", delta, gid)
            return
        async with tx.cursor() as cur:
            await cur.execute(f"update {self.balance_table} set balance = balance + %s where user_id = %s",
                              (delta, gid))

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self.sync_connect()
        cur = conn.cursor()
        cur.execute(sql, params)
        rows = [tuple(r) for r in cur.fetchall()] if cur.description else []
        conn.commit()
        return rows

    def open_account(self, gid: str, amount: int = 100) -> None:
        self._run(f"insert into {self.balance_table}(user_id, balance) values (%s, %s)", (gid, amount))

    def balance(self, gid: str) -> int:
        return int(self._run(f"select balance from {self.balance_table} where user_id = %s", (gid,))[0][0])

    def barrier_rows(self, gid: str) -> int:
        return int(self._run(f"select count(*) from {self.barrier_table} where gid = %s", (gid,))[0][0])


@pytest.fixture(params=["asyncpg", "aiomysql"])
def db(request: pytest.FixtureRequest) -> Db:
    driver = str(request.param)
    schema, sync_connect = request.getfixturevalue("pg_schema" if driver == "asyncpg" else "mysql_db")
    d = Db(driver, schema, sync_connect)
    conn = sync_connect()
    create_schema(conn, table=d.barrier_table)
    conn.cursor().execute(f"create table {d.balance_table} (user_id varchar(128) primary key, balance int not null)")
    conn.commit()
    return d


def q(gid: str, op: str, trans_type: str = "saga") -> dict[str, str]:
    return {"gid": gid, "trans_type": trans_type, "branch_id": "01", "op": op}


async def business(db: Db, ran: list[str], info: BranchInfo, tx: Any) -> Any:
    """What every handler does: moves 10, and answers FAILURE for gids with 'fail' (after the update)."""
    assert current_branch_info() == info  # concurrent calls each see their own
    await db.add(tx, info.gid, DELTA[info.op])
    await asyncio.sleep(0.05)  # hold the barrier transaction a while: concurrent calls overlap
    ran.append(info.op)
    if info.op == "action" and "fail" in info.gid:
        return {"dtm_result": "FAILURE", "message": "insufficient balance"}
    return None


def make_handler(db: Db, ran: list[str]) -> Callable[..., Any]:
    """A handler of the plain form (``handler(query)``) or under an integration (``info=``)."""

    @barrier(db=db.connect(), table=db.barrier_table)
    async def saga(*args: Any, info: BranchInfo, tx: Any) -> Any:
        return await business(db, ran, info, tx)

    return saga


# -- the plain form, awaited directly ---------------------------------------------------------------------------


def test_async_handler_runs_once_per_op(db: Db) -> None:
    ran: list[str] = []
    handler = make_handler(db, ran)
    ok, failed = local_gid(), f"fail-{local_gid()}"
    db.open_account(ok)
    db.open_account(failed)

    async def scenario() -> list[BranchResponse]:
        return [
            await handler(q(ok, "action")),
            await handler(q(ok, "action")),  # duplicate: not run
            await handler(q(ok, "compensate")),
            await handler(q(failed, "action")),  # returned FAILURE: rolled back
            await handler(q(failed, "compensate")),  # null compensation: not run
            await handler({"gid": ok}),
        ]

    answers = asyncio.run(scenario())
    assert [a.status for a in answers] == [200, 200, 200, 409, 200, 400]
    assert ran == ["action", "compensate", "action"]
    assert (db.balance(ok), db.balance(failed)) == (100, 100)


def test_concurrent_duplicate_deliveries_run_once(db: Db) -> None:
    ran: list[str] = []
    handler = make_handler(db, ran)
    gid = local_gid()
    db.open_account(gid)

    async def deliver() -> list[BranchResponse]:
        return list(await asyncio.gather(*(handler(q(gid, "action")) for _ in range(5))))

    answers = asyncio.run(deliver())
    assert [a.status for a in answers] == [200] * 5
    assert ran == ["action"] and db.balance(gid) == 90


# -- FastAPI: an async route with a dependency-injected async connection ----------------------------------------


async def get_conn(request: Request) -> AsyncIterator[Any]:
    """A FastAPI dependency: one async connection per request from the app's factory, closed after."""
    conn = await request.app.state.connect()
    try:
        yield conn
    finally:
        result = conn.close()
        if asyncio.iscoroutine(result):  # asyncpg: awaited; aiomysql: closes at once
            await result


ConnDep = Annotated[Any, Depends(get_conn)]


@contextlib.contextmanager
def fastapi_service(db: Db, ran: list[str]) -> Iterator[str]:
    connect = db.connect()
    app = FastAPI()
    app.state.connect = connect
    router = APIRouter(route_class=DtmRoute)

    @router.post("/saga")
    @barrier(db_arg="conn", table=db.barrier_table)
    async def saga(info: BranchDep, conn: ConnDep, tx: Any = None) -> Any:
        return await business(db, ran, info, tx)

    router.get("/qp")(query_prepared_endpoint(connect, table=db.barrier_table))
    app.include_router(router)
    with serve_asgi(app) as base:
        yield base


def call(base: str, gid: str, op: str) -> requests.Response:
    return requests.post(f"{base}/saga?{urlencode(q(gid, op))}", json={"amount": 10}, timeout=10)


def test_fastapi_async_route_with_injected_connection(db: Db) -> None:
    ran: list[str] = []
    with fastapi_service(db, ran) as base:
        failed = f"fail-{local_gid()}"
        db.open_account(failed)
        r = call(base, failed, "action")
        assert (r.status_code, r.json().get("dtm_result")) == (409, "FAILURE"), r.text
        assert call(base, failed, "compensate").status_code == 200  # null compensation
        assert ran == ["action"] and db.balance(failed) == 100

        ok = local_gid()
        db.open_account(ok)
        assert call(base, ok, "action").status_code == 200 and db.balance(ok) == 90
        assert call(base, ok, "action").status_code == 200 and db.balance(ok) == 90  # duplicate
        assert call(base, ok, "compensate").status_code == 200 and db.balance(ok) == 100
        assert requests.post(f"{base}/saga?gid=x", timeout=10).status_code == 400

        gid = local_gid()
        db.open_account(gid)

        async def deliver() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=10) as client:
                url = f"{base}/saga?{urlencode(q(gid, 'action'))}"
                return list(await asyncio.gather(*(client.post(url) for _ in range(4))))

        assert [r.status_code for r in asyncio.run(deliver())] == [200] * 4
        assert ran.count("action") == 3 and db.balance(gid) == 90  # one of the four ran


def test_fastapi_async_query_prepared_endpoint(db: Db) -> None:
    committed = local_gid()
    conn = db.sync_connect()
    BranchBarrier.for_msg(committed, table=db.barrier_table).call(conn, lambda tx: None)
    with fastapi_service(db, []) as base:
        def ask(gid: str, trans_type: str = "msg") -> requests.Response:
            query = {"gid": gid, "trans_type": trans_type, "branch_id": "00", "op": "msg"}
            return requests.get(f"{base}/qp", params=query, timeout=10)

        assert ask(committed).json() == {"dtm_result": "SUCCESS"}
        never = local_gid()
        assert ask(never).status_code == 409
        assert ask(never).status_code == 409  # the rollback marker stays
        assert ask(committed, "saga").status_code == 400
    assert db.barrier_rows(never) == 1


# -- Django: an async view under ASGI ---------------------------------------------------------------------------

urlpatterns: list[Any] = []


@contextlib.contextmanager
def django_service(db: Db, ran: list[str]) -> Iterator[str]:
    import django
    from django.conf import settings
    from django.core.handlers.asgi import ASGIHandler
    from django.test import override_settings

    from dtmcli.contrib.django import branch_handler, query_prepared_view

    if not settings.configured:
        settings.configure(
            SECRET_KEY="test", DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
        )
        django.setup()
    view = branch_handler(make_handler(db, ran))
    qp = query_prepared_view(db.connect(), table=db.barrier_table)
    assert asyncio.iscoroutinefunction(view) and asyncio.iscoroutinefunction(qp)
    urlpatterns[:] = [path("saga", view), path("qp", qp)]
    with override_settings(
        ROOT_URLCONF=__name__, MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"], ALLOWED_HOSTS=["127.0.0.1"]
    ), serve_asgi(ASGIHandler()) as base:
        yield base


def test_django_async_view(db: Db) -> None:
    ran: list[str] = []
    with django_service(db, ran) as base:
        failed = f"fail-{local_gid()}"
        db.open_account(failed)
        assert call(base, failed, "action").status_code == 409
        assert call(base, failed, "compensate").status_code == 200
        ok = local_gid()
        db.open_account(ok)
        assert call(base, ok, "action").status_code == 200
        assert call(base, ok, "action").status_code == 200
        assert ran == ["action", "action"] and (db.balance(failed), db.balance(ok)) == (100, 90)
        query = {"gid": ok, "trans_type": "msg", "branch_id": "00", "op": "msg"}
        assert requests.get(f"{base}/qp", params=query, timeout=10).status_code == 409


# -- a database of the other kind is refused --------------------------------------------------------------------


async def async_handler(info: BranchInfo, tx: Any) -> None:
    raise AssertionError("must not run")


def sync_handler(info: BranchInfo, tx: Any) -> None:
    raise AssertionError("must not run")


def plain_factory() -> Any:  # an application's own factory: its kind shows only when called
    raise AssertionError("must not be called")


def sync_sources() -> list[Any]:
    import psycopg
    import pymysql
    from sqlalchemy import create_engine

    return ["django", "django:other", pymysql.connect, psycopg.connect, plain_factory,
            create_engine("postgresql+psycopg2://postgres@127.0.0.1/test")]


def async_sources() -> list[Any]:
    import aiomysql
    import asyncpg
    import psycopg
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    engine = create_async_engine("postgresql+asyncpg://postgres@127.0.0.1/test")
    return [asyncpg.connect, functools.partial(asyncpg.connect, "postgresql://x"), aiomysql.connect,
            aiomysql.create_pool, psycopg.AsyncConnection.connect, engine, async_sessionmaker(engine)]


def test_kinds_of_database_sources() -> None:
    assert [db_kind(s) for s in async_sources()] == ["async"] * 7
    assert [db_kind(s) for s in sync_sources()] == ["sync", "sync", "sync", "sync", None, "sync"]


def test_mismatch_is_refused_when_decorating() -> None:
    for source in sync_sources():
        with pytest.raises(SyncAsyncMismatch, match="async def handler"):
            barrier(db=source)(async_handler)
    for source in async_sources():
        with pytest.raises(SyncAsyncMismatch, match="plain def"):
            barrier(db=source)(sync_handler)
    assert issubclass(SyncAsyncMismatch, TypeError)


def test_mismatch_met_at_the_first_call_runs_nothing(db: Db) -> None:
    # A sync handler whose own factory hands out an async connection (here: a coroutine).
    gid = local_gid()
    connect = db.connect()
    made: list[Any] = []

    def factory() -> Any:
        made.append(connect())
        return made[-1]

    handler = barrier(db=factory, table=db.barrier_table)(sync_handler)
    answer = handler(q(gid, "action"))
    assert answer.status == 500 and "an async database but the handler is a plain def" in answer.body["message"]
    coroutine = getattr(made[0], "_coro", made[0])  # aiomysql wraps it
    assert inspect.getcoroutinestate(coroutine) == inspect.CORO_CLOSED  # no "never awaited" warning later

    # An async handler given a blocking connection through its argument.
    blocking = db.sync_connect()

    @barrier(db_arg="conn", table=db.barrier_table)
    async def uses_arg(query: Any, info: BranchInfo, conn: Any, tx: Any) -> None:
        raise AssertionError("must not run")

    answer = asyncio.run(uses_arg(q(gid, "action"), conn=blocking))
    assert answer.status == 500 and "would block the event loop of this async def handler" in answer.body["message"]
    assert db.barrier_rows(gid) == 0


def test_sync_handler_refuses_an_async_connection_argument(db: Db) -> None:
    @barrier(db_arg="conn", table=db.barrier_table)
    def uses_arg(query: Any, info: BranchInfo, conn: Any, tx: Any) -> None:
        raise AssertionError("must not run")

    gid = local_gid()

    async def scenario() -> BranchResponse:
        conn = await db.connect()()
        try:
            return uses_arg(q(gid, "action"), conn=conn)  # type: ignore[no-any-return]
        finally:
            closing = conn.close()
            if asyncio.iscoroutine(closing):
                await closing

    answer = asyncio.run(scenario())
    assert answer.status == 500 and "an async database but the handler is a plain def" in answer.body["message"]
    assert db.barrier_rows(gid) == 0


@pytest.mark.parametrize("kwargs", [{}, {"db": "django", "db_arg": "conn"}, {"db_arg": "tx"}, {"db_arg": "no such"}])
def test_db_or_db_arg_is_required(kwargs: dict[str, Any]) -> None:
    with pytest.raises(DtmInvalidInput, match="db_arg"):
        barrier(**kwargs)


def test_async_handler_without_its_db_arg_is_500() -> None:
    @barrier(db_arg="conn")
    async def handler(query: Any, info: BranchInfo, tx: Any, conn: Any = None) -> None:
        raise AssertionError("must not run")

    answer = asyncio.run(handler(q(local_gid(), "action")))
    assert answer.status == 500 and "called without conn=" in answer.body["message"]


@pytest.mark.parametrize("kind", ["psycopg", "sqlalchemy"])
def test_psycopg_async_connection_and_sqlalchemy_async_engine(pg_schema: Any, kind: str) -> None:  # noqa: F811
    import psycopg
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    schema, sync_connect = pg_schema
    db = Db("asyncpg", schema, sync_connect)
    conn = sync_connect()
    create_schema(conn, table=db.barrier_table)
    conn.cursor().execute(f"create table {db.balance_table} (user_id varchar(128) primary key, balance int not null)")
    conn.commit()
    pg = POSTGRES
    if kind == "psycopg":
        source: Any = functools.partial(psycopg.AsyncConnection.connect, host=pg["host"], port=pg["port"],
                                        user=pg["user"], dbname=pg["dbname"])
    else:
        source = create_async_engine(f"postgresql+asyncpg://{pg['user']}@{pg['host']}:{pg['port']}/{pg['dbname']}")
    ran: list[str] = []

    @barrier(db=source, table=db.barrier_table)
    async def saga(query: Any, info: BranchInfo, tx: Any) -> None:
        sql = f"update {db.balance_table} set balance = balance - 10 where user_id = %s"
        if kind == "psycopg":
            await tx.execute(sql, (info.gid,))
        else:
            await tx.execute(text(sql.replace("%s", ":gid")), {"gid": info.gid})
        ran.append(info.op)

    gid = local_gid()
    db.open_account(gid)

    async def scenario() -> list[int]:
        answers = [(await saga(q(gid, "action"))).status for _ in range(2)]
        if kind == "sqlalchemy":
            await source.dispose()
        return answers

    assert asyncio.run(scenario()) == [200, 200]
    assert ran == ["action"] and db.balance(gid) == 90


def test_sync_query_prepared_refuses_a_factory_of_async_connections(db: Db) -> None:
    from dtmcli.contrib._query_prepared import query_prepared_answer

    connect = db.connect()
    query = {"gid": local_gid(), "trans_type": "msg", "branch_id": "00", "op": "msg"}
    answer = query_prepared_answer(query, lambda: connect(), table=db.barrier_table)  # a lambda: kind unknown
    assert answer.status == 500 and "an async database but the handler is a plain def" in answer.body["message"]
    assert db.barrier_rows(query["gid"]) == 0
