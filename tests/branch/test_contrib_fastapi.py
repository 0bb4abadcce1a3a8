"""dtmcli.contrib.fastapi with FastAPI's TestClient."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient

from dtmcli import BranchInfo, DtmDuplicated, DtmFailure, DtmOngoing
from dtmcli.branch import handle
from dtmcli.contrib.fastapi import SUCCESS, BranchDep, PayloadDep, add_exception_handlers, as_response, branch_info

Q = "gid=G1&trans_type=saga&branch_id=01"


@pytest.fixture
def client() -> Any:
    app = FastAPI()
    add_exception_handlers(app)
    seen: list[Any] = []
    app.state.seen = seen

    @app.api_route("/busi/{name}", methods=["GET", "POST"])
    def busi(name: str, info: BranchDep, body: PayloadDep) -> Any:
        seen.append((name, info, body))
        if name == "fail":
            raise DtmFailure("no stock")
        if name == "ongoing":
            raise DtmOngoing("later")
        if name == "dup":
            raise DtmDuplicated("dup")
        return SUCCESS

    @app.post("/async/{name}")
    async def via_handle(name: str, info: Annotated[BranchInfo, Depends(branch_info)]) -> Any:
        # What a decorator such as the barrier's does: run the work through the neutral core.
        def work() -> None:
            if name == "fail":
                raise DtmFailure("nope")

        return as_response(handle(info, work))

    return TestClient(app)


def test_success(client: TestClient) -> None:
    r = client.post(f"/busi/ok?{Q}&op=action", json={"amount": 1})
    assert r.status_code == 200 and r.json() == {"dtm_result": "SUCCESS"}
    _name, info, body = client.app.state.seen[0]  # type: ignore[attr-defined]
    assert (info.gid, info.trans_type, info.op, body) == ("G1", "saga", "action", {"amount": 1})


def test_failure_ongoing_duplicated(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    r = client.post(f"/busi/fail?{Q}&op=action", json={})
    assert r.status_code == 409 and r.json() == {"dtm_result": "FAILURE", "message": "no stock"}
    with caplog.at_level(logging.ERROR, logger="dtmcli"):
        r = client.post(f"/busi/fail?{Q}&op=compensate", json={})
    assert r.status_code == 500 and "FAILURE" not in r.text and "op=compensate" in caplog.text
    r = client.get(f"/busi/ongoing?{Q}&op=compensate")
    assert r.status_code == 425 and r.json()["dtm_result"] == "ONGOING"
    assert client.post(f"/busi/dup?{Q}&op=action").json() == {"dtm_result": "SUCCESS"}


def test_bad_query_and_body_are_400(client: TestClient) -> None:
    r = client.post("/busi/ok?gid=G1&op=action", json={})
    assert r.status_code == 400 and "trans_type" in r.json()["message"]
    r = client.post(f"/busi/ok?{Q}&op=action&branch_id=x%27y", json={})
    assert r.status_code == 400
    r = client.post(f"/busi/ok?{Q}&op=action", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["message"]
    assert client.app.state.seen == []  # type: ignore[attr-defined]


def test_handle_core_from_an_async_route(client: TestClient) -> None:
    assert client.post(f"/async/ok?{Q}&op=action").json() == {"dtm_result": "SUCCESS"}
    assert client.post(f"/async/fail?{Q}&op=action").status_code == 409
    assert client.post(f"/async/fail?{Q}&op=compensate").status_code == 500
