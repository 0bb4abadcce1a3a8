"""The coordinator's own contract: status codes, strict types, status rules, backoff, wait_result."""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests

import dtmcli
from dtmcli.testing import BranchService, Call, DtmTestServer


def saga_body(svc: BranchService, gid: str, *steps: str, **extra: Any) -> dict[str, Any]:
    return {
        "gid": gid,
        "trans_type": "saga",
        "steps": [{"action": svc.url(f"/{s}/a"), "compensate": svc.url(f"/{s}/c")} for s in steps],
        "payloads": [json.dumps({"step": s}) for s in steps],
        **extra,
    }


def ops(svc: BranchService) -> list[str]:
    return [f"{c.path}:{c.op}" for c in svc.calls()]


def test_ping_version_new_gid(api: Any) -> None:
    base = api.server.base_url
    assert requests.get(f"{base}/api/ping", timeout=5).json() == {"msg": "pong"}
    assert requests.post(f"{base}/api/ping", timeout=5).json() == {"msg": "pong"}
    assert api.get("version").json()["version"].startswith("v1.19.0")
    body = api.get("newGid").json()
    assert body["dtm_result"] == "SUCCESS" and len(body["gid"]) == 22
    assert api.get("nosuch").status_code == 404


def test_strict_types_rejected_and_nothing_stored(api: Any, branch_service: BranchService) -> None:
    good = saga_body(branch_service, "G1", "s1")
    cases = [
        ({**good, "custom_data": {"concurrent": True}},
         "json: cannot unmarshal object into Go struct field TransGlobal.custom_data of type string"),
        ({**good, "payloads": [{"amount": 1}]},
         "json: cannot unmarshal object into TransGlobal.payloads.0 of type string"),
        ({**good, "steps": [{"action": branch_service.url("/a"), "n": 1}]},
         "json: cannot unmarshal number into Go struct field TransGlobal.steps.0.n of type string"),
        ({**good, "wait_result": "true"},
         "json: cannot unmarshal string into Go struct field TransGlobal.wait_result of type bool"),
        ({**good, "retry_interval": 1.5},
         "json: cannot unmarshal number 1.5 into Go struct field TransGlobal.retry_interval of type int64"),
    ]
    for body, message in cases:
        resp = api.post("submit", body)
        assert (resp.status_code, resp.json()) == (500, {"message": message})
    resp = api.post("submit", raw=b'{"gid": "G1", not json')
    assert resp.status_code == 500
    assert resp.json() == {"message": "invalid character 'n' looking for beginning of object key string"}
    assert api.query("G1") == {"transaction": None, "branches": []}
    assert branch_service.calls() == []


def test_register_branch_rules(api: Any, branch_service: BranchService) -> None:
    assert api.post("prepare", {"gid": "T", "trans_type": "tcc"}).status_code == 200
    reg = {"gid": "T", "trans_type": "tcc", "branch_id": "01", "data": "{}",
           "confirm": branch_service.url("/c"), "cancel": branch_service.url("/x")}
    bad = api.post("registerBranch", {**reg, "branch_id": 1})
    assert bad.status_code == 400 and "of type string" in bad.json()["message"]
    assert api.post("registerBranch", {**reg, "trans_type": "saga"}).json() == {"message": "unknow trans type: saga"}
    assert api.post("registerTccBranch", reg).status_code == 200
    dup = api.post("registerBranch", reg)
    assert (dup.status_code, dup.json()) == (500, {"message": "storage: UniqueKeyConflict"})
    xa_reg = {"gid": "T", "trans_type": "xa", "branch_id": "01", "url": branch_service.url("/xa")}
    xa = api.post("registerXaBranch", xa_reg)
    assert xa.status_code == 200
    unknown = api.post("registerBranch", {**reg, "gid": "NOPE"})
    assert (unknown.status_code, unknown.json()) == (
        409, {"dtm_result": "FAILURE", "message": "no trans with gid: NOPE status: prepared found FAILURE"})
    rows = [(b["branch_id"], b["op"]) for b in api.query("T")["branches"]]
    assert rows == [("01", "cancel"), ("01", "confirm"), ("01", "rollback"), ("01", "commit")]


def test_prepare_idempotent_and_status_rules(api: Any, branch_service: BranchService) -> None:
    branch_service.route("/s1/a", 500)
    body = saga_body(branch_service, "S", "s1")
    assert api.post("prepare", {"gid": "M", "trans_type": "msg", "steps": [{"action": branch_service.url("/m")}],
                                "payloads": ["{}"]}).status_code == 200
    assert api.post("prepare", {"gid": "M", "trans_type": "msg"}).status_code == 200  # idempotent
    assert api.post("submit", body).status_code == 200
    api.server.wait_idle()
    again = api.post("prepare", body)
    assert again.json() == {"dtm_result": "FAILURE", "message": "current status 'submitted', cannot prepare. FAILURE"}
    abort = api.post("abort", {"gid": "S", "trans_type": "saga"})
    assert (abort.status_code, abort.json()["message"]) == (
        409, "trans type: 'saga' current status 'submitted', cannot abort. FAILURE")
    unknown = api.post("abort", {"gid": "X", "trans_type": "tcc"})
    assert unknown.json() == {"message": "no TransGlobal with gid: X found"}
    assert api.post("forceStop", {"gid": "X"}).status_code == 500
    assert api.post("forceStop", {"gid": "S"}).status_code == 200
    stop2 = api.post("forceStop", {"gid": "S"})
    assert stop2.json()["message"] == "global transaction force stop error. status: failed. error: FAILURE"
    sub = api.post("submit", body)
    assert (sub.status_code, sub.json()["message"]) == (409, "current status 'failed', cannot sumbmit. FAILURE")
    assert api.post("abort", {"gid": "M", "trans_type": "msg"}).status_code == 200
    assert api.query("M")["transaction"]["status"] == "failed"
    calls_before = len(branch_service.calls())
    assert calls_before == 1
    api.server.advance(100)  # force-stopped: no more retries, no compensation
    assert len(branch_service.calls()) == calls_before
    assert api.get("query").json() == {"message": "no gid specified"}


def test_backoff_schedule_doubles_then_resets_when_grown(dtm_server: DtmTestServer, api: Any,
                                                         branch_service: BranchService) -> None:
    times: list[float] = []
    start = dtm_server.clock.now()

    def fail(call: Call) -> int:
        times.append(round(dtm_server.clock.now() - start, 3))
        return 500

    branch_service.route("/s1/a", fail)
    api.post("submit", saga_body(branch_service, "B", "s1", retry_interval=1))
    dtm_server.advance(33.5)
    # 1 s doubles: 2, 4, 8, 16; DTM resets an interval grown past its RetryInterval (10 s) to 1.
    assert times == [0, 2, 6, 14, 30, 31, 33]
    assert api.query("B")["transaction"]["next_cron_interval"] == 4


def test_backoff_default_interval_and_ongoing_keeps(dtm_server: DtmTestServer, api: Any,
                                                    branch_service: BranchService) -> None:
    start = dtm_server.clock.now()
    seen: dict[str, list[float]] = {"err": [], "ongoing": []}

    def answer(kind: str, status: int) -> Any:
        def f(call: Call) -> int:
            seen[kind].append(round(dtm_server.clock.now() - start, 3))
            return status
        return f

    branch_service.route("/e/a", answer("err", 500))
    branch_service.route("/o/a", answer("ongoing", 425))
    api.post("submit", saga_body(branch_service, "E", "e"))
    api.post("submit", saga_body(branch_service, "O", "o", retry_interval=3))
    dtm_server.advance(50)
    assert seen["err"] == [0, 20, 30, 50]
    assert seen["ongoing"] == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 48]


def test_success_resets_interval_only_after_slow_pass_or_growth(dtm_server: DtmTestServer, api: Any,
                                                                branch_service: BranchService) -> None:
    branch_service.route("/s1/a", 500, 500, 200)
    api.post("submit", saga_body(branch_service, "R", "s1", retry_interval=1))
    dtm_server.advance(10)
    trans = api.query("R")["transaction"]
    assert (trans["status"], trans["next_cron_interval"]) == ("succeed", 4)


def test_wait_result_caveat(api: Any, branch_service: BranchService) -> None:
    branch_service.route("/s2/a", 500, 200)
    resp = api.post("submit", saga_body(branch_service, "W", "s1", "s2", wait_result=True, retry_interval=1))
    assert (resp.status_code, resp.json()) == (
        409, {"dtm_result": "FAILURE", "message": "wait result not return success: FAILURE"})
    assert api.query("W")["transaction"]["status"] == "submitted"
    api.server.advance(3)
    assert api.query("W")["transaction"]["status"] == "succeed"
    branch_service.route("/f2/a", 409)
    failed = api.post("submit", saga_body(branch_service, "F", "f1", "f2", wait_result=True))
    assert failed.status_code == 409 and failed.json()["message"].startswith("url:")
    assert failed.json()["message"] == api.query("F")["transaction"]["rollback_reason"]


def test_tcc_wait_result_passes_ongoing_through(api: Any, branch_service: BranchService) -> None:
    branch_service.route("/confirm", 425, 200)
    api.post("prepare", {"gid": "T", "trans_type": "tcc", "retry_interval": 1})
    api.post("registerBranch", {"gid": "T", "trans_type": "tcc", "branch_id": "01", "data": "{}",
                                "confirm": branch_service.url("/confirm"), "cancel": branch_service.url("/cancel")})
    resp = api.post("submit", {"gid": "T", "trans_type": "tcc", "wait_result": True, "retry_interval": 1})
    assert (resp.status_code, resp.json()) == (425, {"dtm_result": "ONGOING", "message": "ONGOING"})
    # Deviation from DTM v1.19.0: a resubmit runs a real pass (DTM marks it succeed without confirm).
    again = api.post("submit", {"gid": "T", "trans_type": "tcc", "wait_result": True})
    assert again.status_code == 200
    assert ops(branch_service) == ["/confirm:confirm", "/confirm:confirm"]
    assert [b["status"] for b in api.query("T")["branches"]] == ["prepared", "succeed"]


def test_resubmit_submitted_saga_does_not_recall_succeeded_actions(api: Any, branch_service: BranchService) -> None:
    branch_service.route("/s2/a", 500)
    body = saga_body(branch_service, "RS", "s1", "s2")
    api.post("submit", body)
    api.server.wait_idle()
    assert api.post("submit", body).status_code == 200
    api.server.wait_idle()
    assert ops(branch_service) == ["/s1/a:action", "/s2/a:action", "/s2/a:action"]


def test_tcc_timeout_at_prepare_cancels_and_late_register_fails(api: Any, branch_service: BranchService) -> None:
    api.post("prepare", {"gid": "TT", "trans_type": "tcc", "timeout_to_fail": 2, "retry_interval": 1})
    reg = {"gid": "TT", "trans_type": "tcc", "branch_id": "01", "data": '{"a":1}',
           "confirm": branch_service.url("/confirm"), "cancel": branch_service.url("/cancel")}
    api.post("registerBranch", reg)
    api.server.advance(3)  # the cron looked at 1 s (before the timeout); locking pushed the next look 10 s away
    assert branch_service.calls() == []
    api.server.advance(10)
    assert ops(branch_service) == ["/cancel:cancel"]
    late = api.post("registerBranch", {**reg, "branch_id": "02"})
    assert late.status_code == 409
    trans = api.query("TT")["transaction"]
    assert (trans["status"], trans["rollback_reason"]) == ("failed", "Timeout after 2 seconds")


def test_msg_delay_and_query_prepared(api: Any, branch_service: BranchService) -> None:
    api.post("submit", {"gid": "D", "trans_type": "msg", "steps": [{"action": branch_service.url("/d")}],
                        "payloads": ["{}"], "custom_data": '{"delay":3}'})
    api.server.advance(2.5)
    assert branch_service.calls() == []
    api.server.advance(1)
    assert ops(branch_service) == ["/d:action"]
    branch_service.route("/qp", 425, 200)
    api.post("prepare", {"gid": "Q", "trans_type": "msg", "steps": [{"action": branch_service.url("/q")}],
                         "payloads": [""], "query_prepared": branch_service.url("/qp"), "timeout_to_fail": 2})
    api.server.advance(4)
    qp = branch_service.calls("/qp")
    assert [(c.method, c.query) for c in qp] == [
        ("GET", {"gid": "Q", "trans_type": "msg", "branch_id": "00", "op": "msg"})] * 2
    assert [c.method for c in branch_service.calls("/q")] == ["GET"]
    assert api.query("Q")["transaction"]["status"] == "succeed"


def test_msg_sequential_stops_at_first_error(api: Any, branch_service: BranchService) -> None:
    branch_service.route("/m1", 409, 200)
    api.post("submit", {"gid": "MS", "trans_type": "msg", "retry_interval": 1,
                        "steps": [{"action": branch_service.url("/m1")}, {"action": branch_service.url("/m2")}],
                        "payloads": ["{}", "{}"]})
    api.server.wait_idle()
    assert ops(branch_service) == ["/m1:action"]
    api.server.advance(2)
    assert ops(branch_service) == ["/m1:action", "/m1:action", "/m2:action"]


def test_concurrent_saga_orders(api: Any, branch_service: BranchService) -> None:
    branch_service.route("/s3/a", 409)
    body = saga_body(branch_service, "C", "s1", "s2", "s3", custom_data='{"concurrent":true,"orders":{"2":[0,1]}}')
    assert api.post("submit", {**body, "wait_result": True}).status_code == 409
    seq = ops(branch_service)
    assert seq.index("/s3/a:action") > max(seq.index("/s1/a:action"), seq.index("/s2/a:action"))
    assert seq.index("/s3/c:compensate") < min(seq.index("/s1/c:compensate"), seq.index("/s2/c:compensate"))
    assert api.query("C")["transaction"]["status"] == "failed"


def test_unsupported_features_answer_clearly(api: Any, branch_service: BranchService) -> None:
    topic_msg = {"gid": "TP", "trans_type": "msg", "steps": [{"action": "topic://t"}], "payloads": ["{}"]}
    topic = api.post("submit", topic_msg)
    assert topic.status_code == 500 and "topics are not supported" in topic.json()["message"]
    assert api.query("TP")["transaction"] is None


def test_chunked_request_body(api: Any, branch_service: BranchService) -> None:
    body = json.dumps(saga_body(branch_service, "CH", "s1")).encode()
    resp = api.session.post(f"{api.server.url}/submit", data=iter([body[:10], body[10:]]),
                            headers={"Content-Type": "application/json"}, timeout=5)
    assert resp.status_code == 200
    assert api.server.wait_final("CH").status == "succeed"


def test_all_paging_and_filters(api: Any, branch_service: BranchService) -> None:
    for gid in ("P1", "P2", "P3"):
        api.post("submit", saga_body(branch_service, gid, "s1", wait_result=True))
    api.post("prepare", {"gid": "P4", "trans_type": "tcc"})
    page1 = api.get("all", limit="2").json()
    assert [t["gid"] for t in page1["transactions"]] == ["P4", "P3"]
    page2 = api.get("all", limit="2", position=page1["next_position"]).json()
    assert [t["gid"] for t in page2["transactions"]] == ["P2", "P1"] and page2["next_position"] == ""
    assert [t["gid"] for t in api.get("all", status="prepared").json()["transactions"]] == ["P4"]
    assert api.get("all", transType="xa").json() == {"transactions": [], "next_position": ""}
    assert api.get("all", gid="NONE").json() == {"transactions": None, "next_position": ""}


def test_reset_next_cron_time(api: Any, branch_service: BranchService) -> None:
    branch_service.route("/s1/a", 500, 200)
    api.post("submit", saga_body(branch_service, "RN", "s1"))
    api.server.wait_idle()
    assert api.post("resetNextCronTime", {"gid": "RN"}).status_code == 200
    api.server.run_due()
    assert api.query("RN")["transaction"]["status"] == "succeed"


def test_xa_phase_two_is_post_with_empty_chunked_body(api: Any, branch_service: BranchService) -> None:
    api.post("prepare", {"gid": "X", "trans_type": "xa"})
    for bid in ("01", "02"):
        api.post("registerBranch", {"gid": "X", "trans_type": "xa", "branch_id": bid, "url": branch_service.url("/xa")})
    assert api.post("submit", {"gid": "X", "trans_type": "xa", "wait_result": True}).status_code == 200
    calls = branch_service.calls()
    assert [(c.method, c.branch_id, c.op, c.body) for c in calls] == [
        ("POST", "01", "commit", ""), ("POST", "02", "commit", "")]
    assert calls[0].headers.get("Transfer-Encoding") == "chunked"


def test_wait_result_pass_interrupted_by_force_stop_is_not_success(
    dtm_server: DtmTestServer, branch_service: BranchService
) -> None:
    """DTM's compare-and-set fails when the status changes under a pass; submit must not answer success."""
    from dtmcli import DtmClient, DtmFailure
    from dtmcli.tcc import tcc_global_transaction

    client = DtmClient(dtm_server.url)
    gid = dtmcli.local_gid()

    def confirm(call: Any) -> int:
        client.force_stop(gid)
        return 200

    svc = branch_service
    with pytest.raises(DtmFailure):
        with tcc_global_transaction(client, gid, wait_result=True) as tcc:
            tcc.call_branch({"amount": 1}, svc.url("/try"), svc.route("/confirm", confirm), svc.url("/cancel"))
    trans = dtm_server.query(gid)
    assert trans is not None and trans.status == "failed"
    client.close()
