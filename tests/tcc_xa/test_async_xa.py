"""asyncio XA end to end: the global side (dtmcli.asyncio.xa_global_transaction) and the branch side
(``xa_local_transaction`` / ``xa_handle_phase2`` on aiomysql, asyncpg and psycopg ``AsyncConnection``),
through the coordinator (in process, or ``--dtm-server``) and ``async def`` handlers under uvicorn.

The local XA tests need MariaDB, and PostgreSQL with ``max_prepared_transactions > 0``
(``scripts/setup-services.sh``). Each runs in a fresh MariaDB database / PostgreSQL schema (the
barrier conftest's ``mysql_db`` / ``pg_schema``) holding its own barrier and balance tables; prepared
transactions a failed test leaves behind are rolled back.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from typing import Any, Awaitable, Callable, Iterator, TypeVar

import pytest
from barrier.conftest import mysql_db, pg_schema, query_all  # noqa: F401 - fixtures
from services import MYSQL, POSTGRES
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from web_servers import serve_asgi

from dtmcli import BarrierDatabaseError, BranchInfo, DtmFailure, DtmInvalidInput, local_gid
from dtmcli.asyncio.xa import (
    Xa,
    register_xa_branch,
    xa_global_transaction,
    xa_handle_phase2,
    xa_local_transaction,
    xa_preflight,
)
from dtmcli.barrier import create_schema
from dtmcli.barrier import xa_local_transaction as sync_xa_local_transaction
from dtmcli.branch import BranchRequestError
from dtmcli.contrib.starlette import branch_endpoint, branch_payload
from dtmcli.testing import DtmFacade

R = TypeVar("R")


def run(main: Callable[[], Awaitable[R]]) -> R:
    return asyncio.run(main())  # type: ignore[arg-type]


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/dtmsvr"


# -- the global side, with stand-in branches that only register --------------------------------------


@pytest.fixture
def registering_branches() -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """An ``async def`` XA branch at ``<base>/xa/<name>``: on ``action`` it registers with DTM
    (awaited) or fails when the payload says so; phase 2 answers success. Calls are recorded."""
    seen: list[tuple[str, str, str]] = []

    @branch_endpoint
    async def xa_branch(request: Request, info: BranchInfo) -> None:
        seen.append((request.url.path, info.branch_id, info.op))
        if info.op == "action":
            if await branch_payload(request, info) == {"fail": True}:
                raise DtmFailure("local xa failed")
            await register_xa_branch(info)

    app = Starlette(routes=[Route("/xa/{name}", xa_branch, methods=["POST"])])
    with serve_asgi(app) as base:
        yield base, seen


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.02)


def test_xa_success_commits_in_order(dtm: DtmFacade, registering_branches: Any) -> None:
    base, seen = registering_branches
    gid = local_gid()

    async def main() -> str:
        async with xa_global_transaction(dtm.url, gid, timeout_to_fail=30) as xa:
            await xa.call_branch({"amount": 1}, f"{base}/xa/b1")
            reply = await xa.call_branch({"amount": 2}, f"{base}/xa/b2")
        assert xa.state == "submitted"
        return reply.branch_id

    assert run(main) == "02"
    assert dtm.wait_status(gid).status == "succeed"
    wait_for(lambda: len(seen) == 4)
    assert seen == [("/xa/b1", "01", "action"), ("/xa/b2", "02", "action"),
                    ("/xa/b1", "01", "commit"), ("/xa/b2", "02", "commit")]


def test_xa_failure_rolls_back_registered_branches(dtm: DtmFacade, registering_branches: Any) -> None:
    base, seen = registering_branches
    gid = local_gid()

    async def main() -> None:
        async with xa_global_transaction(dtm.url, gid) as xa:
            await xa.call_branch({"amount": 1}, f"{base}/xa/b1")
            await xa.call_branch({"fail": True}, f"{base}/xa/b2")

    with pytest.raises(DtmFailure) as e:
        run(main)
    assert (e.value.gid, e.value.branch_id, e.value.op) == (gid, "02", "action")
    trans = dtm.wait_status(gid)
    assert trans.status == "failed" and "local xa failed" in trans.rollback_reason
    wait_for(lambda: len(seen) == 3)
    assert [s for s in seen if s[2] != "action"] == [("/xa/b1", "01", "rollback")]


def test_xa_callback_and_decorator_forms(dtm: DtmFacade, registering_branches: Any) -> None:
    base, _ = registering_branches

    @xa_global_transaction(dtm.url)
    async def transfer(xa: Xa, amount: int) -> str:
        await xa.call_branch({"amount": amount}, f"{base}/xa/d")
        return xa.gid

    async def callback(xa: Xa) -> int:
        return (await xa.call_branch({"amount": 3}, f"{base}/xa/c")).status

    gid = local_gid()

    async def main() -> tuple[str, int]:
        return await transfer(5), await xa_global_transaction(dtm.url, gid, callback)

    decorated, status = run(main)
    assert status == 200
    assert dtm.wait_status(decorated).status == "succeed" and dtm.wait_status(gid).status == "succeed"
    def plain(xa: Xa) -> None:  # pragma: no cover - never called
        pass

    with pytest.raises(DtmInvalidInput, match="async def"):
        xa_global_transaction(dtm.url)(plain)


ACTION = {"gid": "G1", "branch_id": "01", "trans_type": "xa", "op": "action", "phase2_url": "http://busi.test/xa"}


@pytest.mark.parametrize("over", [{"op": "commit"}, {"trans_type": "tcc", "op": "try"}, {"phase2_url": ""}])
def test_register_xa_branch_bad_info_sends_nothing(over: dict[str, str]) -> None:
    info = BranchInfo.from_query({**ACTION, "dtm": refused_url(), **over})
    with pytest.raises(BranchRequestError):
        run(lambda: register_xa_branch(info))


# -- the branch side: local XA on asyncio connections ------------------------------------------------

DRIVERS = ("aiomysql", "asyncpg", "psycopg")


class Db:
    """A fresh database (MariaDB) or schema (PostgreSQL) with its own barrier and balance tables,
    and a factory of new asyncio connections of ``driver``."""

    def __init__(self, driver: str, name: str, sync_connect: Callable[[], Any]) -> None:
        self.driver, self.name, self.sync_connect = driver, name, sync_connect
        self.barrier, self.balance = f"{name}.barrier", f"{name}.balance"
        self.gids: list[str] = []
        # Connections of the fixture's factory are closed by the fixture; each read ends its
        # transaction, so that no metadata lock holds up the database's drop.
        self.sync = sync_connect()
        create_schema(self.sync, table=self.barrier)
        cur = self.sync.cursor()
        cur.execute(f"create table {self.balance} (user_id varchar(128) primary key, balance int not null)")
        self.sync.commit()

    def new_gid(self) -> str:
        """A fresh gid whose prepared transactions are rolled back after the test."""
        self.gids.append(local_gid())
        return self.gids[-1]

    async def connect(self) -> Any:
        if self.driver == "aiomysql":
            import aiomysql

            return await aiomysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                                          password=MYSQL["password"], db=self.name, autocommit=False)
        if self.driver == "asyncpg":
            import asyncpg

            return await asyncpg.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                                         database=POSTGRES["dbname"])
        import psycopg

        return await psycopg.AsyncConnection.connect(host=POSTGRES["host"], port=POSTGRES["port"],
                                                     user=POSTGRES["user"], dbname=POSTGRES["dbname"])

    async def add_balance(self, conn: Any, user: str, amount: int) -> None:
        """The business SQL of a branch, in each driver's own dialect of placeholders."""
        sql = f"insert into {self.balance}(user_id, balance) values (%s, %s)"
        if self.driver == "aiomysql":
            async with conn.cursor() as cur:
                await cur.execute(sql, (user, amount))
        elif self.driver == "asyncpg":
            await conn.execute(sql.replace("%s, %s", "$1, $2"), user, amount)
        else:
            await conn.execute(sql, (user, amount))

    async def debit(self, conn: Any, user: str, amount: int) -> None:
        sql = f"update {self.balance} set balance = balance - %s where user_id = %s"
        if self.driver == "aiomysql":
            async with conn.cursor() as cur:
                await cur.execute(sql, (amount, user))
        elif self.driver == "asyncpg":
            await conn.execute(sql.replace("%s", "$1", 1).replace("%s", "$2"), amount, user)
        else:
            await conn.execute(sql, (amount, user))

    def open_account(self, user: str, balance: int) -> None:
        cur = self.sync.cursor()
        cur.execute(f"insert into {self.balance}(user_id, balance) values (%s, %s)", (user, balance))
        cur.close()
        self.sync.commit()

    def in_transaction(self, conn: Any) -> bool:
        """Whether ``conn`` still has a transaction open (a closed connection has none: the server ended it)."""
        if self.driver == "aiomysql":
            return not conn.closed and bool(conn.get_transaction_status())
        if self.driver == "asyncpg":
            return not conn.is_closed() and bool(conn.is_in_transaction())
        return not conn.closed and int(conn.info.transaction_status) != 0

    def is_closed(self, conn: Any) -> bool:
        return bool(conn.is_closed() if self.driver == "asyncpg" else conn.closed)

    def rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        return query_all(self.sync, sql, params)  # and ends the read's transaction

    def balances(self, *users: str) -> dict[str, int]:
        got = {}
        for user in users:
            rows = self.rows(f"select balance from {self.balance} where user_id = %s", (user,))
            if rows:
                got[user] = int(rows[0][0])
        return got

    def reasons(self, gid: str) -> list[tuple[str, str]]:
        return sorted(self.rows(f"select branch_id, reason from {self.barrier} where gid = %s", (gid,)))

    def prepared(self, gid: str) -> list[str]:
        if self.driver == "aiomysql":
            rows = self.rows("xa recover", ())
            xids = [r[3].decode() if isinstance(r[3], bytes) else str(r[3]) for r in rows]
        else:
            xids = [r[0] for r in self.rows("select gid from pg_prepared_xacts", ())]
        return [x for x in xids if x.startswith(f"{gid}-")]

    def roll_back_prepared(self) -> None:
        """Roll back prepared transactions a failed test left behind (they would block the drop)."""
        conn = self.sync_connect()
        if self.driver != "aiomysql":
            conn.autocommit = True
        cur = conn.cursor()
        for gid in self.gids:
            for xid in self.prepared(gid):
                cur.execute(f"xa rollback '{xid}'" if self.driver == "aiomysql" else f"rollback prepared '{xid}'")


@pytest.fixture(params=DRIVERS)
def db(request: pytest.FixtureRequest) -> Iterator[Db]:
    driver = str(request.param)
    name, connect = request.getfixturevalue("mysql_db" if driver == "aiomysql" else "pg_schema")
    database = Db(driver, name, connect)
    yield database
    database.roll_back_prepared()


@pytest.fixture
def xa_service(db: Db) -> Iterator[str]:
    """An ``async def`` XA branch running its local transaction on ``db``: the payload names the user
    and amount; ``{"fail": true}`` makes the business SQL raise after inserting."""

    @branch_endpoint
    async def xa_branch(request: Request, info: BranchInfo) -> None:
        if info.op != "action":
            await xa_handle_phase2(info, db.connect, table=db.barrier)
            return
        body = await branch_payload(request, info)

        async def busi(conn: Any) -> None:
            await db.add_balance(conn, body["user"], body["amount"])
            if body.get("fail"):
                raise DtmFailure("insufficient balance")

        await xa_local_transaction(info, db.connect, busi, table=db.barrier)

    app = Starlette(routes=[Route("/xa", xa_branch, methods=["POST"])])
    with serve_asgi(app) as base:
        yield f"{base}/xa"


def test_local_xa_commits_through_the_coordinator(dtm: DtmFacade, db: Db, xa_service: str) -> None:
    gid = db.new_gid()
    users = (f"{gid}-a", f"{gid}-b")

    async def main() -> None:
        async with xa_global_transaction(dtm.url, gid) as xa:
            await asyncio.gather(xa.call_branch({"user": users[0], "amount": 10}, xa_service),
                                 xa.call_branch({"user": users[1], "amount": 20}, xa_service))
            assert sorted(db.prepared(gid)) == [f"{gid}-01", f"{gid}-02"]
            assert db.balances(*users) == {}  # prepared, not committed

    run(main)
    assert dtm.wait_status(gid).status == "succeed"
    wait_for(lambda: not db.prepared(gid))
    assert db.balances(*users) == {users[0]: 10, users[1]: 20}
    assert db.reasons(gid) == [("01", "action"), ("02", "action")]


def test_local_xa_failure_rolls_back_every_branch(dtm: DtmFacade, db: Db, xa_service: str) -> None:
    gid = db.new_gid()
    users = (f"{gid}-a", f"{gid}-b")

    async def main() -> None:
        async with xa_global_transaction(dtm.url, gid) as xa:
            await xa.call_branch({"user": users[0], "amount": 10}, xa_service)
            await xa.call_branch({"user": users[1], "amount": 20, "fail": True}, xa_service)

    with pytest.raises(DtmFailure, match="insufficient balance") as e:
        run(main)
    assert (e.value.branch_id, e.value.op) == ("02", "action")
    assert dtm.wait_status(gid).status == "failed"
    wait_for(lambda: db.reasons(gid) == [("01", "rollback")])  # phase 2 left its marker: no late action
    assert db.balances(*users) == {} and not db.prepared(gid)


def test_local_xa_after_rollback_refuses_the_late_action(db: Db) -> None:
    """Phase 2's rollback arriving first leaves the marker, so the action neither runs nor registers."""
    gid = db.new_gid()
    action = BranchInfo.from_query({**ACTION, "gid": gid, "dtm": refused_url()})  # registering would fail loudly
    ran: list[bool] = []

    async def busi(conn: Any) -> None:
        ran.append(True)

    async def main() -> None:
        await xa_handle_phase2({**ACTION, "gid": gid, "op": "rollback"}, db.connect, table=db.barrier)
        await xa_handle_phase2({**ACTION, "gid": gid, "op": "rollback"}, db.connect, table=db.barrier)  # repeat
        with pytest.raises(DtmFailure, match="already rolled back"):
            await xa_local_transaction(action, db.connect, busi, table=db.barrier)

    run(main)
    assert not ran and not db.prepared(gid) and db.reasons(gid) == [("01", "rollback")]


def test_preflight_and_connection_checks(db: Db) -> None:
    gid = local_gid()
    action = BranchInfo.from_query({**ACTION, "gid": gid, "dtm": refused_url()})

    async def busi(conn: Any) -> None:  # pragma: no cover - never runs
        raise AssertionError

    async def main() -> None:
        conn = await db.connect()
        try:
            await xa_preflight(conn)
            # A connection in the middle of a transaction is refused before any statement.
            if db.driver == "aiomysql":
                await conn.begin()
            elif db.driver == "asyncpg":
                await conn.execute("begin")
            else:
                await conn.execute("select 1")
            with pytest.raises(DtmInvalidInput, match="open local transaction"):
                await xa_local_transaction(action, conn, busi, table=db.barrier)
        finally:
            closing = conn.close()
            if asyncio.iscoroutine(closing):
                await closing
        with pytest.raises(DtmInvalidInput, match="asyncio connection"):
            await xa_local_transaction(action, db.sync, busi, table=db.barrier)  # a blocking connection

    run(main)
    assert db.reasons(gid) == []


def test_the_blocking_local_xa_refuses_asyncio_connections_and_async_business(db: Db) -> None:
    gid = local_gid()
    action = BranchInfo.from_query({**ACTION, "gid": gid, "dtm": refused_url()})

    async def async_busi(conn: Any) -> None:  # pragma: no cover - never awaited
        pass

    async def make() -> Any:
        return await db.connect()

    async def close(conn: Any) -> None:
        closing = conn.close()
        if asyncio.iscoroutine(closing):
            await closing

    loop = asyncio.new_event_loop()
    try:
        conn = loop.run_until_complete(make())
        with pytest.raises(DtmInvalidInput, match=r"dtmcli\.asyncio\.xa_local_transaction"):
            sync_xa_local_transaction(action, conn, lambda tx: None, table=db.barrier)
        loop.run_until_complete(close(conn))
    finally:
        loop.close()
    # An async def business function would be prepared unawaited: refused, rolled back, not registered.
    with pytest.raises(DtmInvalidInput, match="awaitable"):
        sync_xa_local_transaction(action, db.sync_connect(), async_busi, table=db.barrier)
    assert db.reasons(gid) == [] and not db.prepared(gid)


def test_an_async_partial_is_a_factory(db: Db) -> None:
    """``functools.partial(driver.connect, ...)`` is a factory as well (opened and closed for the call)."""
    gid = db.new_gid()
    factory = functools.partial(Db.connect, db)

    async def main() -> None:
        await xa_handle_phase2({**ACTION, "gid": gid, "op": "rollback"}, factory, table=db.barrier)

    run(main)
    assert db.reasons(gid) == [("01", "rollback")]


async def close(conn: Any) -> None:
    closing = conn.close()
    if asyncio.iscoroutine(closing):
        await closing


def test_local_xa_never_reports_success_for_work_a_caught_error_lost(dtm: DtmFacade, db: Db) -> None:
    """C1. PostgreSQL aborts the whole transaction on an error the business code catches; PREPARE then quietly
    rolled it back, the action answered success and phase 2's commit too: DTM marked the transfer succeeded
    with the debit lost. Now the action fails before registering. MariaDB keeps the transaction after a
    statement error: there the debit is prepared and committed as usual."""
    from dtmcli import Xa

    gid = db.new_gid()
    user = f"{gid}-acct"
    db.open_account(user, 100)
    Xa(dtm.url, gid).prepare()
    info = BranchInfo.from_query({**ACTION, "gid": gid, "dtm": dtm.url})

    async def busi(conn: Any) -> str:
        await db.debit(conn, user, 30)
        try:
            await db.add_balance(conn, user, 0)  # the "idempotent" ledger insert: duplicate key
        except Exception:  # "already recorded": exactly the mistake under test
            pass
        return "debited"

    async def main() -> None:
        conn = await db.connect()
        try:
            if db.driver == "aiomysql":
                assert await xa_local_transaction(info, conn, busi, table=db.barrier) == "debited"
            else:
                with pytest.raises(BarrierDatabaseError, match="aborted by a database error the business code"):
                    await xa_local_transaction(info, conn, busi, table=db.barrier)
                assert not db.in_transaction(conn)
        finally:
            await close(conn)  # MariaDB: phase 2 sees the prepared branch once its session is gone
        await xa_handle_phase2({**ACTION, "gid": gid, "op": "commit"}, db.connect, table=db.barrier)

    if db.driver == "aiomysql":
        run(main)
        assert db.balances(user) == {user: 70}
        return
    with pytest.raises(BarrierDatabaseError, match="no committed action barrier row"):  # phase 2: not "done"
        run(main)
    trans = dtm.query(gid)
    assert trans is not None and trans.branches == ()  # never registered: DTM rolls nothing back
    assert db.balances(user) == {user: 100} and not db.prepared(gid) and db.reasons(gid) == []


def never_done(db: Db, user: str, ready: asyncio.Event) -> Callable[[Any], Awaitable[None]]:
    async def busi(conn: Any) -> None:
        await db.add_balance(conn, user, 10)
        ready.set()
        await asyncio.Event().wait()

    return busi


@pytest.mark.parametrize("slow", [False, True], ids=["abort", "slow_abort"])
@pytest.mark.parametrize("cancel", ["anyio_scope", "storm"])
def test_a_cancelled_local_xa_leaves_no_transaction_on_a_dedicated_connection(
    db: Db, cancel: str, slow: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """M2. The abort (XA END / XA ROLLBACK, ROLLBACK) and the autocommit restore run to their end, shielded,
    when the task is cancelled again and again meanwhile (anyio's cancel scopes, as in Starlette/FastAPI,
    cancel every await; a "storm" does so in plain asyncio). Before, the dedicated connection stayed inside
    the XA holding its row locks, so DTM's phase-2 rollback waited on them, and every later use was refused.
    ``slow_abort``: each abort statement waits a little before it is sent (a slow round trip)."""
    import anyio

    from dtmcli.asyncio import xa as axa

    if slow:
        statement = axa._AsyncXaIO.exec

        async def slow_abort(self: Any, sql: str) -> Any:
            if sql.startswith(("xa end", "xa rollback")) or sql == "rollback":
                await asyncio.sleep(0.1)
            return await statement(self, sql)

        monkeypatch.setattr(axa._AsyncXaIO, "exec", slow_abort)
    gid = db.new_gid()
    user = f"{gid}-u"
    info = BranchInfo.from_query({**ACTION, "gid": gid, "dtm": refused_url()})  # never reached

    async def main() -> None:
        conn = await db.connect()
        autocommit = None if db.driver != "psycopg" else conn.autocommit
        ready = asyncio.Event()
        try:
            if cancel == "anyio_scope":
                with pytest.raises(TimeoutError):
                    with anyio.fail_after(0.5):
                        await xa_local_transaction(info, conn, never_done(db, user, ready), table=db.barrier)
            else:
                task = asyncio.ensure_future(
                    xa_local_transaction(info, conn, never_done(db, user, ready), table=db.barrier))
                await ready.wait()
                while not task.done():
                    task.cancel()
                    await asyncio.sleep(0)
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert ready.is_set() and not db.in_transaction(conn)
            if not db.is_closed(conn):
                if autocommit is not None:
                    assert conn.autocommit == autocommit  # the caller's setting is back
                # The connection is usable again (it used to be refused: "has an open local transaction").
                await xa_handle_phase2({**ACTION, "gid": gid, "op": "rollback"}, conn, table=db.barrier)
                assert db.reasons(gid) == [("01", "rollback")]
        finally:
            await close(conn)

    run(main)
    assert db.balances(user) == {} and not db.prepared(gid)


def test_a_cancel_once_prepare_ran_leaves_nothing_prepared(
    dtm: DtmFacade, db: Db, monkeypatch: pytest.MonkeyPatch
) -> None:
    """m6. The task is cancelled after the server ran the PREPARE but before the driver returned. MariaDB's
    XA ROLLBACK removes a prepared XA within the session; PostgreSQL's plain ROLLBACK could not, and the
    prepared transaction held its locks until DTM's phase-2 rollback. Now ROLLBACK PREPARED follows."""
    from dtmcli import Xa
    from dtmcli.asyncio import xa as axa

    statement = axa._AsyncXaIO.exec
    prepared = asyncio.Event()

    async def exec_then_hang(self: Any, sql: str) -> Any:
        tag = await statement(self, sql)
        if sql.startswith(("xa prepare", "prepare transaction")):
            prepared.set()
            await asyncio.Event().wait()
        return tag

    monkeypatch.setattr(axa._AsyncXaIO, "exec", exec_then_hang)
    gid = db.new_gid()
    user = f"{gid}-u"

    Xa(dtm.url, gid).prepare()
    info = BranchInfo.from_query({**ACTION, "gid": gid, "dtm": dtm.url})

    async def busi(conn: Any) -> None:
        await db.add_balance(conn, user, 10)

    async def main() -> None:
        task = asyncio.ensure_future(xa_local_transaction(info, db.connect, busi, table=db.barrier))
        await asyncio.wait_for(prepared.wait(), 10)
        assert db.prepared(gid) == [f"{gid}-01"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main)
    assert not db.prepared(gid) and db.balances(user) == {}
