"""dtmcli.contrib.flask with Flask's own test client."""

from __future__ import annotations

import logging
from typing import Any

import flask
import pytest

from dtmcli import BranchInfo, DtmDuplicated, DtmFailure, DtmOngoing
from dtmcli.contrib.flask import branch_handler, branch_payload, register_error_handlers

Q = "gid=G1&trans_type=tcc&branch_id=01"


@pytest.fixture
def client() -> Any:
    app = flask.Flask(__name__)
    seen: list[Any] = []
    app.config["seen"] = seen

    @app.route("/busi/<name>", methods=["GET", "POST"])
    @branch_handler
    def busi(name: str, info: BranchInfo) -> Any:
        body = branch_payload(info)
        seen.append((name, info, body))
        if name == "fail":
            raise DtmFailure("insufficient balance")
        if name == "ongoing":
            raise DtmOngoing("later")
        if name == "dup":
            raise DtmDuplicated("done before")
        if name == "crash":
            raise RuntimeError("db down")
        if name == "native":
            return flask.Response("custom", status=200, headers={"X-Own": "1"})
        if name == "value":
            return {"balance": 7}
        return None

    bp = flask.Blueprint("plain", __name__)

    @bp.post("/plain")
    def plain() -> Any:
        raise DtmFailure("plain failure")

    register_error_handlers(bp)
    app.register_blueprint(bp)
    return app.test_client()


def test_success_and_info(client: Any) -> None:
    r = client.post(f"/busi/ok?{Q}&op=try&dtm=http://dtm:36789/api/dtmsvr", json={"amount": 30})
    assert r.status_code == 200 and r.get_json() == {"dtm_result": "SUCCESS"}
    name, info, body = client.application.config["seen"][0]
    assert (name, info.gid, info.op, info.dtm, body) == (
        "ok",
        "G1",
        "try",
        "http://dtm:36789/api/dtmsvr",
        {"amount": 30},
    )


def test_get_with_empty_body(client: Any) -> None:
    r = client.get(f"/busi/ok?{Q}&op=confirm")
    assert r.status_code == 200 and client.application.config["seen"][0][2] is None


def test_failure_on_try_is_409(client: Any) -> None:
    r = client.post(f"/busi/fail?{Q}&op=try", json={})
    assert r.status_code == 409
    assert r.get_json() == {"dtm_result": "FAILURE", "message": "insufficient balance"}


def test_failure_on_cancel_is_500_and_logged(client: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="dtmcli"):
        r = client.post(f"/busi/fail?{Q}&op=cancel", json={})
    assert r.status_code == 500 and b"FAILURE" not in r.data
    assert "op=cancel" in caplog.text and "gid=G1" in caplog.text


def test_other_outcomes(client: Any) -> None:
    assert client.post(f"/busi/ongoing?{Q}&op=confirm").status_code == 425
    r = client.post(f"/busi/dup?{Q}&op=try")
    assert r.status_code == 200 and r.get_json() == {"dtm_result": "SUCCESS"}
    assert client.post(f"/busi/crash?{Q}&op=try").status_code == 500
    assert client.post(f"/busi/value?{Q}&op=try").get_json() == {"dtm_result": "SUCCESS", "balance": 7}
    r = client.post(f"/busi/native?{Q}&op=try")
    assert r.data == b"custom" and r.headers["X-Own"] == "1"


def test_bad_query_is_400_without_calling_the_view(client: Any) -> None:
    r = client.post("/busi/ok?gid=G1&trans_type=tcc&op=try", json={})
    assert r.status_code == 400 and "branch_id" in r.get_json()["message"]
    r = client.post(f"/busi/ok?{Q}&op=branch_type", json={})
    assert r.status_code == 400 and "unknown op" in r.get_json()["message"]
    r = client.post(f"/busi/ok?{Q}&op=try&gid=G2", json={})
    assert r.status_code == 400
    assert client.application.config["seen"] == []


def test_non_json_body_is_400(client: Any) -> None:
    r = client.post(f"/busi/ok?{Q}&op=try", data=b"amount=30", content_type="application/json")
    assert r.status_code == 400 and "not JSON" in r.get_json()["message"]


def test_error_handlers_on_plain_views(client: Any) -> None:
    r = client.post(f"/plain?{Q}&op=try")
    assert r.status_code == 409 and r.get_json()["dtm_result"] == "FAILURE"
    assert client.post(f"/plain?{Q}&op=confirm").status_code == 500
