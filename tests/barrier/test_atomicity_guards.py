"""Setups in which the barrier's row and the business writes would not commit together are refused.

Each is a silent loss without its guard: the barrier row committed for work that was not (DTM's
retry then skipped as a duplicate), or work answered as done that never commits. Real PostgreSQL
and MariaDB; DTM is the `responses` mock of test_msg_db.py where a msg needs one.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import responses
from conftest import EFFECT_TABLE, psycopg_connect, query_all
from services import POSTGRES
from test_msg_db import DTM, QP, paths, qp_callback

from dtmcli import BarrierDatabaseError, DtmClient, DtmInvalidInput, Msg, local_gid
from dtmcli._barrier.sql import SqlStoreBase
from dtmcli.barrier import BranchBarrier, barrier, query_prepared
from dtmcli.branch import BranchInfo, BranchResponse

PG_URL = f"postgresql+psycopg2://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{POSTGRES['dbname']}"
PG_ASYNC_URL = PG_URL.replace("+psycopg2", "+asyncpg")
SUCCESS = BranchResponse(200, {"dtm_result": "SUCCESS"})


def written(gid: str) -> tuple[int, int]:
    """(business rows, barrier rows) committed for ``gid`` on PostgreSQL."""
    conn = psycopg_connect()
    try:
        effects = query_all(conn, f"select count(*) from {EFFECT_TABLE} where gid = %s", (gid,))[0][0]
        rows = query_all(conn, "select count(*) from dtm_barrier.barrier where gid = %s", (gid,))[0][0]
        return int(effects), int(rows)
    finally:
        conn.close()


def effect(gid: str, calls: list[str]) -> Any:
    def busi(tx: Any) -> str:
        calls.append("busi")
        cur = tx.cursor()
        cur.execute(f"insert into {EFFECT_TABLE}(gid, op) values (%s, 'action')", (gid,))
        cur.close()
        return "ran"

    return busi


# -- psycopg 3 pipeline mode: row counts are -1 until the pipeline syncs ------------------------------


@pytest.mark.parametrize("op", ["action", "try"])
def test_psycopg_pipeline_mode_is_refused(postgres_ready: None, op: str) -> None:
    gid, calls = local_gid(), []
    conn = psycopg_connect()
    try:
        with conn.pipeline():
            with pytest.raises(DtmInvalidInput, match="pipeline mode"):
                BranchBarrier("tcc" if op == "try" else "saga", gid, "01", op).call(conn, effect(gid, calls))
        assert calls == []
        # the same connection outside the pipeline runs the barrier, once
        assert BranchBarrier("saga", gid, "01", "action").call(conn, effect(gid, calls)) == "ran"
        assert BranchBarrier("saga", gid, "01", "action").call(conn, effect(gid, calls)) is None  # duplicate
    finally:
        conn.close()
    assert calls == ["busi"] and written(gid) == (1, 1)


def refused_in_async_pipeline(call: Any) -> list[str]:
    """``await call(conn, busi)`` on a psycopg AsyncConnection inside ``pipeline()`` must be refused before
    ``busi`` runs; returns the business calls made (none)."""
    import psycopg

    calls: list[str] = []

    async def busi(tx: Any) -> None:
        calls.append("busi")

    async def main() -> None:
        conn = await psycopg.AsyncConnection.connect(
            host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"], dbname=POSTGRES["dbname"])
        try:
            async with conn.pipeline():
                with pytest.raises(DtmInvalidInput, match="pipeline mode"):
                    await call(conn, busi)
        finally:
            await conn.close()

    asyncio.run(main())
    return calls


def test_async_psycopg_pipeline_mode_is_refused(postgres_ready: None) -> None:
    from dtmcli.asyncio.barrier import BranchBarrier as AsyncBranchBarrier

    gid = local_gid()
    bb = AsyncBranchBarrier("saga", gid, "01", "action")
    calls = refused_in_async_pipeline(lambda conn, busi: bb.call(conn, busi))
    assert calls == [] and written(gid) == (0, 0)


@pytest.mark.parametrize("affected", [-1, 2])
def test_an_insert_count_other_than_0_or_1_is_refused(affected: int) -> None:
    store = SqlStoreBase(object(), object(), "dtm_barrier.barrier", {"gid": "g"})
    with pytest.raises(BarrierDatabaseError, match="not 0 or 1"):
        store.note_insert(("g", "01", "action", "01"), affected)
    store.note_insert(("g", "01", "action", "01"), 0)  # a duplicate: fine


def test_xa_refuses_a_psycopg_connection_in_pipeline_mode(postgres_ready: None) -> None:
    from dtmcli.barrier import xa_local_transaction

    gid, calls = local_gid(), []
    query = {"gid": gid, "trans_type": "xa", "branch_id": "01", "op": "action", "dtm": DTM,
             "phase2_url": "http://busi.test/xa"}
    conn = psycopg_connect()
    try:
        with conn.pipeline():
            with pytest.raises(DtmInvalidInput, match="pipeline mode"):
                xa_local_transaction(query, conn, effect(gid, calls))
    finally:
        conn.close()
    assert calls == [] and written(gid) == (0, 0)


def test_async_xa_refuses_a_psycopg_connection_in_pipeline_mode(postgres_ready: None) -> None:
    from dtmcli.asyncio import xa_local_transaction as axa_local_transaction

    gid = local_gid()
    query = {"gid": gid, "trans_type": "xa", "branch_id": "01", "op": "action", "dtm": DTM,
             "phase2_url": "http://busi.test/xa"}
    calls = refused_in_async_pipeline(lambda conn, busi: axa_local_transaction(query, conn, busi))
    assert calls == [] and written(gid) == (0, 0)


def test_xa_refuses_an_insert_count_other_than_0_or_1() -> None:
    """A driver answering -1 for the xa barrier row: not taken for a first action (nothing prepared)."""
    from dtmcli import _flow
    from dtmcli._barrier.xa import local_transaction_flow
    from dtmcli.branch import BranchInfo

    class Io:
        def __init__(self) -> None:
            self.sent: list[str] = []

        def set_autocommit(self, on: bool) -> None:
            return None

        def exec_shielded(self, sql: str) -> None:
            self.sent.append(sql.split()[0].lower())

        def execute(self, sql: str, params: Any) -> int:
            return -1

    calls: list[str] = []
    info = BranchInfo(trans_type="xa", gid="g1", branch_id="01", op="action")
    io = Io()
    flow = local_transaction_flow(info, "postgres", "dtm_barrier.barrier", lambda tx: calls.append("busi"), None,
                                  _flow.done(None))
    with pytest.raises(BarrierDatabaseError, match="not 0 or 1"):
        _flow.run(flow, io)
    assert calls == [] and io.sent == ["begin", "rollback"]


# -- msg do_and_submit_db: the submit follows at once, so the transaction must be the barrier's own ---


def _msg(gid: str) -> Msg:
    return Msg(DtmClient(DTM), gid).add("http://busi.test/a1", {"amount": 5})


def _refused_before_prepare(run: Any) -> None:
    """``run()`` calls do_and_submit_db with a source refused up front: nothing reaches DTM."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        with pytest.raises(DtmInvalidInput):
            run()
        assert paths(rsps) == []


def _refused_then_aborted(gid: str, run: Any) -> None:
    """``run()`` calls do_and_submit_db: refused after prepare; DTM hears query_prepared's rollback, no submit."""
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.add_callback(responses.GET, QP, callback=qp_callback(psycopg_connect))
        rsps.post(f"{DTM}/abort", json={"dtm_result": "SUCCESS"})
        with pytest.raises(DtmInvalidInput):
            run()
        assert paths(rsps) == [f"POST {DTM}/prepare", f"GET {QP}", f"POST {DTM}/abort"]


def test_msg_refuses_a_sqlalchemy_session_with_a_transaction_open(postgres_ready: None) -> None:
    import sqlalchemy
    from sqlalchemy.orm import Session

    gid, calls = local_gid(), []
    engine = sqlalchemy.create_engine(PG_URL)
    try:
        with Session(engine) as session:
            session.execute(sqlalchemy.text("select 1"))  # something used it: a transaction is open
            _refused_before_prepare(lambda: _msg(gid).do_and_submit_db(QP, session, lambda tx: calls.append("busi")))
            # a factory handing out such a session is seen only in the local transaction, after the prepare:
            # refused there, and DTM hears query_prepared's rollback instead of a submit
            _refused_then_aborted(gid, lambda: _msg(gid).do_and_submit_db(
                QP, lambda: session, lambda tx: calls.append("busi")))
    finally:
        engine.dispose()
    assert calls == [] and written(gid) == (0, 1)  # only query_prepared's rollback marker


def test_async_msg_refuses_an_async_session_with_a_transaction_open(postgres_ready: None) -> None:
    import sqlalchemy
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from dtmcli.asyncio import AsyncDtmClient
    from dtmcli.asyncio import Msg as AsyncMsg
    from dtmcli.testing import DtmTestServer

    gid, calls = local_gid(), []

    async def busi(tx: Any) -> None:
        calls.append("busi")

    later = local_gid()

    async def main(dtm_url: str) -> None:
        engine = create_async_engine(PG_ASYNC_URL)
        try:
            async with AsyncSession(engine) as session:
                await session.execute(sqlalchemy.text("select 1"))  # something used it: a transaction is open
                msg = AsyncMsg(AsyncDtmClient(dtm_url), gid).add("http://127.0.0.1:9/a1", {})
                with pytest.raises(DtmInvalidInput, match="transaction open"):
                    await msg.do_and_submit_db("http://127.0.0.1:9/qp", session, busi)

                async def source() -> Any:  # seen only in the local transaction, after the prepare
                    return session

                msg = AsyncMsg(AsyncDtmClient(dtm_url), later).add("http://127.0.0.1:9/a1", {})
                with pytest.raises(DtmInvalidInput, match="transaction open"):
                    await msg.do_and_submit_db("http://127.0.0.1:9/qp", source, busi)
        finally:
            await engine.dispose()

    with DtmTestServer() as dtm:
        asyncio.run(main(dtm.url))
        assert dtm.query(gid) is None  # refused before the prepare
        trans = dtm.query(later)
        assert trans is not None and trans.status == "prepared"  # not submitted: DTM asks query_prepared later
    assert calls == [] and written(gid) == (0, 0) and written(later) == (0, 0)


def test_msg_refuses_a_django_connection_inside_atomic(django_conn: Any) -> None:
    from django.db import transaction

    gid, calls = local_gid(), []
    with transaction.atomic(using=django_conn.alias):
        _refused_before_prepare(lambda: _msg(gid).do_and_submit_db(
            QP, f"django:{django_conn.alias}", lambda tx: calls.append("busi")))
        _refused_before_prepare(lambda: _msg(gid).do_and_submit_db(QP, django_conn, lambda tx: calls.append("busi")))
    assert calls == [] and written(gid) == (0, 0)


# -- Django: autocommit off outside atomic (nobody commits), atomic blocks (the caller commits) --------


def test_django_with_autocommit_off_outside_atomic_is_refused(django_conn: Any) -> None:
    from django.db import transaction

    gid, calls = local_gid(), []
    transaction.set_autocommit(False, using=django_conn.alias)
    try:
        with pytest.raises(DtmInvalidInput, match="autocommit turned off"):
            BranchBarrier("saga", gid, "01", "action").call(django_conn, effect(gid, calls))
    finally:
        django_conn.rollback()
        transaction.set_autocommit(True, using=django_conn.alias)
    assert calls == [] and written(gid) == (0, 0)


def test_django_autocommit_off_then_atomic_is_refused(django_conn: Any) -> None:
    """The outer atomic block entered after set_autocommit(False) commits nothing on exit either."""
    from django.db import transaction

    gid, calls = local_gid(), []
    transaction.set_autocommit(False, using=django_conn.alias)
    try:
        with transaction.atomic(using=django_conn.alias):
            with pytest.raises(DtmInvalidInput, match="autocommit turned off"):
                BranchBarrier("saga", gid, "01", "action").call(django_conn, effect(gid, calls))
        with pytest.raises(DtmInvalidInput, match="autocommit turned off"):  # nor query_prepared's marker
            query_prepared(gid, django_conn)
    finally:
        django_conn.rollback()
        transaction.set_autocommit(True, using=django_conn.alias)
    assert calls == [] and written(gid) == (0, 0)


def test_django_join_false_inside_atomic_is_refused_join_true_joins(django_conn: Any) -> None:
    from django.db import transaction

    gid, calls = local_gid(), []
    with transaction.atomic(using=django_conn.alias):
        with pytest.raises(DtmInvalidInput, match=r"inside transaction\.atomic"):
            BranchBarrier("saga", gid, "01", "action").call(django_conn, effect(gid, calls), join_transaction=False)
        assert calls == []
        assert BranchBarrier("saga", gid, "01", "action").call(django_conn, effect(gid, calls)) == "ran"
    assert calls == ["busi"] and written(gid) == (1, 1)


def test_django_decorator_joins_the_request_atomic_block(django_conn: Any) -> None:
    """ATOMIC_REQUESTS: Django sends the view's answer only after the request's atomic block commits."""
    from django.db import transaction

    calls: list[str] = []

    @barrier(db=f"django:{django_conn.alias}")
    def handler(query: Any, info: BranchInfo, tx: Any) -> None:
        effect(info.gid, calls)(tx)

    gid = local_gid()
    query = {"gid": gid, "trans_type": "saga", "branch_id": "01", "op": "action"}
    with transaction.atomic(using=django_conn.alias):  # what ATOMIC_REQUESTS wraps the view in
        assert handler(query) == SUCCESS
    assert calls == ["busi"] and written(gid) == (1, 1)
    other = local_gid()
    transaction.set_autocommit(False, using=django_conn.alias)
    try:
        answer = handler({**query, "gid": other})
    finally:
        django_conn.rollback()
        transaction.set_autocommit(True, using=django_conn.alias)
    assert answer.status == 500 and calls == ["busi"] and written(other) == (0, 0)


# -- query_prepared needs no transaction: an AUTOCOMMIT engine answers it ----------------------------


def test_query_prepared_works_on_an_autocommit_engine(postgres_ready: None) -> None:
    import sqlalchemy

    from dtmcli import DtmFailure

    engine = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    gid = local_gid()
    try:
        with pytest.raises(DtmFailure):  # nothing committed: the rollback marker wins
            query_prepared(gid, engine)
        with pytest.raises(DtmFailure):  # and keeps winning
            query_prepared(gid, engine)
    finally:
        engine.dispose()
    assert written(gid) == (0, 1)


def test_async_query_prepared_works_on_an_autocommit_engine(postgres_ready: None) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    from dtmcli import DtmFailure
    from dtmcli.asyncio.barrier import query_prepared as aquery_prepared

    gid = local_gid()

    async def main() -> None:
        engine = create_async_engine(PG_ASYNC_URL, isolation_level="AUTOCOMMIT")
        try:
            with pytest.raises(DtmFailure):
                await aquery_prepared(gid, engine)
        finally:
            await engine.dispose()

    asyncio.run(main())
    assert written(gid) == (0, 1)
