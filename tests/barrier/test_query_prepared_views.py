"""Several query_prepared views on one app (one per database or barrier table): each is registered under
a name of its own, so Flask accepts the second one and every URL answers from its own table."""

from __future__ import annotations

from typing import Any

import requests
from conftest import CONNECT
from web_servers import serve_asgi, serve_wsgi

from dtmcli import local_gid
from dtmcli.barrier import BranchBarrier

MISSING_TABLE = f"dtm_barrier.no_such_{local_gid()[:12]}"


def committed_msg() -> str:
    conn = CONNECT["pymysql"]()
    try:
        gid = local_gid()
        BranchBarrier.for_msg(gid).call(conn, lambda tx: None)
        return gid
    finally:
        conn.close()


def ask(url: str, gid: str) -> requests.Response:
    return requests.get(url, params={"gid": gid, "trans_type": "msg", "branch_id": "00", "op": "msg"}, timeout=10)


def check_each_view_answers_from_its_table(base: str, gid: str) -> None:
    assert ask(f"{base}/orders/qp", gid).json()["dtm_result"] == "SUCCESS"
    assert ask(f"{base}/stock/qp", gid).status_code == 500  # its table does not exist


def test_two_flask_views_on_one_app(mysql_ready: None) -> None:
    import flask

    from dtmcli.contrib.flask import query_prepared_view

    app = flask.Flask(__name__)
    app.get("/orders/qp")(query_prepared_view(CONNECT["pymysql"]))
    app.get("/stock/qp")(query_prepared_view(CONNECT["pymysql"], table=MISSING_TABLE))  # AssertionError before
    with serve_wsgi(app) as base:
        check_each_view_answers_from_its_table(base, committed_msg())


def test_two_fastapi_endpoints_have_their_own_route_names(mysql_ready: None) -> None:
    import fastapi

    from dtmcli.contrib.fastapi import query_prepared_endpoint

    app = fastapi.FastAPI()
    app.get("/orders/qp")(query_prepared_endpoint(CONNECT["pymysql"]))
    app.get("/stock/qp")(query_prepared_endpoint(CONNECT["pymysql"], table=MISSING_TABLE))
    names = [getattr(r, "name", None) for r in app.routes if getattr(r, "path", "").endswith("/qp")]
    assert len(set(names)) == 2, names  # url_for(name) reaches each one
    with serve_asgi(app) as base:
        check_each_view_answers_from_its_table(base, committed_msg())


def test_django_views_have_their_own_names() -> None:
    from dtmcli.contrib.django import query_prepared_view

    views: list[Any] = [query_prepared_view(), query_prepared_view(table=MISSING_TABLE)]
    assert views[0].__name__ != views[1].__name__ and all(v.csrf_exempt for v in views)
