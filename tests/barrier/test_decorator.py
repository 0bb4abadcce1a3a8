"""@barrier under Flask, FastAPI and Django handlers, and in its plain function form."""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import urlencode

import pytest
from conftest import BALANCE_TABLE, balance, execute, mysql_connect, open_account

from dtmcli import local_gid
from dtmcli.barrier import barrier
from dtmcli.branch import BranchInfo, BranchResponse
from dtmcli.contrib.fastapi import BranchDep, add_exception_handlers

DELTA = {"action": 10, "compensate": -10}


def q(gid: str, op: str) -> str:
    return urlencode({"gid": gid, "trans_type": "saga", "branch_id": "01", "op": op})


def make_handler(calls: list[str]) -> Callable[..., Any]:
    @barrier(db=mysql_connect)
    def handler(*args: Any, info: BranchInfo, tx: Any) -> dict[str, str]:
        calls.append(info.op)
        execute(tx, f"update {BALANCE_TABLE} set balance = balance + %s where user_id = %s",
                (DELTA[info.op], info.gid))
        return {"done": info.op}

    return handler


def test_flask(mysql_ready: None) -> None:
    import flask

    from dtmcli.contrib.flask import branch_handler

    app = flask.Flask(__name__)
    calls: list[str] = []
    app.add_url_rule("/saga", "saga", branch_handler(make_handler(calls)), methods=["POST"])
    client = app.test_client()
    gid = local_gid()
    open_account(gid)
    r = client.post(f"/saga?{q(gid, 'compensate')}")  # null compensation: not run
    assert (r.status_code, r.get_json()) == (200, {"dtm_result": "SUCCESS"})
    assert client.post(f"/saga?{q(gid, 'action')}").status_code == 200  # suspended: not run
    assert calls == [] and balance(gid) == 0

    gid2 = local_gid()
    open_account(gid2)
    r = client.post(f"/saga?{q(gid2, 'action')}")
    assert r.get_json() == {"dtm_result": "SUCCESS", "done": "action"}
    client.post(f"/saga?{q(gid2, 'action')}")  # duplicate
    client.post(f"/saga?{q(gid2, 'compensate')}")
    assert calls == ["action", "compensate"] and balance(gid2) == 0
    assert client.post("/saga?gid=x").status_code == 400


def test_fastapi(mysql_ready: None) -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    add_exception_handlers(app)
    calls: list[str] = []

    @app.post("/saga")
    @barrier(db=mysql_connect)
    def saga(info: BranchDep, tx: Any = None) -> dict[str, str]:
        calls.append(info.op)
        if info.gid.startswith("fail"):
            raise ValueError("business error")
        execute(tx, f"update {BALANCE_TABLE} set balance = balance + %s where user_id = %s",
                (DELTA[info.op], info.gid))
        return {"dtm_result": "SUCCESS"}

    client = TestClient(app, raise_server_exceptions=False)
    gid = local_gid()
    open_account(gid)
    assert client.post(f"/saga?{q(gid, 'action')}").json() == {"dtm_result": "SUCCESS"}
    assert client.post(f"/saga?{q(gid, 'action')}").status_code == 200
    assert calls == ["action"] and balance(gid) == 10
    assert client.post(f"/saga?{q('fail' + gid, 'action')}").status_code == 500


def test_django(django_conn: Any, mysql_ready: None) -> None:
    from django.test import RequestFactory

    from dtmcli.contrib.django import branch_handler

    calls: list[str] = []
    view = branch_handler(make_handler(calls))
    gid = local_gid()
    open_account(gid)
    factory = RequestFactory()
    r = view(factory.post(f"/saga?{q(gid, 'action')}"))
    assert r.status_code == 200
    view(factory.post(f"/saga?{q(gid, 'action')}"))
    assert calls == ["action"] and balance(gid) == 10


def test_plain_form_and_django_db_string(django_conn: Any) -> None:
    calls: list[str] = []

    @barrier(db="django:dtmcli_barrier_pg")
    def handler(query: Any, info: BranchInfo, tx: Any) -> None:
        calls.append(info.op)

    gid = local_gid()
    answer = handler({"gid": gid, "trans_type": "saga", "branch_id": "01", "op": "compensate"})
    assert answer == BranchResponse(200, {"dtm_result": "SUCCESS"}) and calls == []
    handler({"gid": gid, "trans_type": "saga", "branch_id": "01", "op": "compensate"})
    assert calls == []
    assert handler({"gid": gid}).status == 400
    other = local_gid()
    handler({"gid": other, "trans_type": "saga", "branch_id": "01", "op": "action"})
    assert calls == ["action"]


def test_async_handlers_are_refused() -> None:
    with pytest.raises(TypeError):
        @barrier(db=mysql_connect)
        async def handler(info: BranchInfo, tx: Any) -> None:
            return None
