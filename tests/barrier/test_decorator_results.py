"""@barrier with a handler that *returns* FAILURE, on real MariaDB, over real HTTP (Flask, FastAPI, plain).

The returned FAILURE must roll the barrier transaction back exactly as a raised DtmFailure does:
the business update is undone, and the later compensation is a null compensation (not run).
The FastAPI app uses ``APIRouter(route_class=DtmRoute)`` and no exception handlers.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator
from urllib.parse import urlencode

import flask
import pytest
import requests
from conftest import BALANCE_TABLE, balance, execute, mysql_connect, open_account
from fastapi import APIRouter, FastAPI
from web_servers import serve_asgi, serve_wsgi

from dtmcli import BranchInfo, DtmFailure, DtmInvalidInput, local_gid
from dtmcli.barrier import barrier
from dtmcli.contrib.fastapi import BranchDep, DtmRoute, PayloadDep
from dtmcli.contrib.flask import branch_handler
from dtmcli.testing import Answer, BranchService, Call

DELTA = {"action": -10, "compensate": 10}


def work(calls: list[str], info: BranchInfo, tx: Any) -> Any:
    """Update first, then decide: the Go SDK idiom of answering FAILURE with a returned result."""
    calls.append(info.op)
    execute(tx, f"update {BALANCE_TABLE} set balance = balance + %s where user_id = %s", (DELTA[info.op], info.gid))
    if info.op == "action" and "fail" in info.gid:
        return {"dtm_result": "FAILURE", "message": "insufficient balance"}
    if info.op == "action" and "raise" in info.gid:
        raise DtmFailure("insufficient balance")
    return None


@contextlib.contextmanager
def flask_service(calls: list[str]) -> Iterator[str]:
    app = flask.Flask(__name__)

    @app.post("/saga")
    @branch_handler
    @barrier(db=mysql_connect)
    def saga(info: BranchInfo, tx: Any) -> Any:
        return work(calls, info, tx)

    with serve_wsgi(app) as base:
        yield base


@contextlib.contextmanager
def fastapi_service(calls: list[str]) -> Iterator[str]:
    app = FastAPI()
    router = APIRouter(route_class=DtmRoute)

    @router.post("/saga")
    @barrier(db=mysql_connect)
    def saga(info: BranchDep, body: PayloadDep, tx: Any = None) -> Any:
        return work(calls, info, tx)

    app.include_router(router)
    with serve_asgi(app) as base:
        yield base


@contextlib.contextmanager
def plain_service(calls: list[str]) -> Iterator[str]:
    @barrier(db=mysql_connect)
    def saga(query: Any, info: BranchInfo, tx: Any) -> Any:
        return work(calls, info, tx)

    def answer(call: Call) -> Answer:
        resp = saga(call.query)
        return Answer(resp.status, resp.content)

    with BranchService(default=answer) as svc:
        yield svc.base_url


SERVICES: dict[str, Callable[[list[str]], Any]] = {
    "flask": flask_service, "fastapi": fastapi_service, "plain": plain_service,
}


def call(base: str, gid: str, op: str) -> requests.Response:
    query = urlencode({"gid": gid, "trans_type": "saga", "branch_id": "01", "op": op})
    return requests.post(f"{base}/saga?{query}", json={"amount": 10}, timeout=10)


@pytest.mark.parametrize("framework", sorted(SERVICES))
@pytest.mark.parametrize("how", ["fail", "raise"])
def test_failure_rolls_back_and_compensation_is_null(mysql_ready: None, framework: str, how: str) -> None:
    calls: list[str] = []
    with SERVICES[framework](calls) as base:
        gid = f"{how}-{local_gid()}"
        open_account(gid, 100)
        r = call(base, gid, "action")
        assert r.status_code == 409 and r.json()["dtm_result"] == "FAILURE"
        assert balance(gid) == 100  # the update made before answering FAILURE was rolled back
        r = call(base, gid, "compensate")
        assert r.status_code == 200
        assert calls == ["action"] and balance(gid) == 100  # null compensation: not run

        ok = local_gid()
        open_account(ok, 100)
        assert call(base, ok, "action").status_code == 200 and balance(ok) == 90
        assert call(base, ok, "action").status_code == 200 and balance(ok) == 90  # duplicate
        assert call(base, ok, "compensate").status_code == 200 and balance(ok) == 100
        assert requests.post(f"{base}/saga?gid=x", timeout=10).status_code == 400


@pytest.mark.parametrize(("db", "backend"), [("sqlite", "sql"), ("django", "mongo"), ("", "sql")])
def test_a_bad_db_string_is_refused_when_decorating(db: str, backend: str) -> None:
    with pytest.raises(DtmInvalidInput, match="django:<alias>"):
        barrier(db, backend=backend)
