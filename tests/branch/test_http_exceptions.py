"""A web framework's own HTTP 409/425 means what DTM reads in it, the same in every integration (review r2, m7).

Before: FastAPI's ``DtmRoute`` let ``HTTPException(409)`` through unchanged (a 409, i.e. FAILURE, even
on a compensate, where DTM then retries FAILURE forever), while Flask's ``abort(409)`` (and Starlette's
endpoint) answered 500. The same intent rolled a saga back under one framework and was retried under
the other. Now an HTTPException with status 409 is DtmFailure (409 FAILURE where the op allows it,
500 elsewhere) and 425 is DtmOngoing, in FastAPI, Starlette, Flask and :func:`dtmcli.branch.error_response`;
other statuses keep their framework's handling.
"""

from __future__ import annotations

from typing import Any

import flask
import pytest
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route
from werkzeug.exceptions import abort

from dtmcli.branch import BranchInfo, error_response
from dtmcli.contrib.fastapi import BranchDep, DtmRoute
from dtmcli.contrib.flask import branch_handler
from dtmcli.contrib.starlette import branch_endpoint

router = APIRouter(route_class=DtmRoute)


@router.post("/raise/{status}")
async def raise_status(status: int, info: BranchDep) -> None:
    raise HTTPException(status_code=status, detail="insufficient balance")


@router.post("/raise_sync/{status}")
def raise_status_sync(status: int, info: BranchDep) -> None:
    raise HTTPException(status_code=status, detail="insufficient balance")


fastapi_app = FastAPI()
fastapi_app.include_router(router)

flask_app = flask.Flask("m7")


@flask_app.post("/raise/<int:status>")
@branch_handler
def flask_raise(status: int, info: BranchInfo) -> None:
    abort(status, "insufficient balance")


@branch_endpoint
async def starlette_raise(request: Any, info: BranchInfo) -> None:
    raise StarletteHTTPException(status_code=int(request.path_params["status"]), detail="insufficient balance")


starlette_app = Starlette(routes=[Route("/raise/{status}", starlette_raise, methods=["POST"])])

QUERY = "?gid=g1&trans_type=saga&branch_id=01&op={op}"


def post(framework: str, path: str) -> tuple[int, Any]:
    if framework == "flask":
        r = flask_app.test_client().post(path)
        return r.status_code, r.get_json(silent=True)
    client = TestClient(fastapi_app if framework.startswith("fastapi") else starlette_app)
    r = client.post(path)
    return r.status_code, r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text


FRAMEWORKS = ["fastapi", "fastapi_sync", "flask", "starlette"]


def path(framework: str, status: int, op: str) -> str:
    route = "/raise_sync" if framework == "fastapi_sync" else "/raise"
    return f"{route}/{status}" + QUERY.format(op=op)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_409_on_an_op_that_may_fail_is_failure(framework: str) -> None:
    status, body = post(framework, path(framework, 409, "action"))
    assert status == 409 and body["dtm_result"] == "FAILURE" and body["message"] == "insufficient balance"


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_409_on_an_op_that_may_not_fail_is_500(framework: str) -> None:
    """Before: FastAPI answered 409 on a compensate (DTM retries it forever), Flask 500."""
    status, body = post(framework, path(framework, 409, "compensate"))
    assert status == 500 and "not allowed for op compensate" in body["message"]


@pytest.mark.parametrize("framework", ["fastapi", "fastapi_sync", "starlette"])  # werkzeug cannot abort(425)
def test_425_is_ongoing(framework: str) -> None:
    status, body = post(framework, path(framework, 425, "compensate"))
    assert status == 425 and body["dtm_result"] == "ONGOING"


def test_other_statuses_keep_their_framework_handling() -> None:
    assert post("fastapi", path("fastapi", 404, "action"))[0] == 404  # FastAPI's own handler
    assert post("flask", path("flask", 404, "action"))[0] == 500  # a handler error, as before


def test_error_response_maps_framework_http_exceptions() -> None:
    from werkzeug.exceptions import Conflict

    info = BranchInfo.from_query({"gid": "g1", "trans_type": "tcc", "branch_id": "01", "op": "try"})
    assert error_response(Conflict("no stock"), info).status == 409
    assert error_response(HTTPException(409), info).body["message"] == "Conflict"  # Starlette's default detail
    cancel = BranchInfo.from_query({"gid": "g1", "trans_type": "tcc", "branch_id": "01", "op": "cancel"})
    assert error_response(HTTPException(409, "x"), cancel).status == 500
    assert error_response(HTTPException(425, "later"), cancel).status == 425
    assert error_response(HTTPException(400, "bad"), info).status == 500
