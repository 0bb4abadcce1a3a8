"""Sagas end to end, sync and asyncio: concurrent steps, wait_result outcomes, branch headers and
submit(recover=True), through the coordinator (in process, or ``--dtm-server``) and a real HTTP
branch service. The basic success/failure/retry scenarios are in tests/coordinator/test_e2e.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from flavours import Flavour, both

from dtmcli import DtmConnectError, DtmInProgress, DtmInvalidInput, local_gid
from dtmcli.testing import Answer, BranchService, DtmFacade

pytestmark = both


class RefuseFirstSubmit:
    """The first ``/submit`` fails as a refused connection (nothing sent); the rest goes through."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.sent: list[str] = []
        self.refused = False

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        if url.endswith("/submit") and not self.refused:
            self.refused = True
            raise DtmConnectError(f"{method} {url}: cannot connect (scripted)")
        self.sent.append(url.rsplit("/", 1)[1])
        return self.inner.request(method, url, **kwargs)  # a Response, or a coroutine when async

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def two_steps(flavour: Flavour, dtm: Any, svc: BranchService, **options: Any) -> Any:
    saga = flavour.m.Saga(dtm, local_gid(), **options)
    saga.add(svc.url("/s/out"), svc.url("/s/out_undo"), {"amount": 30})
    return saga.add(svc.url("/s/in"), svc.url("/s/in_undo"), {"amount": 30})


def test_wait_result_success_is_final_on_return(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService
) -> None:
    saga = two_steps(flavour, dtm.url, branch_service, wait_result=True)
    flavour.run(saga.submit())
    trans = dtm.query(saga.gid)
    assert trans is not None and trans.status == "succeed"
    # A real DTM on a SQL store with UpdateBranchSync 0 writes branch statuses ~200 ms later.
    trans = dtm.wait_status(saga.gid)
    assert [b.status for b in trans.branches if b.op == "action"] == ["succeed", "succeed"]


def test_wait_result_unfinished_pass_is_in_progress(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService
) -> None:
    branch_service.route("/s/in", 500, 200)
    saga = two_steps(flavour, dtm.url, branch_service, wait_result=True, retry_interval=1)
    with pytest.raises(DtmInProgress) as progress:
        flavour.run(saga.submit())
    assert progress.value.status == "submitted" and saga.state == "submitted"
    with pytest.raises(DtmInvalidInput, match="already submitted"):
        flavour.run(saga.submit())
    dtm.advance(3, gids=[saga.gid])
    assert dtm.wait_status(saga.gid, ["succeed"], timeout=30).status == "succeed"
    assert len(branch_service.calls("/s/out")) == 1 and len(branch_service.calls("/s/in")) == 2


def test_concurrent_saga_keeps_branch_orders(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    svc.route("/s/slow", Answer(200, delay=0.3))
    saga = flavour.m.Saga(dtm.url, local_gid(), wait_result=True).enable_concurrent()
    saga.add(svc.route("/s/slow"), "", {"i": 0}).add(svc.route("/s/fast"), "", {"i": 1})
    saga.add(svc.route("/s/last"), "", {"i": 2}).add_branch_order(2, [0, 1])
    flavour.run(saga.submit())
    assert dtm.query(saga.gid).status == "succeed"  # type: ignore[union-attr]
    paths = [c.path for c in svc.calls()]
    assert paths[-1] == "/s/last" and sorted(paths[:2]) == ["/s/fast", "/s/slow"]


def test_branch_headers_reach_every_branch(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    branch_service.route("/s/in", 409)
    saga = two_steps(flavour, dtm.url, branch_service, branch_headers={"X-Tenant": "t1"})
    flavour.run(saga.submit())
    assert dtm.wait_status(saga.gid).status == "failed"
    calls = branch_service.calls()
    assert [c.op for c in calls] == ["action", "action", "compensate", "compensate"]
    assert all(c.headers.get("X-Tenant") == "t1" for c in calls)


def test_refused_submit_stays_new_and_recover_resends(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService
) -> None:
    transport = RefuseFirstSubmit(flavour.Client(dtm.url).transport)
    saga = two_steps(flavour, flavour.Client(dtm.url, transport=transport), branch_service)
    with pytest.raises(DtmConnectError):
        flavour.run(saga.submit())
    assert saga.state == "new" and transport.sent == []
    transport.refused = False
    flavour.run(saga.submit(recover=True))  # refused again, /query finds nothing, sent once more
    assert saga.state == "submitted" and transport.sent == ["query", "submit"]
    assert dtm.wait_status(saga.gid).status == "succeed"
    assert len(branch_service.calls("/s/out")) == 1 and len(branch_service.calls("/s/in")) == 1


def test_second_submit_is_refused_and_actions_run_once(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService
) -> None:
    saga = two_steps(flavour, dtm.url, branch_service)
    assert saga.state == "new"
    flavour.run(saga.submit())
    assert saga.state == "submitted"
    assert dtm.wait_status(saga.gid).status == "succeed"
    for again in (saga.submit, lambda: saga.submit(recover=True)):
        with pytest.raises(DtmInvalidInput, match="already submitted"):
            flavour.call(again)
    with pytest.raises(DtmInvalidInput, match="already submitted"):
        saga.add(branch_service.route("/s/more"), "", {})
    assert len(branch_service.calls("/s/out")) == 1


def test_empty_saga_stays_new_and_can_be_completed(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService
) -> None:
    saga = flavour.m.Saga(dtm.url, local_gid())
    with pytest.raises(DtmInvalidInput, match="at least one step"):
        flavour.run(saga.submit())
    assert saga.state == "new" and dtm.query(saga.gid) is None
    flavour.run(saga.add(branch_service.route("/s/a"), "", {}).submit())
    assert dtm.wait_status(saga.gid).status == "succeed"
