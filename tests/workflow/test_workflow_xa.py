"""``wf.do_xa``: a workflow step in a local XA transaction on MariaDB and PostgreSQL (protocol.md §12 DoXa).

Real databases (tests/services.py; CI=true fails when one is down) and the ``dtm`` coordinator fixture
(embedded, or ``--dtm-server``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest
from barrier.conftest import BALANCE_TABLE, connect, driver, execute, postgres_ready, query_all  # noqa: F401 - fixtures

import dtmcli.asyncio.workflow as aworkflow
from dtmcli import DtmFailure, local_gid, workflow
from dtmcli.testing import DtmFacade

NAME = "wf_xa"


def rows(conn: Any, user: str) -> list[int]:
    conn.rollback()  # a fresh snapshot
    return [int(r[0]) for r in query_all(conn, f"select balance from {BALANCE_TABLE} where user_id = %s", (user,))]


def prepared(name: str, conn: Any) -> set[str]:
    conn.rollback()
    if name == "pymysql":
        return {str(r[3].decode() if isinstance(r[3], bytes) else r[3]) for r in query_all(conn, "xa recover")}
    return {r[0] for r in query_all(conn, "select gid from pg_prepared_xacts")}


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_do_xa_commits_or_rolls_back_with_the_workflow(
    driver: str, connect: Callable[[], Any], dtm: DtmFacade, outcome: str  # noqa: F811
) -> None:
    gid = local_gid()

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        def busi(tx: Any) -> bytes:
            execute(tx, f"insert into {BALANCE_TABLE}(user_id, balance) values (%s, %s)", (gid, 7))
            return b"inserted"

        got = wf.new_branch().do_xa(connect, busi)
        if outcome == "rollback":
            wf.new_branch().do(lambda bb: (_ for _ in ()).throw(DtmFailure("later step failed")))
        return got

    workflow.init_http(dtm.url, "http://127.0.0.1:9/unused-resume")
    workflow.register(NAME, fn)
    check = connect()
    try:
        if outcome == "commit":
            assert workflow.execute(NAME, gid, b"in") == b"inserted"
            assert rows(check, gid) == [7]
        else:
            with pytest.raises(DtmFailure, match="later step failed"):
                workflow.execute(NAME, gid, b"in")
            assert rows(check, gid) == []
        assert not any(x.startswith(gid) for x in prepared(driver, check))
        trans = dtm.query(gid)
        assert trans is not None
        ops = [(b.branch_id, b.op) for b in trans.branches]
        assert ("01", "business") in ops and ("01", "action") in ops and ("01", outcome) in ops
        # a finished gid: nothing runs again
        if outcome == "commit":
            assert workflow.execute(NAME, gid, b"in") == b"inserted"
    finally:
        workflow.unregister(NAME)


def test_async_do_xa_on_postgres(dtm: DtmFacade, postgres_ready: None) -> None:  # noqa: F811
    from services import POSTGRES

    psycopg = pytest.importorskip("psycopg")
    gid = local_gid()

    async def factory() -> Any:
        return await psycopg.AsyncConnection.connect(host=POSTGRES["host"], port=POSTGRES["port"],
                                                     user=POSTGRES["user"], dbname=POSTGRES["dbname"])

    async def fn(wf: aworkflow.Workflow, data: bytes) -> bytes:
        async def busi(tx: Any) -> bytes:
            async with tx.cursor() as cur:
                await cur.execute(f"insert into {BALANCE_TABLE}(user_id, balance) values (%s, %s)", (gid, 9))
            return b"async inserted"

        return await wf.new_branch().do_xa(factory, busi)

    aworkflow.register(NAME, fn)
    try:
        aworkflow.init_http(dtm.url, "http://127.0.0.1:9/unused-resume")
        assert asyncio.run(aworkflow.execute(NAME, gid, b"in")) == b"async inserted"
    finally:
        aworkflow.unregister(NAME)
    import psycopg2

    check = psycopg2.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                             dbname=POSTGRES["dbname"])
    try:
        assert rows(check, gid) == [9]
    finally:
        check.close()
