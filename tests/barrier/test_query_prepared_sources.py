"""One way to give a database (issue 10.9): query_prepared accepts every source @barrier(db=...) and
do_and_submit_db accept, and the ready-made Flask / FastAPI / Django query_prepared handlers answer
DTM over real HTTP from the real barrier tables."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
import requests
from conftest import CONNECT, POSTGRES
from web_servers import serve_asgi, serve_wsgi

from dtmcli import DtmFailure, local_gid
from dtmcli.barrier import BranchBarrier, query_prepared


def committed_msg(conn: Any) -> str:
    gid = local_gid()
    BranchBarrier.for_msg(gid).call(conn, lambda tx: None)
    return gid


def counting_factory(driver: str) -> tuple[Callable[[], Any], list[Any]]:
    opened: list[Any] = []

    def factory() -> Any:
        opened.append(CONNECT[driver]())
        return opened[-1]

    return factory, opened


def is_closed(conn: Any) -> bool:
    return not conn.open if hasattr(conn, "open") else bool(conn.closed)


def test_query_prepared_takes_a_connection_factory(driver: str, conn: Any) -> None:
    """Before: DtmInvalidInput "cannot tell the SQL dialect ...; pass dialect=" for a factory."""
    factory, opened = counting_factory(driver)
    gid = committed_msg(conn)
    query_prepared(gid, factory)
    with pytest.raises(DtmFailure):
        query_prepared(local_gid(), factory)
    assert len(opened) == 2 and all(is_closed(c) for c in opened)


def sqlalchemy_engine() -> Any:
    import sqlalchemy

    return sqlalchemy.create_engine(
        f"postgresql+psycopg://{POSTGRES['user']}@{POSTGRES['host']}:{POSTGRES['port']}/{POSTGRES['dbname']}"
    )


def test_query_prepared_takes_a_sqlalchemy_engine(postgres_ready: None) -> None:
    engine = sqlalchemy_engine()
    try:
        with engine.connect() as sa_conn:
            gid = local_gid()
            BranchBarrier.for_msg(gid).call(sa_conn, lambda tx: None)
        query_prepared(gid, engine)
        with pytest.raises(DtmFailure):
            query_prepared(local_gid(), engine)
        assert engine.pool.checkedout() == 0
    finally:
        engine.dispose()


def test_query_prepared_takes_django_by_name(django_conn: Any) -> None:
    gid = local_gid()
    BranchBarrier.for_msg(gid).call(django_conn, lambda tx: None)
    query_prepared(gid, f"django:{django_conn.alias}")
    with pytest.raises(DtmFailure):
        query_prepared(local_gid(), f"django:{django_conn.alias}")


# --- the framework handlers over real HTTP ------------------------------------------------------


def ask(base: str, gid: str, trans_type: str = "msg") -> requests.Response:
    """What DTM sends to a msg's query_prepared URL (protocol.md §8): a GET with the branch query."""
    return requests.get(f"{base}/qp", params={"gid": gid, "trans_type": trans_type, "branch_id": "00", "op": "msg",
                                              "dtm": "http://127.0.0.1:36789/api/dtmsvr"}, timeout=10)


def check_answers(base: str, committed: str) -> None:
    ok = ask(base, committed)
    assert (ok.status_code, ok.json()["dtm_result"]) == (200, "SUCCESS")
    rolled_back = ask(base, local_gid())
    assert (rolled_back.status_code, rolled_back.json()["dtm_result"]) == (409, "FAILURE")
    assert ask(base, local_gid(), trans_type="saga").status_code == 400
    assert requests.get(f"{base}/qp", params={"trans_type": "msg"}, timeout=10).status_code == 400


def test_flask_query_prepared_view_with_a_factory(mysql_ready: None) -> None:
    import flask

    from dtmcli.contrib.flask import query_prepared_view

    factory, opened = counting_factory("pymysql")
    app = flask.Flask(__name__)
    app.get("/qp")(query_prepared_view(factory))
    conn = CONNECT["pymysql"]()
    try:
        committed = committed_msg(conn)
    finally:
        conn.close()
    with serve_wsgi(app) as base:
        check_answers(base, committed)
    assert opened and all(is_closed(c) for c in opened)


def test_fastapi_query_prepared_endpoint_with_an_engine(postgres_ready: None) -> None:
    import fastapi

    from dtmcli.contrib.fastapi import query_prepared_endpoint

    engine = sqlalchemy_engine()
    app = fastapi.FastAPI()  # no add_exception_handlers: the endpoint answers errors itself
    app.get("/qp")(query_prepared_endpoint(engine))
    try:
        with engine.connect() as sa_conn:
            committed = committed_msg(sa_conn)
        with serve_asgi(app) as base:
            check_answers(base, committed)
    finally:
        engine.dispose()


urlpatterns: list[Any] = []


@pytest.fixture
def django_urls(django_conn: Any) -> Iterator[str]:
    from django.test import override_settings
    from django.urls import path

    from dtmcli.contrib.django import query_prepared_view

    urlpatterns[:] = [path("qp", query_prepared_view(f"django:{django_conn.alias}"))]
    with override_settings(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["127.0.0.1"],
                           MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"]):
        yield django_conn.alias


def test_django_query_prepared_view_by_alias(django_urls: str, django_conn: Any) -> None:
    from django.core.handlers.wsgi import WSGIHandler

    committed = local_gid()
    BranchBarrier.for_msg(committed).call(django_conn, lambda tx: None)
    with serve_wsgi(WSGIHandler()) as base:
        check_answers(base, committed)


def test_all_sources_resolve_in_one_place(driver: str) -> None:
    """@barrier(db=...), do_and_submit_db (call_with_db), query_prepared and XA share connection_from."""
    from dtmcli._barrier import sql as barrier_sql

    factory, opened = counting_factory(driver)
    with barrier_sql.connection_from(factory) as conn:
        assert conn is opened[0] and not is_closed(conn)
    assert is_closed(opened[0])
    reused = CONNECT[driver]()
    try:
        with barrier_sql.connection_from(reused) as same:
            assert same is reused
        assert not is_closed(reused)  # a connection the caller passed is the caller's to close
    finally:
        reused.close()
