"""``DtmRoute`` over real HTTP (uvicorn), with no exception handlers installed on the app.

Dependencies' errors are mapped too; FastAPI's own HTTPException and validation, and other
exceptions, keep going to the application as usual.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import requests
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from web_servers import serve_asgi

from dtmcli import DtmDuplicated, DtmFailure
from dtmcli.contrib.fastapi import BranchDep, DtmRoute, PayloadDep

TRY = "gid=G-route&trans_type=tcc&branch_id=01"


class Amount(BaseModel):
    amount: int


class Account(BaseModel):
    model_config = ConfigDict(from_attributes=True)
    id: int
    balance: int


class Row:
    """An ORM-style object only ``response_model`` can serialise; its ``note`` is not in the model."""

    def __init__(self) -> None:
        self.id, self.balance, self.note = 1, 90, "no FAILURE here"


class Outcome(BaseModel):
    dtm_result: str
    message: str = ""


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    app = FastAPI()
    router = APIRouter(route_class=DtmRoute)

    @router.post("/payload")
    def payload(info: BranchDep, body: PayloadDep) -> Any:
        return {"got": body}

    @router.post("/model")
    def model(body: Amount, info: BranchDep) -> Any:
        if body.amount > 100:
            raise DtmFailure("insufficient balance")
        return {"amount": body.amount}

    @router.post("/http")
    def http(info: BranchDep) -> Any:
        raise HTTPException(status_code=404, detail="no such account")

    @router.post("/dup")
    def dup(info: BranchDep) -> Any:
        raise DtmDuplicated("done before")

    @router.post("/nothing")
    def nothing(info: BranchDep) -> None:
        return None

    @router.post("/outcome/{result}")
    def outcome(result: str, info: BranchDep) -> Outcome:
        return Outcome(dtm_result=result, message="from a model")

    @router.post("/async-outcome/{result}")
    async def async_outcome(result: str, info: BranchDep) -> Outcome:
        return Outcome(dtm_result=result)

    @router.post("/own-response")
    def own_response(info: BranchDep) -> JSONResponse:
        return JSONResponse({"dtm_result": "FAILURE"}, headers={"X-Own": "1"})

    @router.post("/orm", response_model=Account)
    def orm(info: BranchDep) -> Any:
        return Row()

    @router.post("/generator")
    def generator(info: BranchDep) -> Any:
        return (i * 10 for i in range(3))

    app.include_router(router)
    with serve_asgi(app) as url:
        yield url


def post(base: str, path: str, op: str, **kw: Any) -> requests.Response:
    return requests.post(f"{base}{path}?{TRY}&op={op}", timeout=10, **kw)


def test_dependency_errors_are_mapped(base: str) -> None:
    r = post(base, "/payload", "try", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["message"]
    assert post(base, "/payload", "try", json=[1]).json() == {"got": [1]}


def test_pydantic_body_and_failure(base: str) -> None:
    assert post(base, "/model", "try", json={"amount": 1}).json() == {"amount": 1}
    r = post(base, "/model", "try", json={"amount": 101})
    assert (r.status_code, r.json()["dtm_result"]) == (409, "FAILURE")
    assert post(base, "/model", "confirm", json={"amount": 101}).status_code == 500  # FAILURE not allowed
    assert post(base, "/model", "try", json={"amount": "x"}).status_code == 422  # FastAPI's validation


def test_framework_exceptions_pass_through(base: str) -> None:
    assert post(base, "/http", "try").status_code == 404
    assert post(base, "/dup", "try").json() == {"dtm_result": "SUCCESS"}


def test_none_is_success(base: str) -> None:
    r = post(base, "/nothing", "try")
    assert (r.status_code, r.json()) == (200, {"dtm_result": "SUCCESS"})


def test_bad_query_does_not_run_the_route(base: str) -> None:
    r = requests.post(f"{base}/model?gid=G&trans_type=tcc&branch_id=01&op=action", json={"amount": 1}, timeout=10)
    assert r.status_code == 400 and "unknown op" in r.json()["message"]


def test_returned_model_gets_the_same_rules_as_a_dict(base: str) -> None:
    r = post(base, "/outcome/FAILURE", "try")
    assert (r.status_code, r.json()) == (409, {"dtm_result": "FAILURE", "message": "from a model"})
    assert post(base, "/async-outcome/FAILURE", "try").status_code == 409
    r = post(base, "/outcome/FAILURE", "cancel")  # FAILURE is not allowed on cancel
    assert r.status_code == 500 and "FAILURE" not in r.text
    assert post(base, "/outcome/ONGOING", "confirm").status_code == 425
    assert post(base, "/outcome/MAYBE", "try").status_code == 500
    r = post(base, "/outcome/SUCCESS", "try")  # a 200 is FastAPI's own rendering of the model
    assert (r.status_code, r.json()) == (200, {"dtm_result": "SUCCESS", "message": "from a model"})


def test_returned_response_is_sent_unchanged(base: str) -> None:
    # As Flask and Django send a view's own response: the route chose the status and body itself.
    r = post(base, "/own-response", "try")
    assert (r.status_code, r.json(), r.headers["X-Own"]) == (200, {"dtm_result": "FAILURE"}, "1")


def test_the_body_fastapi_sends_is_checked_not_the_raw_value(base: str) -> None:
    # The check reads what DTM reads: the body after response_model (the ORM pattern), and a returned
    # generator is consumed once, by FastAPI.
    r = post(base, "/orm", "try")
    assert (r.status_code, r.json()) == (200, {"id": 1, "balance": 90})
    r = post(base, "/generator", "try")
    assert (r.status_code, r.json()) == (200, [0, 10, 20])
