"""DtmClient: result mapping, query/admin API, retries, wait_result settling, logging."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import pytest
import requests
import responses
import traces
from responses import matchers
from traces import BUSI, DTM

from dtmcli import (
    DtmClient,
    DtmFailure,
    DtmInProgress,
    DtmOngoing,
    DtmServerError,
    DtmTimeout,
    DtmTransportError,
    ExponentialBackoff,
    Retry,
    Saga,
)
from dtmcli._protocol import Response, branch_result, dtm_error

FAST_RETRY = Retry(retries=2, backoff=ExponentialBackoff(0, 0))


@pytest.fixture
def dtm() -> DtmClient:
    return DtmClient(DTM, retry=FAST_RETRY)


# -- result mapping (protocol.md §0, §4) -------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (200, '{"dtm_result":"SUCCESS"}', "SUCCESS"),
        (200, "", "SUCCESS"),
        (200, '{"result":"FAILURE: business says no"}', "FAILURE"),  # saga_action_200_failure_body
        (500, '{"error":"FAILURE in handler"}', "FAILURE"),  # saga_500_with_failure_body
        (409, '{"msg":"still ONGOING"}', "ONGOING"),  # saga_409_with_ongoing_body: ONGOING first
        (409, "", "FAILURE"),
        (425, "", "ONGOING"),
        (500, "", None),
        (404, "not found", None),
    ],
)
def test_branch_result_reading_order(status: int, body: str, expected: Any) -> None:
    assert branch_result(status, body) == expected


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (200, b'{"dtm_result":"SUCCESS"}', None),
        (200, b'{"transaction":{"rollback_reason":"x FAILURE"},"branches":[]}', None),  # no substring rule
        (200, b'{"dtm_result":"FAILURE","message":"old server"}', DtmFailure),  # pre-1.10 servers
        (409, b'{"dtm_result":"FAILURE","message":"current status \'failed\', cannot sumbmit. FAILURE"}', DtmFailure),
        (425, b'{"dtm_result":"ONGOING","message":"ONGOING"}', DtmOngoing),
        (500, b'{"message":"no TransGlobal with gid: X found"}', DtmServerError),
        (400, b'{"message":"json: cannot unmarshal number"}', DtmServerError),
        (502, b"<html>bad gateway</html>", DtmServerError),
        (500, b"", DtmServerError),
        # issue 9.11: DTM always answers a JSON object; a 200 that is not one came from something else
        (200, b"<html><body>Welcome</body></html>", DtmServerError),
        (200, b"", DtmServerError),
        (200, b"\x00\xffgarbage", DtmServerError),
        (200, b'{"dtm_result":', DtmServerError),
        (200, b'["SUCCESS"]', DtmServerError),
        (200, b'{"msg":"pong"}', None),  # /api/ping
        (200, b'{"transaction":null,"branches":[]}', None),
    ],
)
def test_dtm_answer_mapping(status: int, body: bytes, error: Any) -> None:
    path = "query" if body.startswith((b'{"transaction"', b'{"msg"')) else "submit"
    err = dtm_error(Response(status, body), path=path, gid="G1")
    if error is None:
        assert err is None
    else:
        assert type(err) is error
        assert err is not None and err.gid == "G1"


def test_server_error_carries_status_and_message() -> None:
    err = dtm_error(Response(500, b'{"message":"no TransGlobal with gid: X found"}'), path="abort", gid="X")
    assert isinstance(err, DtmServerError)
    assert err.status == 500 and "no TransGlobal" in str(err) and "gid=X" in str(err)


def test_connection_refused_is_transport_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = DtmClient(f"http://127.0.0.1:{port}/api/dtmsvr", retry=FAST_RETRY)
    with pytest.raises(DtmTransportError) as info:
        Saga(client, "G1").add(f"{BUSI}/a", "", {}).submit()
    assert info.value.gid == "G1"


def test_timeout_is_typed(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", body=requests.Timeout("read timed out"))
        with pytest.raises(DtmTimeout):
            Saga(dtm, "G1").add(f"{BUSI}/a", "", {}).submit()


# -- retries ---------------------------------------------------------------------------------


def test_reads_and_prepare_are_retried_on_transport_errors(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{DTM}/newGid", body=requests.ConnectionError("reset"))
        rsps.get(f"{DTM}/newGid", json={"gid": "abc", "dtm_result": "SUCCESS"})
        assert dtm.new_gid() == "abc"
        assert len(rsps.calls) == 2


def test_submit_is_never_retried_blindly(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", body=requests.ConnectionError("reset"))
        with pytest.raises(DtmTransportError):
            Saga(dtm, "G1").add(f"{BUSI}/a", "", {}).submit()
        assert len(rsps.calls) == 1


def test_retries_give_up_after_the_budget(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{DTM}/version", body=requests.ConnectionError("down"))
        with pytest.raises(DtmTransportError):
            dtm.version()
        assert len(rsps.calls) == 3


def _query_answer(status: str, reason: str = "") -> dict[str, Any]:
    return {"transaction": {"gid": "G1", "trans_type": "saga", "status": status, "rollback_reason": reason},
            "branches": []}


def _refused() -> requests.ConnectionError:
    from urllib3.exceptions import MaxRetryError, NewConnectionError

    return requests.ConnectionError(MaxRetryError(None, DTM, reason=NewConnectionError(None, "refused")))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stored", "resubmits"),
    [(None, True), ("prepared", True), ("submitted", False), ("succeed", False)],
)
def test_submit_recover_resends_only_what_never_left(dtm: DtmClient, stored: Any, resubmits: bool) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", body=_refused())
        answer = {"transaction": None, "branches": []} if stored is None else _query_answer(stored)
        rsps.get(f"{DTM}/query", json=answer, match=[matchers.query_param_matcher({"gid": "G1"})])
        if resubmits:
            rsps.post(f"{DTM}/submit", json={"dtm_result": "SUCCESS"})
        Saga(dtm, "G1").add(f"{BUSI}/a", "", {}).submit(recover=True)
        submits = [c for c in rsps.calls if c.request.url.endswith("/submit")]
        assert len(submits) == (2 if resubmits else 1)


@pytest.mark.parametrize("lost", [requests.ConnectionError("connection reset"), requests.ReadTimeout("read timed out")])
@pytest.mark.parametrize("stored", [None, "prepared"])
def test_submit_recover_never_resends_after_a_lost_answer(dtm: DtmClient, lost: Exception, stored: Any) -> None:
    """After a reset or timeout the first submit may still arrive: a second one is not idempotent."""
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", body=lost)
        answer = {"transaction": None, "branches": []} if stored is None else _query_answer(stored)
        rsps.get(f"{DTM}/query", json=answer)
        with pytest.raises(DtmTransportError, match="outcome unknown"):
            Saga(dtm, "G1").add(f"{BUSI}/a", "", {}).submit(recover=True)
        assert len([c for c in rsps.calls if c.request.url.endswith("/submit")]) == 1


def test_refused_connection_is_connect_error() -> None:
    from dtmcli import DtmConnectError

    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", body=_refused())
        with pytest.raises(DtmConnectError):
            Saga(DtmClient(DTM), "G1").add(f"{BUSI}/a", "", {}).submit()


def test_submit_recover_reports_failed(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", body=requests.ConnectionError("reset"))
        rsps.get(f"{DTM}/query", json=_query_answer("failed", "no stock"))
        with pytest.raises(DtmFailure, match="no stock"):
            Saga(dtm, "G1").add(f"{BUSI}/a", "", {}).submit(recover=True)


# -- wait_result (protocol.md §6 caveat) -----------------------------------------------------


def test_wait_result_success(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", json={"dtm_result": "SUCCESS"})
        Saga(dtm, "G1", wait_result=True).add(f"{BUSI}/a", "", {}).submit()
        assert json.loads(rsps.calls[0].request.body)["wait_result"] is True


def test_wait_result_409_confirmed_failed(dtm: DtmClient) -> None:
    trace = traces.load("saga_wait_result_failure")
    submit_answer = trace["events"][0]["response"]["body"]
    reason = traces.with_port(trace["events"][-1]["response"]["body"])["transaction"]["rollback_reason"]
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", status=409, json=submit_answer)
        rsps.get(f"{DTM}/query", json=_query_answer("failed", reason))
        with pytest.raises(DtmFailure) as info:
            Saga(dtm, "G1", wait_result=True).add(f"{BUSI}/a", "", {}).submit()
    assert "no stock" in str(info.value) and info.value.gid == "G1"


def test_wait_result_409_but_still_submitted_is_in_progress(dtm: DtmClient) -> None:
    submit_answer = traces.load("saga_wait_result_not_yet")["events"][0]["response"]["body"]
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", status=409, json=submit_answer)
        rsps.get(f"{DTM}/query", json=_query_answer("submitted"))
        with pytest.raises(DtmInProgress) as info:
            Saga(dtm, "G1", wait_result=True).add(f"{BUSI}/a", "", {}).submit()
        assert len([c for c in rsps.calls if c.request.url.endswith("/submit")]) == 1
    assert info.value.status == "submitted"
    assert isinstance(info.value, DtmOngoing) and not isinstance(info.value, DtmFailure)


def test_wait_result_425_settles_with_query(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", status=425, json={"dtm_result": "ONGOING", "message": "ONGOING"})
        rsps.get(f"{DTM}/query", json=_query_answer("submitted"))
        with pytest.raises(DtmInProgress):
            Saga(dtm, "G1", wait_result=True).add(f"{BUSI}/a", "", {}).submit()


@pytest.mark.parametrize(
    ("submit_status", "stored", "expected"),
    [
        (500, "submitted", DtmInProgress),  # tcc/xa/msg pass a branch's 500 through (protocol.md §6)
        (500, "succeed", None),
        (409, "aborting", DtmFailure),  # aborting only ever ends failed
        (500, None, DtmServerError),  # DTM never took it: the original error
        (400, "submitted", DtmServerError),  # a client error is not settled
    ],
)
def test_wait_result_settles_every_inconclusive_answer(
    dtm: DtmClient, submit_status: int, stored: Any, expected: Any
) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.post(f"{DTM}/submit", status=submit_status, json={"message": "confirm answered 500"})
        answer = {"transaction": None, "branches": []} if stored is None else _query_answer(stored, "why")
        rsps.get(f"{DTM}/query", json=answer)
        saga = Saga(dtm, "G1", wait_result=True).add(f"{BUSI}/a", "", {})
        if expected is None:
            saga.submit()
        else:
            with pytest.raises(expected):
                saga.submit()
        assert len([c for c in rsps.calls if c.request.url.endswith("/submit")]) == 1


def test_wait_result_timeout_settles_with_query(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", body=requests.ReadTimeout("slow pass"))
        rsps.get(f"{DTM}/query", json=_query_answer("submitted"))
        with pytest.raises(DtmInProgress):
            Saga(dtm, "G1", wait_result=True).add(f"{BUSI}/a", "", {}).submit()


def test_409_without_wait_result_is_failure_without_query(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", status=409, json={"dtm_result": "FAILURE", "message": "cannot sumbmit. FAILURE"})
        with pytest.raises(DtmFailure):
            Saga(dtm, "G1").add(f"{BUSI}/a", "", {}).submit()
        assert len(rsps.calls) == 1


# -- query and admin API ---------------------------------------------------------------------


def test_query_parses_the_recorded_answer(dtm: DtmClient) -> None:
    answer = traces.with_port(traces.load("saga_success")["events"][-1]["response"]["body"])
    with responses.RequestsMock() as rsps:
        rsps.get(f"{DTM}/query", json=answer, match=[matchers.query_param_matcher({"gid": "GID"})])
        trans = dtm.query("GID")
    assert trans is not None
    assert (trans.gid, trans.trans_type, trans.status, trans.protocol) == ("GID", "saga", "succeed", "http")
    assert trans.is_final and trans.options == {"concurrent": False} and trans.next_cron_interval == 10
    assert [(b.branch_id, b.op, b.status) for b in trans.branches] == [
        ("01", "compensate", "prepared"), ("01", "action", "succeed"),
        ("02", "compensate", "prepared"), ("02", "action", "succeed"),
    ]
    action = trans.branch("01", "action")
    assert action is not None and action.data == b'{"amount": 10}' and action.url == f"{BUSI}/ss/a1"
    assert trans.payloads == ('{"amount": 10}', '{"amount": 20}')


def test_query_unknown_gid_is_none(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{DTM}/query", json={"transaction": None, "branches": []})
        assert dtm.query("nope") is None
        assert dtm.query_status("nope") is None


def test_all_pages_through_cursor(dtm: DtmClient) -> None:
    row = {"gid": "g", "trans_type": "saga", "status": "succeed"}
    with responses.RequestsMock() as rsps:
        rsps.get(f"{DTM}/all", json={"transactions": [dict(row, gid="a"), dict(row, gid="b")], "next_position": "b"},
                 match=[matchers.query_param_matcher({"limit": "2", "status": "succeed"})])
        rsps.get(f"{DTM}/all", json={"transactions": [dict(row, gid="c")], "next_position": ""},
                 match=[matchers.query_param_matcher({"limit": "2", "status": "succeed", "position": "b"})])
        assert [t.gid for t in dtm.iter_all(page_size=2, status="succeed")] == ["a", "b", "c"]


def test_all_with_no_match(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.get(f"{DTM}/all", json={"transactions": None, "next_position": ""})
        page = dtm.all(limit=1, status="nosuchstatus")
        assert page.transactions == () and page.next_position == ""


def test_admin_calls(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        gid_body = [matchers.json_params_matcher({"gid": "G1"})]
        rsps.post(f"{DTM}/forceStop", json={"dtm_result": "SUCCESS"}, match=gid_body)
        rsps.post(f"{DTM}/resetNextCronTime", json={"dtm_result": "SUCCESS"},
                  match=[matchers.json_params_matcher({"gid": "G1"})])
        rsps.get(f"{DTM}/version", json={"version": "v1.19.0"})
        rsps.get(f"{BUSI}/api/ping", json={"msg": "pong"})
        dtm.force_stop("G1")
        dtm.reset_next_cron_time("G1")
        assert dtm.version() == "v1.19.0"
        assert dtm.ping() is True


def test_force_stop_on_final_is_failure(dtm: DtmClient) -> None:
    answer = list(traces.events("saga_idempotency_and_force_stop", path_suffix="/forceStop"))[1]["response"]["body"]
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/forceStop", status=409, json=answer)
        with pytest.raises(DtmFailure, match="force stop"):
            dtm.force_stop("G1")


def test_shared_client_per_address() -> None:
    first = DtmClient.for_url(DTM)
    assert first is DtmClient.for_url(DTM + "/")
    assert Saga(DTM, "a").client is Saga(DTM, "b").client is first
    DtmClient.close_shared(DTM)
    assert DtmClient.for_url(DTM) is not first


def test_debug_log_redacts_branch_headers(dtm: DtmClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dtmcli")
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", json={"dtm_result": "SUCCESS"})
        Saga(dtm, "G1", branch_headers={"Authorization": "Bearer secret"}).add(f"{BUSI}/a", "", {}).submit()
    assert "Authorization" in caplog.text and "secret" not in caplog.text and "G1" in caplog.text


# -- a 200 that is not from DTM (issue 9.11) ---------------------------------------------------


@pytest.mark.parametrize("body", ["<html><body>Sign in</body></html>", ""])
@pytest.mark.parametrize("step", ["submit", "prepare", "abort"])
def test_html_200_is_never_success(dtm: DtmClient, step: str, body: str) -> None:
    """A proxy, login page or SPA answering 200 HTML must not pass for a registered transaction."""
    from dtmcli import Msg

    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/{step}", body=body, status=200, content_type="text/html")
        with pytest.raises(DtmServerError) as info:
            if step == "submit":
                Saga(dtm, "G1").add(f"{BUSI}/a", f"{BUSI}/c", {}).submit()
            elif step == "prepare":
                Msg(dtm, "G1").add(f"{BUSI}/a", {}).prepare(f"{BUSI}/qp")
            else:
                dtm.post("abort", {"gid": "G1", "trans_type": "msg"})
        assert info.value.status == 200 and info.value.gid == "G1"
        assert "not a JSON object" in str(info.value)


# -- a 200 JSON object without dtm_result SUCCESS on a transaction-changing call ----------------

NOT_DTM_BODIES = [
    pytest.param({}, id="empty-object"),
    pytest.param({"code": 401, "msg": "login required"}, id="gateway-login"),
    pytest.param({"dtm_result": "OK"}, id="other-result"),
]


@pytest.mark.parametrize("body", NOT_DTM_BODIES)
@pytest.mark.parametrize(
    "step", ["submit", "prepare", "abort", "registerBranch", "forceStop", "resetNextCronTime"]
)
def test_json_200_without_dtm_success_is_not_from_dtm(dtm: DtmClient, step: str, body: Any) -> None:
    """DTM answers these calls with {"dtm_result":"SUCCESS"}; a gateway's JSON 200 must not pass for it."""
    from dtmcli import Msg

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.post(f"{DTM}/{step}", json=body, status=200)
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.post(f"{DTM}/abort", json={"dtm_result": "SUCCESS"})
        with pytest.raises(DtmServerError) as info:
            if step == "submit":
                Saga(dtm, "G1").add(f"{BUSI}/a", f"{BUSI}/c", {}).submit()
            elif step == "prepare":
                Msg(dtm, "G1").add(f"{BUSI}/a", {}).prepare(f"{BUSI}/qp")
            elif step == "registerBranch":  # as tcc.call_branch and the XA branch helper send it
                dtm.post(step, {"gid": "G1", "trans_type": "tcc", "branch_id": "01", "data": "{}"})
            elif step == "forceStop":
                dtm.force_stop("G1")
            elif step == "resetNextCronTime":
                dtm.reset_next_cron_time("G1")
            else:
                dtm.post("abort", {"gid": "G1", "trans_type": "msg"})
    err = info.value
    assert err.status == 200 and err.gid == "G1"
    assert f'{step}: HTTP 200 with a body without "dtm_result":"SUCCESS", not an answer from DTM' in str(err)


@pytest.mark.parametrize("path", ["query", "all", "newGid", "version", "ping", "prepareWorkflow", "resetCronTime"])
def test_data_answers_need_no_dtm_result(path: str) -> None:
    """Calls that answer with data keep accepting any JSON object (DTM adds no dtm_result there)."""
    assert dtm_error(Response(200, b'{"anything":1}'), path=path) is None


def test_every_recorded_200_answer_is_a_success() -> None:
    """Each 200 DTM v1.19.0 gave the Go client in the traces reads as success, whatever the path."""
    seen = set()
    for trace in sorted(traces.TRACES.glob("*.json")):
        for event in traces.events(trace.stem):
            answer = event.get("response") or {}
            if answer.get("status") != 200:
                continue
            path = event["request"]["path"].rsplit("/", 1)[-1]
            body = json.dumps(answer["body"]).encode()
            assert dtm_error(Response(200, body), path=path) is None, (trace.stem, path, answer["body"])
            seen.add(path)
    assert {"prepare", "submit", "abort", "registerBranch", "forceStop", "query", "newGid"} <= seen


# -- a deeply nested JSON 200 ------------------------------------------------------------------

DEEP = b"[" * 200_000 + b"]" * 200_000


def test_deeply_nested_json_is_not_json() -> None:
    assert Response(200, DEEP).json() is None
    assert Response(200, b'{"a":' * 200_000 + b"1" + b"}" * 200_000).json() is None


def test_deeply_nested_200_fails_submit_typed(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", body=DEEP, status=200)
        with pytest.raises(DtmServerError, match="not a JSON object") as info:
            Saga(dtm, "G1").add(f"{BUSI}/a", f"{BUSI}/c", {}).submit()
    assert info.value.gid == "G1"
