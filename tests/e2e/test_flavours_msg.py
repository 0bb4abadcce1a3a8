"""2-phase messages end to end, sync and asyncio: prepare/submit/abort, prepare_and_submit's decisions
(protocol.md §8), wait_result outcomes and submit(recover=True), through the coordinator (in process,
or ``--dtm-server``) and a real HTTP branch service.
"""

from __future__ import annotations

from typing import Any

import pytest
from flavours import Flavour, both

from dtmcli import DtmConnectError, DtmFailure, DtmInProgress, DtmOngoing, Retry, local_gid
from dtmcli.testing import BranchService, DtmFacade

pytestmark = both


class RefuseFirstSubmit:
    """Wraps a client's transport: the first ``/submit`` fails as a refused connection (nothing
    sent), every other request goes through. ``request`` returns what the wrapped one returns (a
    Response, or a coroutine for an async transport), so one class serves both flavours."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.refused = 0
        self.sent: list[str] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        if url.endswith("/submit") and not self.refused:
            self.refused += 1
            raise DtmConnectError(f"{method} {url}: cannot connect: [Errno 111] Connection refused (scripted)")
        self.sent.append(url.rsplit("/", 1)[1])
        return self.inner.request(method, url, **kwargs)

    def __getattr__(self, name: str) -> Any:  # timeout, close, aclose
        return getattr(self.inner, name)


def refusing_client(flavour: Flavour, url: str) -> tuple[Any, RefuseFirstSubmit]:
    transport = RefuseFirstSubmit(flavour.Client(url).transport)
    return flavour.Client(url, transport=transport), transport


def refused_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/dtmsvr"


# -- prepare / submit / abort -------------------------------------------------------------------


def test_prepare_then_submit(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    msg = flavour.m.Msg(dtm.url, local_gid()).add(svc.route("/m/a1"), {"n": 1}).add(svc.route("/m/a2"), {"n": 2})
    flavour.run(msg.prepare(svc.route("/m/qp")))
    assert msg.state == "prepared"
    stored = dtm.query(msg.gid)
    assert stored is not None and stored.status == "prepared"
    flavour.run(msg.submit())
    assert msg.state == "submitted"
    assert dtm.wait_status(msg.gid).status == "succeed"
    assert [(c.path, c.op, c.json()) for c in svc.calls()] == [("/m/a1", "action", {"n": 1}),
                                                               ("/m/a2", "action", {"n": 2})]


def test_prepare_then_abort_runs_no_action(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    msg = flavour.m.Msg(dtm.url, local_gid()).add(branch_service.route("/m/never"), {})
    flavour.run(msg.prepare(branch_service.route("/m/qp")))
    flavour.run(msg.abort("changed my mind"))
    assert msg.state == "aborted"
    trans = dtm.wait_status(msg.gid, ["failed"])
    assert trans.rollback_reason == ""  # DTM keeps an abort's reason for tcc/xa only
    assert branch_service.calls() == []


@pytest.mark.parametrize(("status", "outcome"), [(200, None), (409, DtmFailure), (425, DtmOngoing)])
def test_query_prepared_status_reads_the_answer_as_dtm_does(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService, status: int, outcome: Any
) -> None:
    qp = branch_service.route("/m/qp", status)
    msg = flavour.m.Msg(dtm.url, local_gid()).add(branch_service.route("/m/a"), {})
    if outcome is None:
        assert flavour.run(msg.query_prepared_status(qp)) is None
    else:
        with pytest.raises(outcome):
            flavour.run(msg.query_prepared_status(qp))
    (call,) = branch_service.calls("/m/qp")
    assert call.method == "GET" and call.query == {
        "dtm": dtm.url, "gid": msg.gid, "branch_id": "00", "trans_type": "msg", "op": "msg"}


# -- prepare_and_submit (Go's DoAndSubmit) ------------------------------------------------------


def test_do_and_submit_success_submits(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    gid = local_gid()
    msg = flavour.m.Msg(dtm.url, gid).add(svc.route("/m/act"), {"n": 1})
    seen: list[Any] = []

    def busi(barrier: Any) -> str:
        seen.append(barrier)
        stored = dtm.query(gid)
        assert stored is not None and stored.status == "prepared"  # the local work runs after prepare
        return "done"

    assert flavour.run(msg.prepare_and_submit(svc.route("/m/qp"), flavour.busi(busi))) == "done"
    (barrier,) = seen
    assert (barrier.trans_type, barrier.gid, barrier.branch_id, barrier.op) == ("msg", gid, "00", "msg")
    assert msg.state == "submitted" and dtm.wait_status(gid).status == "succeed"
    assert len(svc.calls("/m/act")) == 1 and not svc.calls("/m/qp")


def test_do_and_submit_business_failure_aborts_without_asking(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService
) -> None:
    svc = branch_service
    msg = flavour.m.Msg(dtm.url, local_gid()).add(svc.route("/m/act"), {"n": 1})

    def busi(barrier: Any) -> None:
        raise DtmFailure("insufficient balance")

    with pytest.raises(DtmFailure, match="insufficient balance"):
        flavour.run(msg.do_and_submit(svc.route("/m/qp"), flavour.busi(busi)))
    assert msg.state == "aborted"
    assert dtm.wait_status(msg.gid, ["failed"]).status == "failed"
    assert svc.calls() == []  # neither query_prepared nor the action


@pytest.mark.parametrize(("qp_answer", "state", "status"), [(409, "aborted", "failed"), (200, "submitted", "succeed")])
def test_do_and_submit_other_error_lets_query_prepared_decide(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService, qp_answer: int, state: str, status: str
) -> None:
    """The business error may come after its local commit (a lost connection): the client asks
    query_prepared, as DTM would, and aborts on FAILURE or submits on success."""
    svc = branch_service
    qp = svc.route("/m/qp", qp_answer)
    msg = flavour.m.Msg(dtm.url, local_gid()).add(svc.route("/m/act"), {"n": 1})

    def busi(barrier: Any) -> None:
        raise ConnectionResetError("lost the database after COMMIT")

    with pytest.raises(ConnectionResetError):
        flavour.run(msg.do_and_submit(qp, flavour.busi(busi)))
    assert msg.state == state
    assert dtm.wait_status(msg.gid, [status]).status == status
    (asked,) = svc.calls("/m/qp")
    assert (asked.query["op"], asked.query["branch_id"], asked.query["dtm"]) == ("msg", "00", dtm.url)
    assert len(svc.calls("/m/act")) == (1 if status == "succeed" else 0)


@pytest.mark.parametrize("qp_answer", [500, 425])
def test_do_and_submit_unknown_answer_leaves_it_to_dtm(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService, qp_answer: int
) -> None:
    """No answer from query_prepared: the message stays prepared and DTM asks again after timeout_to_fail."""
    svc = branch_service
    qp = svc.route("/m/qp", qp_answer, 200)
    msg = flavour.m.Msg(dtm.url, local_gid(), timeout_to_fail=2).add(svc.route("/m/act"), {"n": 1})

    def busi(barrier: Any) -> None:
        raise TimeoutError("no answer from the database")

    with pytest.raises(TimeoutError):
        flavour.run(msg.do_and_submit(qp, flavour.busi(busi)))
    assert msg.state == "prepared"
    stored = dtm.query(msg.gid)
    assert stored is not None and stored.status == "prepared"
    dtm.advance(13, gids=[msg.gid])
    assert dtm.wait_status(msg.gid, ["succeed"], timeout=30).status == "succeed"
    assert len(svc.calls("/m/qp")) >= 2 and len(svc.calls("/m/act")) == 1


def test_prepare_failure_runs_no_business(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    """A gid DTM already holds as failed cannot be prepared: the local work never runs."""
    gid = local_gid()
    first = flavour.m.Msg(dtm.url, gid).add(branch_service.route("/m/act"), {})
    flavour.run(first.prepare(branch_service.route("/m/qp")))
    flavour.run(first.abort())
    ran: list[Any] = []
    again = flavour.m.Msg(dtm.url, gid).add(branch_service.route("/m/act"), {})
    with pytest.raises(DtmFailure, match="cannot prepare"):
        flavour.run(again.do_and_submit(branch_service.route("/m/qp"), flavour.busi(ran.append)))
    assert ran == [] and again.state == "new"
    assert dtm.wait_status(gid, ["failed"]).status == "failed"


# -- wait_result --------------------------------------------------------------------------------


def test_wait_result_success(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    msg = flavour.m.Msg(dtm.url, local_gid(), wait_result=True).add(branch_service.route("/m/act"), {})
    flavour.run(msg.submit())
    trans = dtm.query(msg.gid)  # no waiting: the submit returned after the pass
    assert trans is not None and trans.status == "succeed"


def test_wait_result_unfinished_pass_is_in_progress(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService
) -> None:
    act = branch_service.route("/m/act", 500, 200)
    msg = flavour.m.Msg(dtm.url, local_gid(), wait_result=True, retry_interval=1).add(act, {})
    flavour.run(msg.prepare(branch_service.route("/m/qp")))
    with pytest.raises(DtmInProgress) as progress:
        flavour.run(msg.submit())
    assert progress.value.status == "submitted" and progress.value.gid == msg.gid
    assert msg.state == "submitted"
    dtm.advance(3, gids=[msg.gid])
    assert dtm.wait_status(msg.gid, ["succeed"], timeout=30).status == "succeed"


# -- submit(recover=True) -----------------------------------------------------------------------


def test_refused_submit_without_recover_stays_new(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService
) -> None:
    client, transport = refusing_client(flavour, dtm.url)
    msg = flavour.m.Msg(client, local_gid()).add(branch_service.route("/m/act"), {})
    with pytest.raises(DtmConnectError):
        flavour.run(msg.submit())
    assert msg.state == "new" and transport.sent == []
    flavour.run(msg.submit())  # nothing left: sending it now is the first submit DTM sees
    assert dtm.wait_status(msg.gid).status == "succeed"
    assert transport.sent == ["submit"] and len(branch_service.calls("/m/act")) == 1


@pytest.mark.parametrize("prepared", [False, True], ids=["simple", "prepared"])
def test_recover_resends_a_refused_submit_after_query(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService, prepared: bool
) -> None:
    client, transport = refusing_client(flavour, dtm.url)
    msg = flavour.m.Msg(client, local_gid()).add(branch_service.route("/m/act"), {})
    if prepared:
        flavour.run(msg.prepare(branch_service.route("/m/qp")))
    flavour.run(msg.submit(recover=True))
    assert msg.state == "submitted"
    assert transport.sent == ["prepare"] * prepared + ["query", "submit"]
    assert dtm.wait_status(msg.gid).status == "succeed"
    assert len(branch_service.calls("/m/act")) == 1


def test_recover_with_dtm_unreachable_sends_nothing(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService
) -> None:
    client = flavour.Client(refused_url(), timeout=2, retry=Retry(retries=0))
    msg = flavour.m.Msg(client, local_gid()).add(branch_service.route("/m/act"), {})
    with pytest.raises(DtmConnectError):
        flavour.run(msg.submit(recover=True))  # the /query of the recovery is refused as well
    assert msg.state == "new"
    msg.client = flavour.Client(dtm.url)
    flavour.run(msg.submit())
    assert dtm.wait_status(msg.gid).status == "succeed"
    assert len(branch_service.calls("/m/act")) == 1
