"""The SQL barrier inside transactions the caller manages: SQLAlchemy Connection/Session and Django atomic."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import EFFECT_TABLE, psycopg2_connect, query_all
from services import MYSQL, POSTGRES

from dtmcli import DtmDuplicated, local_gid
from dtmcli.barrier import BranchBarrier, Decision

URLS = {
    "mysql": f"mysql+pymysql://{MYSQL['user']}@{MYSQL['host']}:{MYSQL['port']}/{MYSQL['database']}",
    "postgres": f"postgresql+psycopg2://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{POSTGRES['dbname']}",
}


def rows(gid: str) -> int:
    conn = psycopg2_connect()
    try:
        return int(query_all(conn, "select count(*) from dtm_barrier.barrier where gid = %s", (gid,))[0][0])
    finally:
        conn.close()


@pytest.fixture(params=["mysql", "postgres"])
def engine(request: pytest.FixtureRequest, mysql_ready: None, postgres_ready: None) -> Any:
    import sqlalchemy

    eng = sqlalchemy.create_engine(URLS[str(request.param)])
    yield eng
    eng.dispose()


def count_rows(engine: Any, gid: str) -> int:
    import sqlalchemy

    with engine.connect() as c:
        return int(c.execute(sqlalchemy.text("select count(*) from dtm_barrier.barrier where gid = :g"),
                             {"g": gid}).scalar_one())


def effect(tx: Any, gid: str) -> str:
    import sqlalchemy

    tx.execute(sqlalchemy.text(f"insert into {EFFECT_TABLE}(gid, op) values (:g, 'action')"), {"g": gid})
    return "ran"


def test_sqlalchemy_connection_joins_the_callers_transaction(engine: Any) -> None:
    gid = local_gid()
    with engine.connect() as c:
        c.begin()
        assert BranchBarrier("saga", gid, "01", "action").call(c, lambda tx: effect(tx, gid)) == "ran"
        c.rollback()  # the caller decides: barrier rows and business rows go together
    assert count_rows(engine, gid) == 0
    with engine.begin() as c:
        BranchBarrier("saga", gid, "01", "action").call(c, lambda tx: effect(tx, gid))
    assert count_rows(engine, gid) == 1
    with engine.begin() as c:
        bb = BranchBarrier("saga", gid, "01", "action")
        assert bb.call(c, lambda tx: effect(tx, gid)) is None
        assert bb.last_decision is Decision.DUPLICATE


def test_sqlalchemy_business_error_rolls_back_to_the_savepoint(engine: Any) -> None:
    gid, other = local_gid(), local_gid()

    def failing(tx: Any) -> None:
        effect(tx, gid)
        raise ValueError("no")

    with engine.begin() as c:
        BranchBarrier("saga", other, "01", "action").call(c, lambda tx: effect(tx, other))
        with pytest.raises(ValueError):
            BranchBarrier("saga", gid, "01", "action").call(c, failing)
    assert count_rows(engine, gid) == 0
    assert count_rows(engine, other) == 1  # the outer transaction still committed its own work


def test_sqlalchemy_session_and_engine(engine: Any) -> None:
    from sqlalchemy.orm import Session

    gid = local_gid()
    with Session(engine) as s, s.begin():
        BranchBarrier.for_msg(gid).call(s, lambda tx: effect(tx, gid))
    assert count_rows(engine, gid) == 1
    with pytest.raises(DtmDuplicated):
        BranchBarrier.for_msg(gid).call_with_db(engine, lambda tx: effect(tx, gid))
    bb = BranchBarrier("saga", gid, "01", "compensate")
    bb.call_with_db(engine, lambda tx: effect(tx, gid))  # engine: connection checked out, own transaction
    assert bb.last_decision is Decision.NULL_COMPENSATION
    assert count_rows(engine, gid) == 3


def test_django_atomic(django_conn: Any) -> None:
    from django.db import transaction

    gid = local_gid()

    def django_effect(tx: Any) -> str:
        with tx.cursor() as cur:
            cur.execute(f"insert into {EFFECT_TABLE}(gid, op) values (%s, 'action')", [gid])
        return "ran"

    with pytest.raises(RuntimeError), transaction.atomic(using=django_conn.alias):
        assert BranchBarrier("saga", gid, "01", "action").call(django_conn, django_effect) == "ran"
        raise RuntimeError("caller rolls back")
    assert rows(gid) == 0
    with transaction.atomic(using=django_conn.alias):
        BranchBarrier("saga", gid, "01", "action").call(django_conn, django_effect)
    assert rows(gid) == 1
    bb = BranchBarrier("saga", gid, "01", "action")
    assert bb.call(django_conn, django_effect) is None  # outside atomic: the barrier owns the transaction
    assert bb.last_decision is Decision.DUPLICATE

    def failing(tx: Any) -> None:
        django_effect(tx)
        raise ValueError("no")

    other = local_gid()
    with transaction.atomic(using=django_conn.alias):
        with pytest.raises(ValueError):
            BranchBarrier("saga", other, "01", "action").call(django_conn, failing)
    assert rows(other) == 0
