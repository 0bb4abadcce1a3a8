"""End-to-end: dtmcli.Saga / dtmcli.Msg through a coordinator to real HTTP branch services.

These use only the ``dtm`` facade, so they also run against a real server: ``--dtm-server URL``.
"""

from __future__ import annotations

import pytest

from dtmcli import DtmFailure, Msg, Saga, local_gid
from dtmcli.testing import BranchService, DtmFacade


def test_saga_success(dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    saga = Saga(dtm.url).add(svc.url("/TransOut"), svc.url("/TransOutRevert"), {"amount": 30})
    saga.add(svc.url("/TransIn"), svc.url("/TransInRevert"), {"amount": 30})
    saga.submit()
    trans = dtm.wait_status(saga.gid, ["succeed", "failed"])
    assert trans.status == "succeed"
    calls = svc.calls()
    assert [(c.path, c.op, c.json()) for c in calls] == [
        ("/TransOut", "action", {"amount": 30}), ("/TransIn", "action", {"amount": 30})]
    assert all(c.query["gid"] == saga.gid and "dtm" not in c.query for c in calls)


def test_saga_failure_compensates_in_reverse(dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    svc.route("/TransIn", (409, {"dtm_result": "FAILURE", "message": "no money"}))
    saga = Saga(dtm.url, wait_result=True).add(svc.url("/TransOut"), svc.url("/TransOutRevert"), {"a": 1})
    saga.add(svc.url("/TransIn"), svc.url("/TransInRevert"), {"a": 2})
    with pytest.raises(DtmFailure):
        saga.submit()
    trans = dtm.wait_status(saga.gid, ["failed"])
    assert "no money" in trans.rollback_reason
    assert [c.path for c in svc.calls()] == ["/TransOut", "/TransIn", "/TransInRevert", "/TransOutRevert"]


def test_saga_retry_after_temporary_error(dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    svc.route("/flaky", 500, 200)
    saga = Saga(dtm.url, retry_interval=1).add(svc.url("/flaky"), svc.url("/undo"), {"a": 1})
    saga.submit()
    svc.wait_calls(1, "/flaky")
    dtm.advance(3, gids=[saga.gid])
    assert dtm.wait_status(saga.gid, ["succeed"], timeout=30).status == "succeed"
    assert [c.op for c in svc.calls("/flaky")] == ["action", "action"]


def test_msg_submit_runs_actions(dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    msg = Msg(dtm.url).add(svc.url("/a1"), {"n": 1}).add(svc.url("/a2"), "")
    msg.submit()
    assert dtm.wait_status(msg.gid, ["succeed"]).status == "succeed"
    assert [(c.method, c.path) for c in svc.calls()] == [("POST", "/a1"), ("GET", "/a2")]


def test_msg_prepared_is_settled_by_query_prepared(dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    msg = Msg(dtm.url, local_gid(), timeout_to_fail=2).add(svc.url("/act"), {"n": 1})
    msg.prepare(svc.url("/query_prepared"))
    dtm.advance(13, gids=[msg.gid])
    assert dtm.wait_status(msg.gid, ["succeed"], timeout=30).status == "succeed"
    qp = svc.calls("/query_prepared")[0]
    assert (qp.method, qp.query["op"], qp.query["branch_id"]) == ("GET", "msg", "00")


def test_msg_abort(dtm: DtmFacade, branch_service: BranchService) -> None:
    msg = Msg(dtm.url).add(branch_service.url("/never"), {})
    msg.prepare(branch_service.url("/qp"))
    msg.abort()
    trans = dtm.query(msg.gid)
    assert trans is not None and trans.status == "failed"
    assert branch_service.calls() == []
