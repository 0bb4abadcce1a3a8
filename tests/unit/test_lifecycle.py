"""Issue 9.3: one lifecycle for every transaction type (new → prepared → submitted/aborted).

A transaction object sends each of prepare/submit/abort at most once in the states its type allows,
and its content is frozen once DTM may hold it. The state goes back only when DTM cannot have
received the request: an error before sending, or a refused connection. Runs over real HTTP
against the embedded coordinator (or ``--dtm-server``) and small socket servers.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from races import race
from web_servers import SilentDtm

from dtmcli import (
    DtmAttributeError,
    DtmClient,
    DtmConnectError,
    DtmInProgress,
    DtmInvalidInput,
    DtmTimeout,
    DtmTransportError,
    Msg,
    Retry,
    Saga,
    Tcc,
    local_gid,
    tcc_global_transaction,
)
from dtmcli._trans import TransBase
from dtmcli._transport import default_transport
from dtmcli.testing import BranchService, DtmFacade


@pytest.fixture
def silent() -> Iterator[SilentDtm]:
    server = SilentDtm()
    yield server
    server.close()


def quick_client(url: str) -> DtmClient:
    """A client that gives up fast and never retries (so every request is sent exactly once)."""
    return DtmClient(url, timeout=0.3, retry=Retry(retries=0))


def refused_url() -> str:
    """A DTM address whose port refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/dtmsvr"


def new_saga(dtm: Any, svc: BranchService, gid: str) -> Saga:
    return Saga(dtm, gid).add(svc.route("/lc/a"), svc.route("/lc/c"), {"n": 1})


# -- double submit -----------------------------------------------------------------------------


def test_second_saga_submit_is_refused_and_actions_run_once(dtm: DtmFacade, branch_service: BranchService) -> None:
    gid = local_gid()
    saga = new_saga(dtm.url, branch_service, gid)
    assert saga.state == "new"
    saga.submit()
    assert saga.state == "submitted"
    assert dtm.wait_status(gid).status == "succeed"
    for again in (saga.submit, lambda: saga.submit(recover=True)):
        with pytest.raises(DtmInvalidInput, match="already submitted"):
            again()
    assert len(branch_service.calls("/lc/a")) == 1


def test_concurrent_submits_send_one(dtm: DtmFacade, branch_service: BranchService) -> None:
    gid = local_gid()
    saga = new_saga(dtm.url, branch_service, gid)

    def submit() -> str:
        try:
            saga.submit()
        except DtmInvalidInput:
            return "refused"
        return "sent"

    outcomes = race(submit, threads=6, slow=[TransBase._run])
    assert sorted(outcomes) == ["refused"] * 5 + ["sent"]
    assert dtm.wait_status(gid).status == "succeed"
    assert len(branch_service.calls("/lc/a")) == 1


SAGA_CHANGES: list[tuple[str, Callable[[Saga], Any]]] = [
    ("add", lambda s: s.add("http://127.0.0.1:9/x", "", {})),
    ("add_branch_order", lambda s: s.add_branch_order(0, [])),
    ("enable_concurrent", lambda s: s.enable_concurrent()),
    ("concurrent attr", lambda s: setattr(s, "concurrent", True)),
    ("set_wait_result", lambda s: s.set_wait_result()),
    ("wait_result attr", lambda s: setattr(s, "wait_result", True)),
    ("retry_limit attr", lambda s: setattr(s, "retry_limit", 3)),
    ("branch_headers attr", lambda s: setattr(s, "branch_headers", {"X-A": "1"})),
    ("set_options", lambda s: s.set_options(timeout_to_fail=9)),
    ("options attr", lambda s: setattr(s, "options", type(s.options)(retry_interval=9))),
    ("options object attr", lambda s: setattr(s.options, "retry_limit", 3)),
    ("options object update", lambda s: s.options.update(retry_interval=9)),
    ("gid", lambda s: setattr(s, "gid", "other")),
]


@pytest.mark.parametrize("change", [c[1] for c in SAGA_CHANGES], ids=[c[0] for c in SAGA_CHANGES])
def test_saga_is_frozen_once_submitted(
    dtm: DtmFacade, branch_service: BranchService, change: Callable[[Saga], Any]
) -> None:
    saga = new_saga(dtm.url, branch_service, local_gid())
    saga.submit()
    before = saga.build_body()
    with pytest.raises(DtmInvalidInput, match="already submitted"):
        change(saga)
    assert saga.build_body() == before


def test_empty_saga_stays_new_and_can_be_completed(dtm: DtmFacade, branch_service: BranchService) -> None:
    gid = local_gid()
    saga = Saga(dtm.url, gid)
    with pytest.raises(DtmInvalidInput, match="at least one step"):
        saga.submit()
    assert saga.state == "new"
    saga.add(branch_service.route("/lc/a"), "", {}).submit()
    assert dtm.wait_status(gid).status == "succeed"


# -- steps, payloads and orders are read-only views ---------------------------------------------


def test_saga_steps_payloads_and_orders_are_read_only(dtm: DtmFacade, branch_service: BranchService) -> None:
    """Assigned or mutated lists used to skip add()'s checks: a NUL in a URL reached DTM."""
    a, c = branch_service.route("/lc/a"), branch_service.route("/lc/c")
    saga = Saga(dtm.url).enable_concurrent().add(a, c, {"n": 1}).add(a, "", {"n": 2}).add_branch_order(1, [0])
    before = saga.build_body()
    for name, value in (("steps", [{"action": "http://h/\x00a", "compensate": ""}]), ("payloads", ["{}"]),
                        ("orders", {}), ("state", "new")):
        with pytest.raises(DtmAttributeError, match=f"Saga.{name} is read-only"):
            setattr(saga, name, value)
    with pytest.raises(AttributeError):
        saga.steps.append({"action": "http://h/\x00a", "compensate": ""})  # type: ignore[attr-defined]
    with pytest.raises(TypeError):
        saga.steps[0]["action"] = "http://h/\x00a"  # type: ignore[index]
    with pytest.raises(TypeError):
        saga.orders[0] = (1,)  # type: ignore[index]
    with pytest.raises(AttributeError):
        saga.orders[1].append(2)  # type: ignore[attr-defined]
    assert saga.steps == ({"action": a, "compensate": c}, {"action": a, "compensate": ""})
    assert saga.payloads == ('{"n":1}', '{"n":2}') and saga.orders == {1: (0,)}
    assert saga.build_body() == before
    saga.submit()
    assert dtm.wait_status(saga.gid).status == "succeed"


def test_prepared_msg_actions_cannot_be_replaced(dtm: DtmFacade, branch_service: BranchService) -> None:
    msg = Msg(dtm.url).add(branch_service.route("/lc/m"), {"n": 1})
    msg.prepare(branch_service.route("/lc/qp"))
    for name in ("steps", "payloads"):
        with pytest.raises(DtmAttributeError, match=f"Msg.{name} is read-only"):
            setattr(msg, name, [])
    with pytest.raises(TypeError):
        msg.steps[0]["action"] = branch_service.route("/lc/evil")  # type: ignore[index]
    msg.submit()
    assert dtm.wait_status(msg.gid).status == "succeed"
    assert len(branch_service.calls("/lc/m")) == 1 and not branch_service.calls("/lc/evil")


# -- msg ----------------------------------------------------------------------------------------

MSG_CHANGES: list[tuple[str, Callable[[Msg], Any]]] = [
    ("add", lambda m: m.add("http://127.0.0.1:9/x", {})),
    ("add_topic", lambda m: m.add_topic("t", {})),
    ("set_delay", lambda m: m.set_delay(3)),
    ("delay attr", lambda m: setattr(m, "delay", 3)),
    ("query_prepared attr", lambda m: setattr(m, "query_prepared", "http://127.0.0.1:9/other")),
    ("prepare elsewhere", lambda m: m.prepare("http://127.0.0.1:9/other")),
    ("enable_concurrent", lambda m: m.enable_concurrent()),
    ("timeout_to_fail attr", lambda m: setattr(m, "timeout_to_fail", 3)),
    ("options object attr", lambda m: setattr(m.options, "timeout_to_fail", 3)),
    ("wait_result with another option", lambda m: m.set_options(wait_result=True, retry_interval=3)),
]


@pytest.mark.parametrize("change", [c[1] for c in MSG_CHANGES], ids=[c[0] for c in MSG_CHANGES])
def test_msg_is_frozen_once_prepared(
    dtm: DtmFacade, branch_service: BranchService, change: Callable[[Msg], Any]
) -> None:
    """DTM keeps the actions and options of the prepare: later changes would be silently ignored."""
    gid = local_gid()
    msg = Msg(dtm.url, gid).add(branch_service.route("/lc/m"), {"n": 1})
    msg.prepare(branch_service.route("/lc/qp"))
    before = msg.build_body()
    with pytest.raises(DtmInvalidInput, match="prepared"):
        change(msg)
    assert msg.build_body() == before
    msg.submit()
    assert dtm.wait_status(gid).status == "succeed"
    assert len(branch_service.calls("/lc/m")) == 1


def test_msg_lifecycle(dtm: DtmFacade, branch_service: BranchService) -> None:
    qp = branch_service.route("/lc/qp")
    done = Msg(dtm.url, local_gid()).add(branch_service.route("/lc/m"), {})
    done.prepare(qp)
    with pytest.raises(DtmInvalidInput, match="already prepared"):
        done.prepare(qp)
    done.submit()
    for again in (done.submit, done.abort, lambda: done.prepare(qp), lambda: done.prepare_and_submit(qp, print)):
        with pytest.raises(DtmInvalidInput, match="already submitted"):
            again()

    gid = local_gid()
    aborted = Msg(dtm.url, gid).add(branch_service.route("/lc/never"), {})
    aborted.prepare(qp)
    aborted.abort("changed my mind")
    assert aborted.state == "aborted" and dtm.wait_status(gid).status == "failed"
    for again in (aborted.submit, aborted.abort):
        with pytest.raises(DtmInvalidInput, match="already aborted"):
            again()
    assert not branch_service.calls("/lc/never")


# -- tcc / xa share the same machine -------------------------------------------------------------


def test_tcc_options_are_fixed_at_prepare_and_finish_is_once(dtm: DtmFacade) -> None:
    gid = local_gid()
    with tcc_global_transaction(dtm.url, gid, timeout_to_fail=30) as tcc:
        assert tcc.state == "prepared"
        for change in (
            lambda: setattr(tcc, "timeout_to_fail", 60),
            lambda: setattr(tcc.options, "retry_interval", 5),
            lambda: tcc.set_options(wait_result=True, branch_headers={"X-A": "1"}),
            tcc.prepare,
        ):
            with pytest.raises(DtmInvalidInput, match="already prepared"):
                change()
        assert tcc.options.timeout_to_fail == 30 and tcc.options.retry_interval is None
    assert tcc.state == "submitted" and dtm.wait_status(gid).status == "succeed"
    with pytest.raises(DtmInvalidInput, match="already submitted"):
        tcc.wait_result = True
    for again in (tcc.submit, tcc.abort):
        with pytest.raises(DtmInvalidInput, match="already submitted"):
            again()
    with pytest.raises(DtmInvalidInput, match="already submitted"):
        tcc.call_branch({}, "http://127.0.0.1:9/try", "", "")


def test_wait_result_may_be_set_between_prepare_and_submit(dtm: DtmFacade, branch_service: BranchService) -> None:
    """DTM reads wait_result from each submit request (protocol.md §1), so setting it in the body of
    the with-block makes that submit wait: a confirm failing once is reported, not hidden."""
    gid = local_gid()
    confirm = branch_service.route("/lc/wr/confirm", 500, 200)
    with pytest.raises(DtmInProgress), tcc_global_transaction(dtm.url, gid) as tcc:
        tcc.call_branch({}, branch_service.route("/lc/wr/try"), confirm, "")
        tcc.wait_result = True
    assert tcc.state == "submitted" and len(branch_service.calls("/lc/wr/confirm")) == 1


def test_nested_tcc_has_no_lifecycle_of_its_own() -> None:
    query = {"dtm": "http://127.0.0.1:9/api/dtmsvr", "gid": "G1", "branch_id": "01", "trans_type": "tcc", "op": "try"}
    child = Tcc.from_query(query)
    assert child.state == "nested"
    child.branch_headers = {"X-A": "1"}  # used on the try calls it makes
    for refused in (child.prepare, child.submit, lambda: setattr(child, "gid", "G2")):
        with pytest.raises(DtmInvalidInput, match="nested"):
            refused()


# -- the outcome of a request decides whether the state goes back ---------------------------------


def test_refused_submit_may_be_sent_again(dtm: DtmFacade, branch_service: BranchService) -> None:
    gid = local_gid()
    saga = new_saga(quick_client(refused_url()), branch_service, gid)
    with pytest.raises(DtmConnectError):
        saga.submit()
    assert saga.state == "new"  # nothing left the machine
    with pytest.raises(DtmConnectError):
        saga.submit(recover=True)  # the /query of the recovery is refused as well: still nothing sent
    assert saga.state == "new"
    saga.add(branch_service.route("/lc/b"), "", {})  # still editable: DTM has seen nothing
    saga.client = DtmClient(dtm.url)
    saga.submit()
    assert dtm.wait_status(gid).status == "succeed"
    assert len(branch_service.calls("/lc/a")) == 1 and len(branch_service.calls("/lc/b")) == 1


def test_timed_out_submit_is_never_sent_again(silent: SilentDtm, branch_service: BranchService) -> None:
    saga = new_saga(quick_client(silent.url), branch_service, local_gid())
    with pytest.raises(DtmTimeout):
        saga.submit()
    assert saga.state == "submitted"  # the request may still reach DTM
    for again in (saga.submit, lambda: saga.submit(recover=True)):
        with pytest.raises(DtmInvalidInput, match="already submitted"):
            again()
    assert silent.requests == ["/api/dtmsvr/submit"]


def test_timed_out_submit_with_recover_reports_unknown_and_stays_submitted(
    silent: SilentDtm, branch_service: BranchService
) -> None:
    saga = new_saga(quick_client(silent.url), branch_service, local_gid())
    with pytest.raises(DtmTransportError):
        saga.submit(recover=True)
    assert saga.state == "submitted"
    with pytest.raises(DtmInvalidInput):
        saga.submit()
    assert silent.requests.count("/api/dtmsvr/submit") == 1


def test_refused_abort_may_be_retried(dtm: DtmFacade) -> None:
    gid = local_gid()
    tcc = Tcc(dtm.url, gid)
    tcc.prepare()
    tcc.client = quick_client(refused_url())
    with pytest.raises(DtmConnectError):
        tcc.abort("first try")
    assert tcc.state == "prepared"
    tcc.client = DtmClient(dtm.url)
    tcc.abort("second try")
    trans = dtm.wait_status(gid)
    assert trans.status == "failed" and trans.rollback_reason == "second try"


def test_timed_out_abort_is_final(dtm: DtmFacade, silent: SilentDtm, branch_service: BranchService) -> None:
    msg = Msg(dtm.url, local_gid()).add(branch_service.route("/lc/m"), {})
    msg.prepare(branch_service.route("/lc/qp"))
    msg.client = quick_client(silent.url)
    with pytest.raises(DtmTimeout):
        msg.abort()
    assert msg.state == "aborted"
    for again in (msg.submit, msg.abort):
        with pytest.raises(DtmInvalidInput, match="already aborted"):
            again()
    assert silent.requests == ["/api/dtmsvr/abort"]


def test_failed_prepare_may_be_retried_but_freezes_the_content(
    dtm: DtmFacade, silent: SilentDtm, branch_service: BranchService
) -> None:
    """DTM's prepare is idempotent, so a failed one may be sent again; but a prepare that may have
    arrived fixed the actions on DTM, so they cannot change any more."""
    gid = local_gid()
    qp = branch_service.route("/lc/qp")
    msg = Msg(quick_client(silent.url), gid).add(branch_service.route("/lc/m"), {})
    with pytest.raises(DtmTimeout):
        msg.prepare(qp)
    assert msg.state == "new"
    with pytest.raises(DtmInvalidInput, match="may have reached DTM"):
        msg.add(branch_service.route("/lc/other"), {})
    with pytest.raises(DtmInvalidInput, match="may have reached DTM"):
        msg.prepare(branch_service.route("/lc/qp2"))
    msg.client = DtmClient(dtm.url)
    msg.prepare(qp)
    msg.submit()
    assert dtm.wait_status(gid).status == "succeed"


def test_refused_prepare_leaves_the_content_editable() -> None:
    msg = Msg(quick_client(refused_url()), local_gid()).add("http://127.0.0.1:9/a", {})
    with pytest.raises(DtmConnectError):
        msg.prepare("http://127.0.0.1:9/qp")
    assert msg.state == "new"
    msg.add("http://127.0.0.1:9/b", {})
    assert len(msg.build_body()["steps"]) == 2


def test_prepare_retried_after_a_timeout_freezes_the_content(silent: SilentDtm) -> None:
    """A retried prepare reports its last error: a refusal after a timed-out first attempt does not
    prove that nothing arrived."""
    # No total deadline, 0.3 s per attempt: the retry comes after a timed-out first attempt.
    retry = Retry(retries=1, sleep=lambda _: silent.close())
    client = DtmClient(silent.url, timeout=None, transport=default_transport(0.3), retry=retry)
    msg = Msg(client, local_gid()).add("http://127.0.0.1:9/a", {})
    with pytest.raises(DtmConnectError):
        msg.prepare("http://127.0.0.1:9/qp")
    assert silent.requests == ["/api/dtmsvr/prepare"] and msg.state == "new"
    with pytest.raises(DtmInvalidInput, match="may have reached DTM"):
        msg.add("http://127.0.0.1:9/b", {})


def test_a_reason_with_a_lone_surrogate_still_aborts(dtm: DtmFacade) -> None:
    """An error text holding a lone surrogate (a surrogateescape-decoded file name) must not make
    the abort itself fail and leave the transaction prepared until timeout_to_fail."""
    gid = local_gid()
    name = b"report-\xff.csv".decode("utf-8", "surrogateescape")
    with pytest.raises(FileNotFoundError), tcc_global_transaction(dtm.url, gid) as tcc:
        raise FileNotFoundError(f"no such file: {name}")
    assert tcc.state == "aborted"
    trans = dtm.wait_status(gid)
    assert trans.status == "failed" and trans.rollback_reason == "FileNotFoundError: no such file: report-\ufffd.csv"


@pytest.mark.parametrize("finish", [lambda t: t.submit(), lambda t: t.abort("x")], ids=["submit", "abort"])
def test_unprepared_tcc_cannot_be_finished(finish: Callable[[Tcc], None]) -> None:
    tcc = Tcc(quick_client(refused_url()), local_gid())  # a request would raise DtmConnectError
    with pytest.raises(DtmInvalidInput, match="not prepared"):
        finish(tcc)
    assert tcc.state == "new"
