"""End-to-end: Saga / Msg through a coordinator to real HTTP branch services, sync and asyncio.

These use only the ``dtm`` facade, so they also run against a real server: ``--dtm-server URL``.
Every test runs once with ``dtmcli`` and once with ``dtmcli.asyncio`` (tests/flavours.py).
"""

from __future__ import annotations

import pytest
from flavours import Flavour, both

from dtmcli import DtmFailure, local_gid
from dtmcli.testing import BranchService, DtmFacade

pytestmark = both


def test_saga_success(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    saga = flavour.m.Saga(dtm.url).add(svc.url("/TransOut"), svc.url("/TransOutRevert"), {"amount": 30})
    saga.add(svc.url("/TransIn"), svc.url("/TransInRevert"), {"amount": 30})
    flavour.run(saga.submit())
    trans = dtm.wait_status(saga.gid, ["succeed", "failed"])
    assert trans.status == "succeed"
    calls = svc.calls()
    assert [(c.path, c.op, c.json()) for c in calls] == [
        ("/TransOut", "action", {"amount": 30}), ("/TransIn", "action", {"amount": 30})]
    assert all(c.query["gid"] == saga.gid and "dtm" not in c.query for c in calls)


def test_saga_failure_compensates_in_reverse(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    svc.route("/TransIn", (409, {"dtm_result": "FAILURE", "message": "no money"}))
    saga = flavour.m.Saga(dtm.url, wait_result=True)
    saga.add(svc.url("/TransOut"), svc.url("/TransOutRevert"), {"a": 1})
    saga.add(svc.url("/TransIn"), svc.url("/TransInRevert"), {"a": 2})
    with pytest.raises(DtmFailure) as failure:
        flavour.run(saga.submit())
    assert failure.value.gid == saga.gid
    trans = dtm.wait_status(saga.gid, ["failed"])
    assert "no money" in trans.rollback_reason
    assert [c.path for c in svc.calls()] == ["/TransOut", "/TransIn", "/TransInRevert", "/TransOutRevert"]


def test_saga_retry_after_temporary_error(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    svc.route("/flaky", 500, 200)
    saga = flavour.m.Saga(dtm.url, retry_interval=1).add(svc.url("/flaky"), svc.url("/undo"), {"a": 1})
    flavour.run(saga.submit())
    svc.wait_calls(1, "/flaky")
    dtm.advance(3, gids=[saga.gid])
    assert dtm.wait_status(saga.gid, ["succeed"], timeout=30).status == "succeed"
    assert [c.op for c in svc.calls("/flaky")] == ["action", "action"]


def test_msg_submit_runs_actions(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    msg = flavour.m.Msg(dtm.url).add(svc.url("/a1"), {"n": 1}).add(svc.url("/a2"), "")
    flavour.run(msg.submit())
    assert dtm.wait_status(msg.gid, ["succeed"]).status == "succeed"
    assert [(c.method, c.path) for c in svc.calls()] == [("POST", "/a1"), ("GET", "/a2")]


def test_msg_prepared_is_settled_by_query_prepared(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService
) -> None:
    svc = branch_service
    msg = flavour.m.Msg(dtm.url, local_gid(), timeout_to_fail=2).add(svc.url("/act"), {"n": 1})
    flavour.run(msg.prepare(svc.url("/query_prepared")))
    assert msg.state == "prepared"
    dtm.advance(13, gids=[msg.gid])
    assert dtm.wait_status(msg.gid, ["succeed"], timeout=30).status == "succeed"
    qp = svc.calls("/query_prepared")[0]
    assert (qp.method, qp.query["op"], qp.query["branch_id"]) == ("GET", "msg", "00")


def test_msg_abort(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    msg = flavour.m.Msg(dtm.url).add(branch_service.url("/never"), {})
    flavour.run(msg.prepare(branch_service.url("/qp")))
    flavour.run(msg.abort())
    assert msg.state == "aborted"
    trans = dtm.query(msg.gid)
    assert trans is not None and trans.status == "failed"
    assert branch_service.calls() == []
