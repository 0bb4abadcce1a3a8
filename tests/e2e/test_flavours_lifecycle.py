"""The transaction lifecycle (new → prepared → submitted/aborted) end to end, sync and asyncio.

Flavoured twins of the saga/msg scenarios of tests/unit/test_lifecycle.py and
tests/unit/test_option_attrs.py: the state machine lives in the shared core, and these check that
the async driver moves it the same way over real HTTP (coordinator in process, or ``--dtm-server``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Callable

import pytest
from flavours import Flavour, both
from web_servers import SilentDtm

from dtmcli import DtmFailure, DtmInvalidInput, DtmTimeout, Retry, local_gid
from dtmcli.testing import Answer, BranchService, DtmFacade

pytestmark = both


@pytest.fixture
def silent() -> Iterator[SilentDtm]:
    server = SilentDtm()
    yield server
    server.close()


def quick(flavour: Flavour, url: str) -> Any:
    """A client that gives up after 0.3 s and never retries."""
    return flavour.Client(url, timeout=0.3, retry=Retry(retries=0))


SAGA_CHANGES: list[tuple[str, Callable[[Any], Any]]] = [
    ("add", lambda s: s.add("http://127.0.0.1:9/x", "", {})),
    ("add_branch_order", lambda s: s.add_branch_order(0, [])),
    ("wait_result attr", lambda s: setattr(s, "wait_result", True)),
    ("set_options", lambda s: s.set_options(timeout_to_fail=9)),
    ("gid", lambda s: setattr(s, "gid", "other")),
]


@pytest.mark.parametrize("change", [c[1] for c in SAGA_CHANGES], ids=[c[0] for c in SAGA_CHANGES])
def test_saga_is_frozen_once_submitted(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService, change: Callable[[Any], Any]
) -> None:
    saga = flavour.m.Saga(dtm.url, local_gid()).add(branch_service.url("/lc/a"), branch_service.url("/lc/c"), {})
    flavour.run(saga.submit())
    before = saga.build_body()
    with pytest.raises(DtmInvalidInput, match="already submitted"):
        change(saga)
    assert saga.build_body() == before
    assert dtm.wait_status(saga.gid).status == "succeed"


MSG_CHANGES: list[tuple[str, Callable[[Any], Any]]] = [
    ("add", lambda m: m.add("http://127.0.0.1:9/x", {})),
    ("set_delay", lambda m: m.set_delay(3)),
    ("query_prepared attr", lambda m: setattr(m, "query_prepared", "http://127.0.0.1:9/other")),
    ("prepare elsewhere", lambda m: m.prepare("http://127.0.0.1:9/other")),
    ("wait_result with another option", lambda m: m.set_options(wait_result=True, retry_interval=3)),
]


@pytest.mark.parametrize("change", [c[1] for c in MSG_CHANGES], ids=[c[0] for c in MSG_CHANGES])
def test_msg_is_frozen_once_prepared(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService, change: Callable[[Any], Any]
) -> None:
    msg = flavour.m.Msg(dtm.url, local_gid()).add(branch_service.url("/lc/m"), {"n": 1})
    flavour.run(msg.prepare(branch_service.url("/lc/qp")))
    before = msg.build_body()
    with pytest.raises(DtmInvalidInput, match="prepared"):
        flavour.call(change, msg)
    assert msg.build_body() == before
    flavour.run(msg.submit())
    assert dtm.wait_status(msg.gid).status == "succeed"
    assert len(branch_service.calls("/lc/m")) == 1


def test_msg_lifecycle(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    qp = branch_service.url("/lc/qp")
    done = flavour.m.Msg(dtm.url, local_gid()).add(branch_service.url("/lc/m"), {})
    flavour.run(done.prepare(qp))
    with pytest.raises(DtmInvalidInput, match="already prepared"):
        flavour.run(done.prepare(qp))
    flavour.run(done.submit())
    for again in (done.submit, done.abort, lambda: done.prepare(qp)):
        with pytest.raises(DtmInvalidInput, match="already submitted"):
            flavour.call(again)

    aborted = flavour.m.Msg(dtm.url, local_gid()).add(branch_service.url("/lc/never"), {})
    flavour.run(aborted.prepare(qp))
    flavour.run(aborted.abort("changed my mind"))
    assert aborted.state == "aborted" and dtm.wait_status(aborted.gid).status == "failed"
    for again in (aborted.submit, aborted.abort):
        with pytest.raises(DtmInvalidInput, match="already aborted"):
            flavour.call(again)
    assert dtm.wait_status(done.gid).status == "succeed"
    assert not branch_service.calls("/lc/never") and not branch_service.calls("/lc/qp")


def test_timed_out_submit_is_never_sent_again(
    flavour: Flavour, silent: SilentDtm, branch_service: BranchService
) -> None:
    saga = flavour.m.Saga(quick(flavour, silent.url), local_gid()).add(branch_service.url("/lc/a"), "", {})
    with pytest.raises(DtmTimeout):
        flavour.run(saga.submit())
    assert saga.state == "submitted"  # the request may still reach DTM
    for again in (saga.submit, lambda: saga.submit(recover=True)):
        with pytest.raises(DtmInvalidInput, match="already submitted"):
            flavour.call(again)
    assert silent.requests == ["/api/dtmsvr/submit"]


def test_timed_out_abort_is_final(
    flavour: Flavour, dtm: DtmFacade, silent: SilentDtm, branch_service: BranchService
) -> None:
    msg = flavour.m.Msg(dtm.url, local_gid()).add(branch_service.url("/lc/m"), {})
    flavour.run(msg.prepare(branch_service.url("/lc/qp")))
    msg.client = quick(flavour, silent.url)
    with pytest.raises(DtmTimeout):
        flavour.run(msg.abort())
    assert msg.state == "aborted"
    for again in (msg.submit, msg.abort):
        with pytest.raises(DtmInvalidInput, match="already aborted"):
            flavour.call(again)
    assert silent.requests == ["/api/dtmsvr/abort"]
    msg.client = flavour.Client(dtm.url)
    flavour.run(msg.client.force_stop(msg.gid))  # settle it now instead of after timeout_to_fail


def test_wait_result_attribute_takes_effect_end_to_end(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService
) -> None:
    """The Go idiom ``saga.WaitResult = true``, spelt the Python way, makes submit report the failure."""
    action = branch_service.route("/attr/a", Answer(409, {"dtm_result": "FAILURE"}))
    saga = flavour.m.Saga(flavour.Client(dtm.url), local_gid()).add(action, branch_service.url("/attr/c"), {"n": 1})
    saga.wait_result = True
    saga.retry_interval = 3
    with pytest.raises(DtmFailure):
        flavour.run(saga.submit())
    assert dtm.wait_status(saga.gid).status == "failed"
