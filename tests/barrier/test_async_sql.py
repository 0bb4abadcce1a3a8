"""The asyncio SQL barrier on real MariaDB (aiomysql) and PostgreSQL (asyncpg, psycopg 3 async), and
SQLAlchemy async (AsyncConnection on asyncpg and aiomysql, AsyncSession on psycopg): the scenarios of
test_sql.py and test_managed.py, checked against the same model, tables and rows as the blocking barrier.

No pytest-asyncio: each test runs its coroutine with ``asyncio.run``. Results are read back with the
blocking drivers (conftest), so both flavours are seen to write the very same rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

import pytest
from conftest import BALANCE_TABLE, EFFECT_TABLE, _prepare, execute, mysql_connect, psycopg2_connect, query_all
from services import MYSQL, POSTGRES, require
from test_sql import COMPENSATION, DELTA, FORWARD, START, model, sequences

from dtmcli import DtmDuplicated, DtmFailure, DtmInvalidInput, local_gid
from dtmcli._barrier.sql import numbered
from dtmcli._barrier.sql_conn import _to_named
from dtmcli.asyncio import barrier as abarrier
from dtmcli.asyncio.barrier import BranchBarrier
from dtmcli.barrier import BarrierConflict, BarrierDatabaseError, Decision

ADRIVERS = ("aiomysql", "asyncpg", "psycopg_async", "sa_asyncpg", "sa_aiomysql", "sa_psycopg_session")
ASERVICE = {"aiomysql": "mysql", "asyncpg": "postgres", "psycopg_async": "postgres", "sa_asyncpg": "postgres",
            "sa_aiomysql": "mysql", "sa_psycopg_session": "postgres"}
RAW = ("aiomysql", "asyncpg", "psycopg_async")  # plain driver connections (the barrier owns the transaction)

PG_DSN = f"host={POSTGRES['host']} port={POSTGRES['port']} user={POSTGRES['user']} dbname={POSTGRES['dbname']}"
SA_URLS = {
    "sa_asyncpg": f"postgresql+asyncpg://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{POSTGRES['dbname']}",
    "sa_psycopg_session": (f"postgresql+psycopg://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/"
                           f"{POSTGRES['dbname']}"),
    "sa_aiomysql": f"mysql+aiomysql://{MYSQL['user']}@{MYSQL['host']}:{MYSQL['port']}/{MYSQL['database']}",
}


def run(coro: Awaitable[Any]) -> Any:
    """Run one test's coroutine on a fresh event loop."""
    return asyncio.run(coro)  # type: ignore[arg-type]


# -- drivers ----------------------------------------------------------------------------------------------------------

async def raw_connect(driver: str, **kw: Any) -> Any:
    """A new plain async connection of ``driver`` (``aiomysql``, ``asyncpg``, ``psycopg_async``)."""
    if driver == "aiomysql":
        import aiomysql

        return await aiomysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                                      password=MYSQL["password"], db=kw.pop("db", MYSQL["database"]), **kw)
    if driver == "asyncpg":
        import asyncpg

        return await asyncpg.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                                     database=POSTGRES["dbname"], **kw)
    import psycopg

    return await psycopg.AsyncConnection.connect(PG_DSN, **kw)


async def close(conn: Any) -> None:
    result = conn.close()
    if asyncio.iscoroutine(result):
        await result


class Driver:
    """Opens connections of one async driver and runs business SQL on the barrier's ``tx``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.service = ASERVICE[name]
        self.engine: Any = None
        self.opened: list[Any] = []

    async def connect(self) -> Any:
        if self.name in RAW:
            conn = await raw_connect(self.name)
        else:
            from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

            if self.engine is None:
                self.engine = create_async_engine(SA_URLS[self.name])
            conn = AsyncSession(self.engine) if self.name.endswith("session") else await self.engine.connect()
        self.opened.append(conn)
        return conn

    async def aclose(self) -> None:
        for conn in self.opened:
            with contextlib.suppress(Exception):
                await close(conn)
        if self.engine is not None:
            await self.engine.dispose()

    async def run(self, tx: Any, sql: str, params: tuple[Any, ...] = ()) -> None:
        """Business SQL (``%s`` placeholders) on the barrier's transaction handle."""
        if self.name.startswith("sa_"):
            from sqlalchemy import text

            await tx.execute(text(_to_named(sql)), {f"p{i}": v for i, v in enumerate(params)})
        elif self.name == "asyncpg":
            await tx.execute(numbered(sql), *params)
        elif self.name == "aiomysql":
            cur = await tx.cursor()
            await cur.execute(sql, params)
            await cur.close()
        else:
            async with tx.cursor() as cur:
                await cur.execute(sql, params)

    def sync(self) -> Any:
        """A blocking connection to the same database, for setup and reading results."""
        return mysql_connect() if self.service == "mysql" else psycopg2_connect()


@contextlib.asynccontextmanager
async def opened(name: str) -> AsyncIterator[Driver]:
    d = Driver(name)
    try:
        yield d
    finally:
        await d.aclose()


@pytest.fixture(params=ADRIVERS)
def adriver(request: pytest.FixtureRequest) -> str:
    """Each async SQL test runs on every async driver."""
    name = str(request.param)
    require(ASERVICE[name])
    _prepare(ASERVICE[name])
    return name


@pytest.fixture(params=RAW)
def raw_driver(request: pytest.FixtureRequest) -> str:
    """The plain driver connections only (the barrier owns the transaction)."""
    name = str(request.param)
    require(ASERVICE[name])
    _prepare(ASERVICE[name])
    return name


# -- helpers on results (read with the blocking drivers) ------------------------------------------------------------

def open_account(sync: Any, user: str, amount: int = START) -> None:
    execute(sync, f"insert into {BALANCE_TABLE}(user_id, balance) values (%s, %s)", (user, amount))
    sync.commit()


def balance(sync: Any, user: str) -> int:
    return int(query_all(sync, f"select balance from {BALANCE_TABLE} where user_id = %s", (user,))[0][0])


def effects(sync: Any, gid: str) -> list[str]:
    return sorted(r[0] for r in query_all(sync, f"select op from {EFFECT_TABLE} where gid = %s", (gid,)))


def barrier_rows(sync: Any, gid: str) -> list[tuple[str, ...]]:
    return sorted(tuple(r) for r in query_all(
        sync, "select trans_type, branch_id, op, barrier_id, reason from dtm_barrier.barrier where gid = %s", (gid,)))


def busi_for(d: Driver, trans_type: str, gid: str, op: str) -> Callable[[Any], Awaitable[str]]:
    """The business function of one op: adjust the balance and log the effect."""

    async def busi(tx: Any) -> str:
        await d.run(tx, f"update {BALANCE_TABLE} set balance = balance + %s where user_id = %s",
                    (DELTA[(trans_type, op)], gid))
        await d.run(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)", (gid, op))
        return f"did {op}"

    return busi


async def call_op(d: Driver, conn: Any, trans_type: str, gid: str, op: str) -> tuple[Optional[str], Any]:
    bb = BranchBarrier(trans_type, gid, "01", op)
    result = await bb.call(conn, busi_for(d, trans_type, gid, op))
    return result, bb.last_decision


async def with_retries(fn: Callable[[], Awaitable[Any]]) -> Any:
    """What DTM does with a 425 (BarrierConflict): call again."""
    for _attempt in range(20):
        try:
            return await fn()
        except BarrierConflict:
            await asyncio.sleep(0.01)
    raise AssertionError("still conflicting after 20 attempts")


# -- the scenarios of test_sql.py -----------------------------------------------------------------------------------

def test_every_order_with_duplicates(adriver: str) -> None:
    async def body() -> None:
        async with opened(adriver) as d:
            conn, sync = await d.connect(), d.sync()
            for trans_type, seq in sequences():
                gid = local_gid()
                open_account(sync, gid)
                for op in seq:
                    result, decision = await call_op(d, conn, trans_type, gid, op)
                    assert (result is not None) == (decision is Decision.RUN)
                expected = model(trans_type, seq)
                assert effects(sync, gid) == sorted(expected), (trans_type, seq)
                assert balance(sync, gid) == START + sum(DELTA[(trans_type, op)] for op in expected), (trans_type, seq)
            sync.close()

    run(body())


def test_null_compensation_and_suspended_try_write_the_blocking_barriers_rows(adriver: str) -> None:
    async def body() -> None:
        async with opened(adriver) as d:
            conn, sync = await d.connect(), d.sync()
            gid = local_gid()
            open_account(sync, gid)
            assert await call_op(d, conn, "tcc", gid, "cancel") == (None, Decision.NULL_COMPENSATION)
            assert await call_op(d, conn, "tcc", gid, "try") == (None, Decision.DUPLICATE)  # suspended
            assert balance(sync, gid) == START
            assert barrier_rows(sync, gid) == [("tcc", "01", "cancel", "01", "cancel"),
                                               ("tcc", "01", "try", "01", "cancel")]
            # the blocking barrier sees the async barrier's rows, and the other way round
            from dtmcli.barrier import BranchBarrier as SyncBarrier

            sync_bb = SyncBarrier("tcc", gid, "01", "try")
            assert sync_bb.call(sync, lambda tx: "ran") is None and sync_bb.last_decision is Decision.DUPLICATE
            SyncBarrier("saga", gid, "02", "action").call(sync, lambda tx: "ran")
            bb = BranchBarrier("saga", gid, "02", "action")
            assert await bb.call(conn, busi_for(d, "saga", gid, "action")) is None
            assert bb.last_decision is Decision.DUPLICATE
            sync.close()

    run(body())


def test_barrier_ids_count_up_within_one_branch_call(adriver: str) -> None:
    async def body() -> None:
        async with opened(adriver) as d:
            conn, sync = await d.connect(), d.sync()
            gid = local_gid()
            open_account(sync, gid)
            bb = BranchBarrier("saga", gid, "01", "action")
            await bb.call(conn, busi_for(d, "saga", gid, "action"))
            await bb.call(conn, busi_for(d, "saga", gid, "action"))
            assert [r[3] for r in barrier_rows(sync, gid)] == ["01", "02"]
            assert balance(sync, gid) == START + 20
            sync.close()

    run(body())


def test_msg_barrier_duplicate_and_query_prepared(adriver: str) -> None:
    async def body() -> None:
        async with opened(adriver) as d:
            conn, sync = await d.connect(), d.sync()
            gid = local_gid()
            open_account(sync, gid)
            await BranchBarrier.for_msg(gid).call(conn, busi_for(d, "saga", gid, "action"))
            with pytest.raises(DtmDuplicated):
                await BranchBarrier.for_msg(gid).call(conn, busi_for(d, "saga", gid, "action"))
            assert balance(sync, gid) == START + 10
            await abarrier.query_prepared({"trans_type": "msg", "gid": gid, "branch_id": "00", "op": "msg"}, conn)
            assert barrier_rows(sync, gid) == [("msg", "00", "msg", "01", "msg")]

            late = local_gid()
            open_account(sync, late)
            with pytest.raises(DtmFailure):
                await abarrier.query_prepared(late, conn)  # nothing committed yet: the rollback marker wins
            with pytest.raises(DtmDuplicated):
                await BranchBarrier.for_msg(late).call(conn, busi_for(d, "saga", late, "action"))
            assert balance(sync, late) == START
            with pytest.raises(DtmFailure):
                await BranchBarrier.for_msg(late).query_prepared(conn)  # stays rolled back
            assert barrier_rows(sync, late) == [("msg", "00", "msg", "01", "rollback")]
            sync.close()

    run(body())


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_query_prepared_in_doubt_waits_for_the_local_transaction(adriver: str, outcome: str) -> None:
    """query_prepared arriving while the msg's local transaction is still open: its insert waits on the
    row lock, and the local transaction's outcome decides the answer."""

    async def body() -> None:
        async with opened(adriver) as d:
            local, checker, sync = await d.connect(), await d.connect(), d.sync()
            gid = local_gid()
            inserted, release = asyncio.Event(), asyncio.Event()

            async def busi(tx: Any) -> str:
                await d.run(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, 'msg')", (gid,))
                inserted.set()
                await release.wait()
                if outcome == "rollback":
                    raise ValueError("local work failed")
                return "done"

            async def local_tx() -> Any:
                try:
                    return await BranchBarrier.for_msg(gid).call(local, busi)
                except ValueError as exc:
                    return exc

            async def query() -> str:
                await inserted.wait()
                try:
                    await abarrier.query_prepared(gid, checker)
                    return "committed"
                except DtmFailure:
                    return "rolled back"

            async def later() -> None:
                await inserted.wait()
                await asyncio.sleep(0.3)  # query_prepared is now blocked on the msg row
                release.set()

            result, answer, _ = await asyncio.gather(local_tx(), query(), later())
            if outcome == "commit":
                assert (result, answer) == ("done", "committed")
                assert effects(sync, gid) == ["msg"]
            else:
                assert isinstance(result, ValueError) and answer == "rolled back"
                assert effects(sync, gid) == []
                assert barrier_rows(sync, gid) == [("msg", "00", "msg", "01", "rollback")]
            sync.close()

    run(body())


def test_business_error_rolls_back_barrier_rows(adriver: str) -> None:
    async def body() -> None:
        async with opened(adriver) as d:
            conn, sync = await d.connect(), d.sync()
            gid = local_gid()
            open_account(sync, gid)

            async def failing(tx: Any) -> None:
                await busi_for(d, "saga", gid, "action")(tx)
                raise ValueError("business says no")

            with pytest.raises(ValueError, match="business says no"):
                await BranchBarrier("saga", gid, "01", "action").call(conn, failing)
            assert barrier_rows(sync, gid) == []
            assert balance(sync, gid) == START
            assert await call_op(d, conn, "saga", gid, "action") == ("did action", Decision.RUN)  # the retry runs
            assert balance(sync, gid) == START + 10
            with pytest.raises(DtmFailure):
                await BranchBarrier("saga", local_gid(), "01", "action").call(conn, _raise_failure)
            sync.close()

    run(body())


async def _raise_failure(tx: Any) -> None:
    raise DtmFailure("insufficient balance")


def test_a_plain_business_function_works_too(adriver: str) -> None:
    async def body() -> None:
        async with opened(adriver) as d:
            conn = await d.connect()
            assert await BranchBarrier("saga", local_gid(), "01", "action").call(conn, lambda tx: "sync busi") == (
                "sync busi")

    run(body())


def test_connection_with_open_transaction_is_refused(raw_driver: str) -> None:
    async def body() -> None:
        async with opened(raw_driver) as d:
            conn = await d.connect()
            if raw_driver == "asyncpg":
                tr = conn.transaction()
                await tr.start()
            elif raw_driver == "aiomysql":
                await conn.begin()
            else:
                await conn.execute("select 1")
            with pytest.raises(DtmInvalidInput, match="open transaction"):
                await BranchBarrier("saga", local_gid(), "01", "action").call(conn, lambda tx: None)
            await (tr.rollback() if raw_driver == "asyncpg" else conn.rollback())

    run(body())


def test_autocommit_connection_still_gets_one_transaction(raw_driver: str) -> None:
    async def body() -> None:
        async with opened(raw_driver) as d:
            conn, sync = await d.connect(), d.sync()
            if raw_driver == "aiomysql":
                await conn.autocommit(True)
            elif raw_driver == "psycopg_async":
                await conn.set_autocommit(True)
            gid = local_gid()

            async def failing(tx: Any) -> None:
                await d.run(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, 'action')", (gid,))
                raise ValueError("boom")

            with pytest.raises(ValueError):
                await BranchBarrier("saga", gid, "01", "action").call(conn, failing)
            assert barrier_rows(sync, gid) == [] and effects(sync, gid) == []
            if raw_driver == "aiomysql":
                assert conn.get_autocommit() is True
            elif raw_driver == "psycopg_async":
                assert conn.autocommit is True
            await BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: None)
            assert len(barrier_rows(sync, gid)) == 1
            sync.close()

    run(body())


@pytest.mark.parametrize("name", ["sa_asyncpg", "sa_aiomysql", "sa_psycopg_session"])
def test_sqlalchemy_joins_the_callers_transaction(name: str) -> None:
    require(ASERVICE[name])
    _prepare(ASERVICE[name])

    async def body() -> None:
        async with opened(name) as d:
            conn, sync = await d.connect(), d.sync()
            gid, other = local_gid(), local_gid()

            async def effect(tx: Any, g: str = gid) -> str:
                await d.run(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, 'action')", (g,))
                return "ran"

            async def failing(tx: Any) -> None:
                await effect(tx, other)
                raise ValueError("no")

            await conn.begin()
            assert await BranchBarrier("saga", gid, "01", "action").call(conn, effect) == "ran"
            with pytest.raises(ValueError):  # rolls back to its savepoint only
                await BranchBarrier("saga", other, "01", "action").call(conn, failing)
            await conn.rollback()  # the caller decides: barrier rows and business rows go together
            assert barrier_rows(sync, gid) == [] and effects(sync, gid) == []
            await conn.begin()
            await BranchBarrier("saga", gid, "01", "action").call(conn, effect)
            with pytest.raises(ValueError):
                await BranchBarrier("saga", other, "01", "action").call(conn, failing)
            await conn.commit()
            assert effects(sync, gid) == ["action"] and len(barrier_rows(sync, gid)) == 1
            assert effects(sync, other) == [] and barrier_rows(sync, other) == []
            bb = BranchBarrier("saga", gid, "01", "action")
            assert await bb.call(conn, effect) is None and bb.last_decision is Decision.DUPLICATE  # own transaction
            assert not conn.in_transaction()
            sync.close()

    run(body())


def test_raced_duplicates_run_once(adriver: str) -> None:
    """The same delivery N times at once (asyncio.gather, one connection each): exactly one runs."""

    async def body() -> None:
        async with opened(adriver) as d:
            sync = d.sync()
            conns = [await d.connect() for _ in range(6)]
            for _round in range(3):
                gid = local_gid()
                open_account(sync, gid)
                answers = await asyncio.gather(*(
                    with_retries(functools.partial(call_op, d, c, "saga", gid, "action")) for c in conns))
                assert sorted(str(decision) for _r, decision in answers) == sorted(
                    [str(Decision.RUN)] + [str(Decision.DUPLICATE)] * 5)
                assert effects(sync, gid) == ["action"]
                assert balance(sync, gid) == START + 10
            sync.close()

    run(body())


@pytest.mark.parametrize("trans_type", ["saga", "tcc"])
def test_raced_forward_and_compensation(adriver: str, trans_type: str) -> None:
    async def body() -> None:
        async with opened(adriver) as d:
            sync = d.sync()
            ops = [FORWARD[trans_type], COMPENSATION[trans_type]] * 3
            conns = [await d.connect() for _ in ops]
            for _round in range(3):
                gid = local_gid()
                open_account(sync, gid)
                await asyncio.gather(*(
                    with_retries(functools.partial(call_op, d, c, trans_type, gid, op)) for c, op in zip(conns, ops)))
                # either the forward op won (both ran once) or the compensation did (nothing ran)
                assert effects(sync, gid) in ([], sorted([FORWARD[trans_type], COMPENSATION[trans_type]]))
                assert balance(sync, gid) == START
            sync.close()

    run(body())


async def _backend_id(d: Driver, conn: Any) -> int:
    sql = "select connection_id()" if d.service == "mysql" else "select pg_backend_pid()"
    if d.name == "asyncpg":
        return int(await conn.fetchval(sql))
    if d.name == "aiomysql":
        cur = await conn.cursor()
        await cur.execute(sql)
        value = int((await cur.fetchone())[0])
        await cur.close()
        await conn.rollback()
        return value
    async with conn.cursor() as cur:
        await cur.execute(sql)
        value = int((await cur.fetchone())[0])
    await conn.rollback()
    return value


def test_connection_killed_inside_busi(raw_driver: str, caplog: pytest.LogCaptureFixture) -> None:
    """A lost connection in the business SQL maps to BarrierDatabaseError (retryable), as in the blocking barrier;
    the rollback is not attempted on the dead connection (its transaction ended with it), so nothing is logged."""

    async def body() -> None:
        async with opened(raw_driver) as d:
            victim, sync = await d.connect(), d.sync()
            victim_id = await _backend_id(d, victim)
            gid = local_gid()
            open_account(sync, gid)

            async def busi(tx: Any) -> None:
                await busi_for(d, "saga", gid, "action")(tx)
                kill = "kill connection %s" if d.service == "mysql" else "select pg_terminate_backend(%s)"
                execute(sync, kill, (victim_id,))
                sync.commit()
                await d.run(tx, f"insert into {EFFECT_TABLE}(gid, op, note) values (%s, %s, 'after kill')",
                            (gid, "action"))

            with pytest.raises(BarrierDatabaseError) as info:
                await BranchBarrier("saga", gid, "01", "action").call(victim, busi)
            assert info.value.__cause__ is not None
            assert barrier_rows(sync, gid) == [] and effects(sync, gid) == []
            assert balance(sync, gid) == START
            assert "rollback failed" not in caplog.text
            sync.close()

    run(body())


def test_lock_wait_is_a_retryable_conflict(adriver: str) -> None:
    async def body() -> None:
        async with opened(adriver) as d:
            sync = d.sync()
            gid = local_gid()
            if d.service == "mysql":
                conn = await (raw_connect("aiomysql", init_command="set session innodb_lock_wait_timeout = 1")
                              if adriver == "aiomysql" else d.connect())
                if adriver != "aiomysql":
                    from sqlalchemy import text

                    await conn.execute(text("set session innodb_lock_wait_timeout = 1"))
                    await conn.commit()
            else:
                conn = await d.connect()
                setting = "set lock_timeout = '300ms'"
                if adriver == "asyncpg":
                    await conn.execute(setting)
                elif adriver == "psycopg_async":
                    await conn.execute(setting)
                    await conn.commit()
                else:
                    from sqlalchemy import text

                    await conn.execute(text(setting))
                    await conn.commit()
            execute(sync, "insert into dtm_barrier.barrier(trans_type, gid, branch_id, op, barrier_id, reason) "
                          "values ('saga', %s, '01', 'action', '01', 'action')", (gid,))  # held, uncommitted
            with pytest.raises(BarrierConflict) as info:
                await BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: pytest.fail("must not run"))
            assert info.value.__cause__ is not None
            sync.rollback()
            assert barrier_rows(sync, gid) == []
            if adriver == "aiomysql":
                conn.close()
            sync.close()

    run(body())


def test_a_swallowed_error_is_never_answered_success(adriver: str) -> None:
    """PostgreSQL aborts the transaction and COMMIT silently rolls back (asyncpg and psycopg alike): refuse it.
    MariaDB only rolls back the failed statement, so the rest commits."""

    async def body() -> None:
        async with opened(adriver) as d:
            conn, sync = await d.connect(), d.sync()
            user, gid = f"swallow-{local_gid()}", local_gid()

            async def busi(tx: Any) -> str:
                await d.run(tx, f"insert into {BALANCE_TABLE} (user_id, balance) values (%s, 1)", (user,))
                try:
                    await d.run(tx, f"insert into {BALANCE_TABLE} (user_id, balance) values (%s, 1)", (user,))
                except Exception:
                    pass  # "already there, fine": the bug this test is about
                return "done"

            count = f"select count(*) from {BALANCE_TABLE} where user_id = %s"
            if d.service == "mysql":
                assert await BranchBarrier("saga", gid, "01", "action").call(conn, busi) == "done"
                assert query_all(sync, count, (user,)) == [(1,)]
                execute(sync, f"delete from {BALANCE_TABLE} where user_id = %s", (user,))
                sync.commit()
                return
            with pytest.raises(BarrierDatabaseError, match="aborted by a database error the business code caught"):
                await BranchBarrier("saga", gid, "01", "action").call(conn, busi)
            assert query_all(sync, count, (user,)) == [(0,)]
            assert barrier_rows(sync, gid) == []
            # DTM retries after the 500; once the business code is fixed, the retry runs the work.
            assert await BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: "again") == "again"
            sync.close()

    run(body())


# -- guards -----------------------------------------------------------------------------------------------------------

def test_aiomysql_narrow_charset_is_refused_before_writing(mysql_ready: None) -> None:
    """Over a utf8mb3 connection two gids would share barrier rows: refused, as the blocking barrier does."""

    async def body() -> None:
        conn = await raw_connect("aiomysql", charset="utf8")
        sync = mysql_connect()
        try:
            gid = local_gid() + "\U0001f600"
            with pytest.raises(BarrierDatabaseError, match="'utf8', not utf8mb4"):
                await BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: pytest.fail("must not run"))
            with pytest.raises(BarrierDatabaseError, match="not utf8mb4"):
                await abarrier.query_prepared(gid, conn)
            assert not conn.get_transaction_status()  # rolled back
            assert barrier_rows(sync, gid) == []
        finally:
            conn.close()
            sync.close()

    run(body())


def test_aiomysql_duplicate_insert_fetches_no_warnings(mysql_ready: None) -> None:
    """aiomysql answers an INSERT IGNORE of an existing row with SHOW WARNINGS and a Python warning; the
    barrier's duplicate insert is its normal answer, so it uses a cursor that does neither."""
    import warnings

    async def body() -> None:
        conn = await raw_connect("aiomysql")
        try:
            gid = local_gid()
            await BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: None)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                await BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: None)  # duplicate
            assert [str(w.message) for w in caught] == []
        finally:
            conn.close()

    run(body())


def test_blocking_and_async_connections_are_not_mixed_up(mysql_ready: None, postgres_ready: None) -> None:
    """Each flavour refuses the other's connection before any statement (a psycopg AsyncConnection used to be
    taken for a blocking one by the blocking barrier: its statements were coroutines that never ran)."""
    from dtmcli.barrier import BranchBarrier as SyncBarrier

    sync = psycopg2_connect()

    async def body() -> None:
        with pytest.raises(DtmInvalidInput, match="blocking connection"):
            await BranchBarrier("saga", local_gid(), "01", "action").call(sync, lambda tx: None)
        with pytest.raises(DtmInvalidInput, match="cannot use"):
            await BranchBarrier("saga", local_gid(), "01", "action").call(object(), lambda tx: None)
        for driver in RAW:
            conn = await raw_connect(driver)
            try:
                with pytest.raises(DtmInvalidInput, match="asyncio connection"):
                    SyncBarrier("saga", local_gid(), "01", "action").call(conn, lambda tx: None)
            finally:
                await close(conn)
        async with opened("sa_asyncpg") as d:
            with pytest.raises(DtmInvalidInput, match="asyncio connection"):
                SyncBarrier("saga", local_gid(), "01", "action").call(await d.connect(), lambda tx: None)
        with pytest.raises(DtmInvalidInput, match="does not match"):
            conn = await raw_connect("asyncpg")
            try:
                await BranchBarrier("saga", local_gid(), "01", "action").call(conn, lambda tx: None, dialect="mysql")
            finally:
                await conn.close()

    try:
        run(body())
    finally:
        sync.close()


def test_blocking_barrier_refuses_an_async_business_function(mysql_ready: None) -> None:
    from dtmcli.barrier import BranchBarrier as SyncBarrier

    sync = mysql_connect()
    gid = local_gid()

    async def busi(tx: Any) -> None:
        raise AssertionError("never awaited")

    try:
        with pytest.raises(DtmInvalidInput, match="awaitable"):
            SyncBarrier("saga", gid, "01", "action").call(sync, busi)
        assert barrier_rows(sync, gid) == []  # rolled back, not committed as if the work was done
    finally:
        sync.close()


# -- connection sources ---------------------------------------------------------------------------------------------

def test_sources_pools_engines_and_factories(mysql_ready: None, postgres_ready: None) -> None:
    async def body() -> None:
        import aiomysql
        import asyncpg
        from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

        pg_pool = await asyncpg.create_pool(host=POSTGRES["host"], user=POSTGRES["user"],
                                            database=POSTGRES["dbname"], min_size=1, max_size=2)
        my_pool = await aiomysql.create_pool(host=MYSQL["host"], user=MYSQL["user"], db=MYSQL["database"],
                                             minsize=1, maxsize=2)
        engine = create_async_engine(SA_URLS["sa_asyncpg"])
        made: list[Any] = []

        async def factory() -> Any:
            made.append(await raw_connect("psycopg_async"))
            return made[-1]

        sources = [pg_pool, my_pool, engine, pg_pool.acquire, my_pool.acquire, engine.connect,
                   async_sessionmaker(engine), factory,
                   functools.partial(asyncpg.connect, host=POSTGRES["host"], user=POSTGRES["user"],
                                     database=POSTGRES["dbname"])]
        try:
            for source in sources:
                gid = local_gid()
                bb = BranchBarrier.for_msg(gid)
                assert await bb.call_with_db(source, lambda tx: "ran") == "ran", source
                await abarrier.query_prepared(gid, source)
                with pytest.raises(DtmFailure):
                    await abarrier.query_prepared(local_gid(), source)
            assert made and all(c.closed for c in made)  # a factory's connections are closed afterwards
            with pytest.raises(DtmInvalidInput):
                await BranchBarrier.for_msg(local_gid()).call_with_db("django", lambda tx: None)
        finally:
            await pg_pool.close()
            my_pool.close()
            await my_pool.wait_closed()
            await engine.dispose()

    run(body())


def test_custom_tables_in_a_fresh_schema(mysql_db: Any, pg_schema: Any) -> None:
    """A table of its own (the once-per-table check runs on the async connection), then every kind of call."""
    from dtmcli.barrier import create_schema

    async def exercise(conn: Any, table: str, sync: Any) -> None:
        gid = local_gid()
        ran: list[str] = []
        await BranchBarrier("saga", gid, "01", "action", table=table).call(conn, lambda tx: ran.append("a"))
        await BranchBarrier("saga", gid, "01", "action", table=table).call(conn, lambda tx: ran.append("again"))
        comp = BranchBarrier("saga", gid, "02", "compensate", table=table)
        await comp.call(conn, lambda tx: ran.append("c"))
        assert ran == ["a"] and comp.last_decision is Decision.NULL_COMPENSATION
        await BranchBarrier.for_msg(gid, table=table).call(conn, lambda tx: None)
        await abarrier.query_prepared(gid, conn, table=table)
        with pytest.raises(DtmFailure):
            await abarrier.query_prepared(local_gid(), conn, table=table)
        assert query_all(sync, f"select count(*) from {table} where gid = %s", (gid,)) == [(4,)]

    async def body() -> None:
        my_name, my_connect = mysql_db
        pg_name, pg_connect = pg_schema
        my_sync, pg_sync = my_connect(), pg_connect()
        create_schema(my_sync, table=f"{my_name}.barrier")
        create_schema(pg_sync, table=f"{pg_name}.barrier")
        for driver, sync, table in (("aiomysql", my_sync, f"{my_name}.barrier"),
                                    ("asyncpg", pg_sync, f"{pg_name}.barrier"),
                                    ("psycopg_async", pg_sync, f"{pg_name}.barrier")):
            conn = await raw_connect(driver)
            try:
                await exercise(conn, table, sync)
            finally:
                await close(conn)

    run(body())
