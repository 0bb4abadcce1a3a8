"""2-phase message bodies and the prepare_and_submit decisions (protocol.md §8, goclient_msg_* traces)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import responses
import traces
from responses import matchers
from traces import BUSI, DTM

from dtmcli import BranchBarrier, DtmClient, DtmFailure, DtmInvalidInput, DtmServerError, Msg

QP = f"{BUSI}/msg/qp"


@pytest.fixture
def dtm() -> DtmClient:
    return DtmClient(DTM)


def calls(rsps: responses.RequestsMock) -> list[tuple[str, str, Any]]:
    out = []
    for c in rsps.calls:
        body = json.loads(c.request.body) if c.request.body else None
        out.append((c.request.method, c.request.url, body))
    return out


def test_prepare_then_submit_matches_go_client(dtm: DtmClient) -> None:
    msg = Msg(dtm, "GID").add(f"{BUSI}/mp/a1", {"amount": 5, "user_id": 1}).add(
        f"{BUSI}/mp/a2", {"amount": 5, "user_id": 2}
    )
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.post(f"{DTM}/submit", json={"dtm_result": "SUCCESS"})
        msg.prepare(QP)
        msg.submit()
        (_, _, prepare), (_, _, submit) = calls(rsps)
    assert prepare == traces.request_body("goclient_msg_prepare_submit", "/prepare")
    assert submit == traces.request_body("goclient_msg_prepare_submit", "/submit")


def test_delay_and_topic_match_go_client(dtm: DtmClient) -> None:
    msg = Msg(dtm, "GID").add(f"{BUSI}/dt/a1", {"amount": 5, "user_id": 1})
    msg.add_topic("goprobe_topic", {"amount": 5}).set_delay(2)
    assert msg.build_body() == traces.request_body("goclient_msg_delay_topic", "/submit")


def test_concurrent_and_timeout_options(dtm: DtmClient) -> None:
    msg = Msg(dtm, "GID", timeout_to_fail=2).add(f"{BUSI}/qc/a1", {"amount": 5, "user_id": 1})
    msg.query_prepared = QP
    assert msg.build_body() == traces.request_body("goclient_msg_query_prepared_commit", "/prepare")
    assert Msg(dtm, "G").add(f"{BUSI}/a", {}).enable_concurrent().build_body()["concurrent"] is True


def _busi_ok(seen: list[BranchBarrier]) -> Any:
    def busi(bb: BranchBarrier) -> str:
        seen.append(bb)
        return "done"

    return busi


def test_prepare_and_submit_success(dtm: DtmClient) -> None:
    seen: list[BranchBarrier] = []
    msg = Msg(dtm, "GID").add(f"{BUSI}/md/a1", {"amount": 5, "user_id": 1})
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.post(f"{DTM}/submit", json={"dtm_result": "SUCCESS"})
        assert msg.prepare_and_submit(QP, _busi_ok(seen)) == "done"
        got = calls(rsps)
    expected = traces.load("goclient_msg_do_and_submit_db")
    assert [(m, u.removeprefix(DTM)) for m, u, _ in got] == [("POST", "/prepare"), ("POST", "/submit")]
    assert [b for _, _, b in got] == [traces.with_port(e["request"]["body"]) for e in expected["events"][:2]]
    (bb,) = seen
    assert (bb.trans_type, bb.gid, bb.branch_id, bb.op) == ("msg", "GID", "00", "msg")
    assert msg.do_and_submit == msg.prepare_and_submit


def test_business_failure_aborts_without_query(dtm: DtmClient) -> None:
    msg = Msg(dtm, "GID").add(f"{BUSI}/mf/a1", {"amount": 5, "user_id": 1})

    def busi(bb: BranchBarrier) -> None:
        raise DtmFailure("balance too low")

    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.post(f"{DTM}/abort", json={"dtm_result": "SUCCESS"})
        with pytest.raises(DtmFailure, match="balance too low"):
            msg.prepare_and_submit(QP, busi)
        got = calls(rsps)
    assert [u for _, u, _ in got] == [f"{DTM}/prepare", f"{DTM}/abort"]
    assert got[1][2] == traces.request_body("goclient_msg_do_and_submit_db_failure", "/abort")


class ConnectionReset(Exception):
    pass


def _raise_reset(bb: BranchBarrier) -> None:
    raise ConnectionReset("connection reset")


def test_business_error_asks_query_prepared_then_aborts_on_failure(dtm: DtmClient) -> None:
    msg = Msg(dtm, "GID").add(f"{BUSI}/me/a1", {"amount": 5, "user_id": 1})
    trace_qp = next(traces.events("goclient_msg_do_and_submit_db_error", kind="client->branch"))
    query = traces.with_port(trace_qp["request"]["query"])
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.get(QP, status=409, json={"error": "FAILURE"}, match=[matchers.query_param_matcher(query)])
        rsps.post(f"{DTM}/abort", json={"dtm_result": "SUCCESS"})
        with pytest.raises(ConnectionReset):
            msg.prepare_and_submit(QP, _raise_reset)
        got = calls(rsps)
    assert [(m, u.split("?")[0]) for m, u, _ in got] == [
        ("POST", f"{DTM}/prepare"), ("GET", QP), ("POST", f"{DTM}/abort")
    ]
    assert got[1][2] is None  # GET, no body
    assert got[2][2] == traces.request_body("goclient_msg_do_and_submit_db_error", "/abort")


def test_business_error_with_committed_local_work_submits(dtm: DtmClient) -> None:
    msg = Msg(dtm, "GID").add(f"{BUSI}/a1", {})
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.get(QP, json={"dtm_result": "SUCCESS"})
        rsps.post(f"{DTM}/submit", json={"dtm_result": "SUCCESS"})
        with pytest.raises(ConnectionReset):
            msg.prepare_and_submit(QP, _raise_reset)
        assert [c.request.url.split("?")[0] for c in rsps.calls] == [f"{DTM}/prepare", QP, f"{DTM}/submit"]


@pytest.mark.parametrize("qp_status", [500, 425])
def test_unknown_query_answer_leaves_msg_to_dtm(dtm: DtmClient, qp_status: int) -> None:
    msg = Msg(dtm, "GID").add(f"{BUSI}/a1", {})
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.get(QP, status=qp_status, body="")
        with pytest.raises(ConnectionReset):
            msg.prepare_and_submit(QP, _raise_reset)
        assert [c.request.url.split("?")[0] for c in rsps.calls] == [f"{DTM}/prepare", QP]


def test_failed_abort_still_raises_business_error(dtm: DtmClient, caplog: pytest.LogCaptureFixture) -> None:
    msg = Msg(dtm, "GID").add(f"{BUSI}/a1", {})

    def busi(bb: BranchBarrier) -> None:
        raise DtmFailure("no stock")

    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.post(f"{DTM}/abort", status=500, json={"message": "db down"})
        with pytest.raises(DtmFailure, match="no stock"):
            msg.prepare_and_submit(QP, busi)
    assert "db down" in caplog.text


def test_prepare_failure_runs_no_business(dtm: DtmClient) -> None:
    ran: list[BranchBarrier] = []
    msg = Msg(dtm, "GID").add(f"{BUSI}/a1", {})
    with responses.RequestsMock() as rsps:
        answer = {"dtm_result": "FAILURE", "message": "current status 'succeed', cannot prepare. FAILURE"}
        rsps.post(f"{DTM}/prepare", status=409, json=answer)
        with pytest.raises(DtmFailure, match="cannot prepare"):
            msg.prepare_and_submit(QP, _busi_ok(ran))
    assert ran == []


def test_abort_body(dtm: DtmClient) -> None:
    msg = Msg(dtm, "GID").add(f"{BUSI}/mab/a1", {"amount": 1})
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/abort", json={"dtm_result": "SUCCESS"})
        msg.abort()
        body = json.loads(rsps.calls[0].request.body)
    assert body["gid"] == "GID" and body["trans_type"] == "msg" and "rollback_reason" not in body


@pytest.mark.parametrize(
    "build",
    [
        lambda m: m.submit(),
        lambda m: m.add("nope", {}),
        lambda m: m.add_topic("bad topic", {}),
        lambda m: m.add_topic("", {}),
        lambda m: m.set_delay(-1),
        lambda m: m.add(f"{BUSI}/a", {}).prepare("not-a-url"),
    ],
)
def test_msg_bad_input(dtm: DtmClient, build: Any) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        with pytest.raises(DtmInvalidInput):
            build(Msg(dtm, "GID"))
        assert len(rsps.calls) == 0


def test_server_error_on_submit_is_typed(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", status=500, json={"message": "json: cannot unmarshal"})
        with pytest.raises(DtmServerError) as info:
            Msg(dtm, "GID").add(f"{BUSI}/a", {}).submit()
    assert info.value.status == 500 and info.value.gid == "GID" and "cannot unmarshal" in str(info.value)


def test_query_prepared_call_carries_branch_headers(dtm: DtmClient) -> None:
    """Client-originated branch calls carry branch_headers, as Go's TransRequestBranch does (§5)."""
    msg = Msg(dtm, "GID", branch_headers={"X-Tenant": "t1"}).add(f"{BUSI}/a1", {})
    with responses.RequestsMock() as rsps:
        rsps.get(QP, json={"dtm_result": "SUCCESS"}, match=[matchers.header_matcher({"X-Tenant": "t1"})])
        msg.query_prepared_status(QP)
