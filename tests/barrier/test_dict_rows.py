"""Connections whose cursors return dict rows (PyMySQL DictCursor, psycopg2 RealDictCursor, psycopg dict_row).

Before: the barrier turned every fetched row into ``tuple(row)``, which for a mapping is its column
names. query_prepared read the reason as ``'reason'`` and answered SUCCESS for a msg whose local
transaction never committed (DTM then ran the msg's branches); a compensation's two-row INSERT read
its returned op as ``'op'``. Rows are now read by value, whatever their type.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest
from conftest import EFFECT_TABLE, _prepare, execute, mysql_connect, psycopg2_connect, query_all
from services import MYSQL, POSTGRES, require

from dtmcli import DtmFailure, local_gid
from dtmcli.asyncio.barrier import BranchBarrier as AsyncBarrier
from dtmcli.barrier import BranchBarrier, Decision, barrier_preflight


def _pymysql() -> Any:
    import pymysql
    import pymysql.cursors

    return pymysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"], password=MYSQL["password"],
                           database=MYSQL["database"], charset="utf8mb4", cursorclass=pymysql.cursors.DictCursor)


def _psycopg2() -> Any:
    import psycopg2
    import psycopg2.extras

    return psycopg2.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                            dbname=POSTGRES["dbname"], cursor_factory=psycopg2.extras.RealDictCursor)


def _psycopg() -> Any:
    import psycopg
    from psycopg.rows import dict_row

    return psycopg.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                           dbname=POSTGRES["dbname"], row_factory=dict_row)


CONNECT: dict[str, tuple[str, Callable[[], Any]]] = {
    "pymysql": ("mysql", _pymysql), "psycopg2": ("postgres", _psycopg2), "psycopg": ("postgres", _psycopg),
}


@pytest.fixture(params=list(CONNECT))
def dict_conn(request: pytest.FixtureRequest) -> Any:
    service, connect = CONNECT[str(request.param)]
    require(service)
    _prepare(service)
    conn = connect()
    yield conn
    conn.close()


def _effects(dict_conn: Any, gid: str) -> list[Any]:
    """The business effects of ``gid``, read on a plain (tuple-row) connection to the same database."""
    plain = mysql_connect() if type(dict_conn).__module__.startswith("pymysql") else psycopg2_connect()
    try:
        return sorted(r[0] for r in query_all(plain, f"select op from {EFFECT_TABLE} where gid = %s", (gid,)))
    finally:
        plain.close()


def test_query_prepared_refuses_a_msg_that_never_committed(dict_conn: Any) -> None:
    gid = local_gid()
    with pytest.raises(DtmFailure):
        BranchBarrier("msg", gid, "00", "msg").query_prepared(dict_conn)
    with pytest.raises(DtmFailure):  # and again: the rollback marker is what it reads
        BranchBarrier("msg", gid, "00", "msg").query_prepared(dict_conn)


def test_query_prepared_accepts_a_committed_msg(dict_conn: Any) -> None:
    gid = local_gid()
    BranchBarrier("msg", gid, "00", "msg").call(dict_conn, lambda tx: None)
    BranchBarrier("msg", gid, "00", "msg").query_prepared(dict_conn)


def test_decisions_with_dict_rows(dict_conn: Any) -> None:
    def busi(gid: str, op: str) -> Callable[[Any], None]:
        return lambda tx: execute(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)", (gid, op))

    gid = local_gid()
    null = BranchBarrier("saga", gid, "01", "compensate")
    null.call(dict_conn, busi(gid, "compensate"))
    assert null.last_decision is Decision.NULL_COMPENSATION
    late = BranchBarrier("saga", gid, "01", "action")
    late.call(dict_conn, busi(gid, "action"))
    assert late.last_decision is Decision.DUPLICATE  # suspended: its compensation came first
    gid2 = local_gid()
    BranchBarrier("saga", gid2, "01", "action").call(dict_conn, busi(gid2, "action"))
    comp = BranchBarrier("saga", gid2, "01", "compensate")
    comp.call(dict_conn, busi(gid2, "compensate"))
    assert comp.last_decision is Decision.RUN
    assert _effects(dict_conn, gid) == [] and _effects(dict_conn, gid2) == ["action", "compensate"]


def test_preflight_reads_dict_rows(dict_conn: Any) -> None:
    assert barrier_preflight(dict_conn) == []


def test_asyncio_psycopg_dict_rows() -> None:
    require("postgres")
    _prepare("postgres")

    async def body() -> None:
        import psycopg
        from psycopg.rows import dict_row

        conn = await psycopg.AsyncConnection.connect(host=POSTGRES["host"], port=POSTGRES["port"],
                                                     user=POSTGRES["user"], dbname=POSTGRES["dbname"],
                                                     row_factory=dict_row)
        try:
            gid = local_gid()
            with pytest.raises(DtmFailure):
                await AsyncBarrier("msg", gid, "00", "msg").query_prepared(conn)
            bb = AsyncBarrier("saga", gid, "01", "compensate")
            await bb.call(conn, lambda tx: None)
            assert bb.last_decision is Decision.NULL_COMPENSATION
        finally:
            await conn.close()

    asyncio.run(body())
