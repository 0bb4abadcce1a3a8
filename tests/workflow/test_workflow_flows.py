"""The workflow core (dtmcli/_workflow.py) fed DTM's and the branches' answers by hand: no sockets.

The flows run on a scripted transport (wf_fakes.FakeDtm), or are stepped effect by effect.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any, Iterator, Optional

import pytest
from wf_fakes import BUSI, DTM, AsyncFakeDtm, FakeDtm, progress

import dtmcli.asyncio.workflow as aworkflow
from dtmcli import (
    BranchBarrier,
    DtmClient,
    DtmConnectError,
    DtmFailure,
    DtmInvalidInput,
    DtmOngoing,
    DtmServerError,
    workflow,
)
from dtmcli._flow import Call, Request
from dtmcli._workflow import WorkflowEntry
from dtmcli.asyncio import AsyncDtmClient
from dtmcli.asyncio import BranchBarrier as AsyncBranchBarrier

NAME = "wf_flows"


@pytest.fixture
def dtm() -> Iterator[FakeDtm]:
    fake = FakeDtm()
    workflow.init_http(DtmClient(DTM, transport=fake), "http://svc.test/resume")  # type: ignore[arg-type]
    yield fake
    workflow.unregister(NAME)


def prepared_with(*rows: dict[str, Any]) -> dict[str, Any]:
    return {"transaction": {"status": "prepared", "trans_type": "workflow"}, "progresses": list(rows)}


def two_http_steps(wf: workflow.Workflow, data: bytes) -> bytes:
    for i in (1, 2):
        wf.new_branch().on_rollback(lambda bb, i=i: wf.request("POST", f"{BUSI}/c{i}", json={"i": i}))
        wf.request("POST", f"{BUSI}/a{i}", json={"i": i})
    return b"ok"


# -- prepareWorkflow and what a finished gid answers -------------------------------------------------


def _entry(fn: Any) -> WorkflowEntry:
    from dtmcli._options import TransOptions

    return WorkflowEntry(NAME, fn, TransOptions.from_mapping({}))


def _step(flow: Any, answers: list[Any]) -> list[Any]:
    """Run ``flow`` by hand: answer each Request with the next of ``answers``; Calls are recorded, not run."""
    effects: list[Any] = []
    value: Any = None
    try:
        while True:
            effect = flow.send(value)
            effects.append(effect)
            value = answers.pop(0) if isinstance(effect, Request) else None
    except StopIteration as stop:
        effects.append(("returned", stop.value))
    return effects


def test_finished_succeed_gid_returns_the_stored_result_without_calling_anything() -> None:
    from dtmcli._protocol import Response

    wf = workflow.Workflow(_entry(two_http_steps), DtmClient(DTM), "http://svc.test/r", "G", b"in")
    answer = {"transaction": {"status": "succeed", "trans_type": "workflow",
                              "result": base64.b64encode(b"stored").decode()}, "progresses": []}
    effects = _step(wf._execute_flow(two_http_steps, wf), [Response(200, json.dumps(answer).encode())])
    assert [type(e).__name__ for e in effects[:-1]] == ["Request"]
    assert effects[0].url == f"{DTM}/prepareWorkflow"
    assert effects[-1] == ("returned", b"stored")


def test_prepared_gid_calls_the_function_as_an_effect() -> None:
    from dtmcli._protocol import Response

    wf = workflow.Workflow(_entry(two_http_steps), DtmClient(DTM), "http://svc.test/r", "G", b"in")
    flow = wf._execute_flow(two_http_steps, wf)
    assert isinstance(next(flow), Request)
    call = flow.send(Response(200, json.dumps(prepared_with()).encode()))
    assert isinstance(call, Call) and call.fn is two_http_steps and call.args == (wf, b"in")
    flow.close()


def test_finished_failed_gid_raises_the_rollback_reason(dtm: FakeDtm) -> None:
    dtm.prepare = {"transaction": {"status": "failed", "trans_type": "workflow", "rollback_reason": "no money FAILURE"},
                   "progresses": []}
    workflow.register(NAME, two_http_steps)
    with pytest.raises(DtmFailure) as info:
        workflow.execute(NAME, "G", b"in")
    assert info.value.message == "no money FAILURE"  # no second FAILURE
    assert dtm.paths() == ["POST prepareWorkflow"]


def test_prepare_body(dtm: FakeDtm) -> None:
    workflow.register(NAME, two_http_steps, timeout_to_fail=3, retry_interval=7, branch_headers={"X-T": "1"})
    workflow.execute(NAME, "G", b'{"a":1}')
    (body,) = dtm.bodies("prepareWorkflow")
    assert body == {
        "gid": "G", "trans_type": "workflow", "protocol": "http", "query_prepared": "http://svc.test/resume",
        "custom_data": '{"data":"eyJhIjoxfQ==","name":"wf_flows"}', "concurrent": False,
        "timeout_to_fail": 3, "retry_interval": 7, "branch_headers": {"X-T": "1"},
    }


# -- steps: executed and recorded, or replayed -------------------------------------------------------


def test_success_records_each_step_with_sync_and_submits(dtm: FakeDtm) -> None:
    dtm.branches[f"{BUSI}/a1"] = (200, b"one")
    workflow.register(NAME, two_http_steps)
    assert workflow.execute(NAME, "G", b"in") == b"ok"
    assert dtm.paths() == ["POST prepareWorkflow", "POST /a1", "POST registerBranch", "POST /a2",
                           "POST registerBranch", "POST submit"]
    regs = dtm.bodies("registerBranch")
    assert regs[0] == {"gid": "G", "trans_type": "workflow", "branch_id": "01", "op": "action",
                       "status": "succeed", "data": "one", "sync": "1"}
    assert [r["branch_id"] for r in regs] == ["01", "02"]
    query = dtm.calls[1][2]
    assert query == {"gid": "G", "trans_type": "workflow", "branch_id": "01", "op": "action"}
    assert dtm.bodies("submit") == [{"gid": "G", "trans_type": "workflow",
                                     "req_extra": {"status": "succeed", "rollback_reason": "", "result": "b2s="}}]


def test_recorded_step_is_replayed_not_executed(dtm: FakeDtm) -> None:
    dtm.prepare = prepared_with(progress("01", "action", "succeed", b"stored one"))
    seen: list[bytes] = []

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        seen.append(wf.new_branch().request("POST", f"{BUSI}/a1").content)
        seen.append(wf.new_branch().request("POST", f"{BUSI}/a2").content)
        return b""

    workflow.register(NAME, fn)
    workflow.execute(NAME, "G", b"in")
    assert seen == [b"stored one", b'{"dtm_result":"SUCCESS"}']
    assert "POST /a1" not in dtm.paths() and "POST /a2" in dtm.paths()
    assert [r["branch_id"] for r in dtm.bodies("registerBranch")] == ["02"]


def test_recorded_failure_replays_as_failure_and_rolls_back(dtm: FakeDtm) -> None:
    dtm.prepare = prepared_with(progress("01", "action", "succeed", b"x"), progress("02", "action", "failed", b"no"))
    workflow.register(NAME, two_http_steps)
    with pytest.raises(DtmFailure) as info:
        workflow.execute(NAME, "G", b"in")
    assert info.value.message == "no FAILURE"
    # only branch 01 is compensated (02's own action failed), nothing re-executed
    assert dtm.paths() == ["POST prepareWorkflow", "POST /c1", "POST registerBranch", "POST submit"]
    assert dtm.bodies("registerBranch")[0] == {"gid": "G", "trans_type": "workflow", "branch_id": "01",
                                               "op": "rollback", "status": "succeed", "data": "", "sync": "1"}
    assert dtm.bodies("submit")[0]["req_extra"] == {"status": "failed", "rollback_reason": "no FAILURE",
                                                    "result": ""}


def test_409_is_recorded_failed_with_the_body(dtm: FakeDtm) -> None:
    dtm.branches[f"{BUSI}/a2"] = (409, b'{"error":"poor"}')
    seen: list[BaseException] = []

    def fn(wf: workflow.Workflow, data: bytes) -> None:
        wf.new_branch().request("POST", f"{BUSI}/a1")
        try:
            wf.new_branch().request("POST", f"{BUSI}/a2")
        except DtmFailure as exc:
            seen.append(exc)
            raise

    workflow.register(NAME, fn)
    with pytest.raises(DtmFailure) as info:
        workflow.execute(NAME, "G", b"in")
    # what a replay of the failed record raises: the recorded body + " FAILURE"
    assert type(seen[0]) is DtmFailure and seen[0].message == '{"error":"poor"} FAILURE'
    assert (seen[0].branch_id, seen[0].op) == ("02", "action")
    assert info.value.message == '{"error":"poor"} FAILURE'
    regs = dtm.bodies("registerBranch")
    assert regs[1]["status"] == "failed" and regs[1]["data"] == '{"error":"poor"}'
    assert dtm.bodies("submit")[0]["req_extra"]["rollback_reason"] == info.value.message


@pytest.mark.parametrize("answer", [(200, b'{"dtm_result":"FAILURE"}'), (200, b'{"state":"ONGOING"}'),
                                    (201, b'{"id":7}'), (204, b"")])
def test_any_2xx_is_success_whatever_the_body(dtm: FakeDtm, answer: tuple[int, bytes]) -> None:
    # Go's HTTPResp2DtmError: only the status counts (Go takes only 200; 201/204 succeed here, documented)
    dtm.branches[f"{BUSI}/a1"] = answer
    workflow.register(NAME, two_http_steps)
    assert workflow.execute(NAME, "G", b"in") == b"ok"
    regs = dtm.bodies("registerBranch")
    assert regs[0]["status"] == "succeed" and regs[0]["data"] == answer[1].decode()
    assert dtm.bodies("submit")[0]["req_extra"]["status"] == "succeed"


@pytest.mark.parametrize(
    ("answer", "error"),
    [((500, b"busy"), DtmServerError), ((425, b"later"), DtmOngoing), ((404, b"FAILURE"), DtmServerError),
     ((302, b""), DtmServerError)],
)
def test_non_final_answers_are_not_recorded_and_nothing_is_submitted(
    dtm: FakeDtm, answer: tuple[int, bytes], error: type
) -> None:
    dtm.branches[f"{BUSI}/a2"] = answer
    workflow.register(NAME, two_http_steps)
    with pytest.raises(error):
        workflow.execute(NAME, "G", b"in")
    assert dtm.paths() == ["POST prepareWorkflow", "POST /a1", "POST registerBranch", "POST /a2"]


def test_connection_error_is_not_recorded(dtm: FakeDtm) -> None:
    def refuse() -> Any:
        raise DtmConnectError("refused")

    dtm.branches[f"{BUSI}/a1"] = refuse
    workflow.register(NAME, two_http_steps)
    with pytest.raises(DtmConnectError):
        workflow.execute(NAME, "G", b"in")
    assert dtm.paths() == ["POST prepareWorkflow", "POST /a1"]


def test_registerbranch_refused_is_not_a_business_failure(dtm: FakeDtm) -> None:
    from dtmcli._protocol import Response

    original = dtm._answer

    def answer(method: str, url: str, params: Any, body: Optional[bytes]) -> Response:
        if url.endswith("/registerBranch"):
            dtm.calls.append((method, url, None, json.loads(body or b"{}")))
            return Response(409, b'{"dtm_result":"FAILURE","message":"not prepared"}')
        return original(method, url, params, body)

    dtm._answer = answer  # type: ignore[method-assign]
    workflow.register(NAME, two_http_steps)
    with pytest.raises(DtmServerError, match="registerBranch refused"):
        workflow.execute(NAME, "G", b"in")
    assert "POST /c1" not in dtm.paths() and "POST submit" not in dtm.paths()


# -- local steps ------------------------------------------------------------------------------------


def test_do_records_bytes_and_passes_a_barrier(dtm: FakeDtm) -> None:
    barriers: list[BranchBarrier] = []

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        first = wf.new_branch().do(lambda bb: barriers.append(bb) or b"local")  # type: ignore[func-returns-value]
        none = wf.new_branch().do(lambda bb: None)
        return first + b"|" + none

    workflow.register(NAME, fn)
    assert workflow.execute(NAME, "G", b"in") == b"local|"
    (bb,) = barriers
    assert isinstance(bb, BranchBarrier)
    assert (bb.gid, bb.trans_type, bb.branch_id, bb.op) == ("G", "workflow", "01", "action")
    assert [(r["data"], r["status"]) for r in dtm.bodies("registerBranch")] == [("local", "succeed"), ("", "succeed")]


def test_do_failure_records_message_or_step_data(dtm: FakeDtm) -> None:
    def fn(wf: workflow.Workflow, data: bytes) -> None:
        wf.new_branch().on_rollback(lambda bb: None).do(lambda bb: b"ok")

        def fail(bb: Any) -> bytes:
            raise (workflow.StepFailure("out of stock", data=b"stock said no") if data == b"data"
                   else DtmFailure("out of stock"))

        wf.new_branch().do(fail)

    workflow.register(NAME, fn)
    for data, recorded in ((b"data", "stock said no"), (b"plain", "out of stock")):
        dtm.calls.clear()
        with pytest.raises(DtmFailure) as info:
            workflow.execute(NAME, "G", data)
        # the replay's error (recorded text + FAILURE), chained from the step's own error
        assert type(info.value) is DtmFailure and info.value.message == f"{recorded} FAILURE"
        assert dtm.bodies("submit")[0]["req_extra"]["rollback_reason"] == f"{recorded} FAILURE"
        cause = info.value.__cause__
        assert type(cause) is DtmFailure and cause.message == f"{recorded} FAILURE"
        assert isinstance(cause.__cause__, DtmFailure) and cause.__cause__.message == "out of stock"
        assert [(r["branch_id"], r["op"], r["status"], r["data"]) for r in dtm.bodies("registerBranch")] == [
            ("01", "action", "succeed", "ok"), ("02", "action", "failed", recorded), ("01", "rollback", "succeed", "")]


def test_do_other_error_is_not_recorded(dtm: FakeDtm) -> None:
    def fn(wf: workflow.Workflow, data: bytes) -> None:
        wf.new_branch().do(lambda bb: 1 / 0)  # type: ignore[arg-type,return-value]

    workflow.register(NAME, fn)
    with pytest.raises(ZeroDivisionError):
        workflow.execute(NAME, "G", b"in")
    assert dtm.paths() == ["POST prepareWorkflow"]


def test_failure_raised_by_the_function_itself_rolls_back(dtm: FakeDtm) -> None:
    def fn(wf: workflow.Workflow, data: bytes) -> None:
        wf.new_branch().on_rollback(lambda bb: None).do(lambda bb: b"1")
        raise DtmFailure("changed my mind")

    workflow.register(NAME, fn)
    with pytest.raises(DtmFailure, match="changed my mind FAILURE"):
        workflow.execute(NAME, "G", b"in")
    assert dtm.bodies("registerBranch")[-1]["op"] == "rollback"


# -- phase 2 ----------------------------------------------------------------------------------------


def test_compensate_error_branch_rolls_back_in_reverse_order(dtm: FakeDtm) -> None:
    dtm.branches[f"{BUSI}/a2"] = (409, b"no")
    workflow.register(NAME, two_http_steps, compensate_error_branch=True)
    with pytest.raises(DtmFailure):
        workflow.execute(NAME, "G", b"in")
    assert [p for p in dtm.paths() if p.startswith("POST /c")] == ["POST /c2", "POST /c1"]
    assert [dtm.calls[i][2]["op"] for i, p in enumerate(dtm.paths()) if p.startswith("POST /c")] == ["rollback"] * 2


def test_on_commit_in_reverse_order_and_replayed_commit_skipped(dtm: FakeDtm) -> None:
    order: list[str] = []

    def fn(wf: workflow.Workflow, data: bytes) -> None:
        for i in (1, 2, 3):
            wf.new_branch().on_commit(lambda bb, i=i: order.append(f"{bb.branch_id}-{bb.op}")).do(lambda bb: b"")

    dtm.prepare = prepared_with(progress("02", "commit", "succeed"))
    workflow.register(NAME, fn)
    workflow.execute(NAME, "G", b"in")
    assert order == ["03-commit", "01-commit"]
    recorded = [(r["branch_id"], r["op"]) for r in dtm.bodies("registerBranch")]
    assert recorded[-2:] == [("03", "commit"), ("01", "commit")]


def test_phase2_failure_is_a_typed_error_never_a_silent_commit(dtm: FakeDtm) -> None:
    def bad_commit(bb: Any) -> None:
        raise DtmFailure("cannot confirm")

    def fn(wf: workflow.Workflow, data: bytes) -> None:
        wf.new_branch().on_commit(bad_commit).do(lambda bb: b"")

    workflow.register(NAME, fn)
    with pytest.raises(workflow.WorkflowPhase2Error) as info:
        workflow.execute(NAME, "G", b"in")
    assert not isinstance(info.value, DtmFailure) and isinstance(info.value.__cause__, DtmFailure)
    assert "POST submit" not in dtm.paths()
    assert [r["op"] for r in dtm.bodies("registerBranch")] == ["action"]  # the commit is not recorded


def test_phase2_http_409_inside_a_callback_is_a_phase2_error(dtm: FakeDtm) -> None:
    dtm.branches[f"{BUSI}/c1"] = (409, b"no")
    dtm.branches[f"{BUSI}/a2"] = (409, b"no")
    workflow.register(NAME, two_http_steps)
    with pytest.raises(workflow.WorkflowPhase2Error):
        workflow.execute(NAME, "G", b"in")
    assert "POST submit" not in dtm.paths()


def test_phase2_other_error_leaves_the_workflow_prepared(dtm: FakeDtm) -> None:
    def fn(wf: workflow.Workflow, data: bytes) -> None:
        wf.new_branch().on_commit(lambda bb: 1 / 0).do(lambda bb: b"")

    workflow.register(NAME, fn)
    with pytest.raises(ZeroDivisionError):
        workflow.execute(NAME, "G", b"in")
    assert "POST submit" not in dtm.paths()


def test_on_finish_is_a_recorded_phase2_callback_both_ways(dtm: FakeDtm) -> None:
    # Go's OnFinish(fn(bb, isRollback)): the branch's on_commit and on_rollback at once
    seen: list[Any] = []

    def fn(wf: workflow.Workflow, data: bytes) -> None:
        wf.new_branch().on_finish(lambda bb, rb: seen.append((bb.branch_id, bb.op, rb))).do(lambda bb: b"1")
        if data == b"fail":
            raise DtmFailure("no")

    workflow.register(NAME, fn)
    assert workflow.execute(NAME, "G", b"ok") == b""
    assert seen == [("01", "commit", False)]
    assert [(r["branch_id"], r["op"]) for r in dtm.bodies("registerBranch")] == [("01", "action"), ("01", "commit")]
    dtm.calls.clear()
    with pytest.raises(DtmFailure):
        workflow.execute(NAME, "G", b"fail")
    assert seen[1] == ("01", "rollback", True)
    assert [(r["branch_id"], r["op"]) for r in dtm.bodies("registerBranch")] == [("01", "action"), ("01", "rollback")]
    # replayed: recorded callbacks do not run again
    dtm.prepare = prepared_with(progress("01", "action", "succeed", b"1"), progress("01", "commit", "succeed"))
    dtm.calls.clear()
    assert workflow.execute(NAME, "G", b"ok") == b"" and len(seen) == 2


def test_on_finish_needs_a_free_branch(dtm: FakeDtm) -> None:
    def fn(wf: workflow.Workflow, data: bytes) -> None:
        if data == b"none":
            wf.on_finish(lambda bb, rb: None)
        else:
            wf.new_branch().on_commit(lambda bb: None).on_finish(lambda bb, rb: None)

    workflow.register(NAME, fn)
    with pytest.raises(DtmInvalidInput, match="new_branch"):
        workflow.execute(NAME, "G", b"none")
    with pytest.raises(DtmInvalidInput, match="already has an on_commit/on_rollback"):
        workflow.execute(NAME, "G", b"one")
    assert "POST submit" not in dtm.paths()


# -- branch bookkeeping ---------------------------------------------------------------------------


def test_branch_ids_and_misuse(dtm: FakeDtm) -> None:
    ids: list[str] = []

    def fn(wf: workflow.Workflow, data: bytes) -> None:
        with pytest.raises(DtmInvalidInput, match="new_branch"):
            wf.do(lambda bb: b"")
        with pytest.raises(DtmInvalidInput, match="new_branch"):
            wf.on_rollback(lambda bb: None)
        for _ in range(11):
            ids.append(wf.new_branch().branch_id)
        wf.do(lambda bb: b"")
        with pytest.raises(DtmInvalidInput, match="already has its step"):
            wf.do(lambda bb: b"")
        wf.on_rollback(lambda bb: None)
        with pytest.raises(DtmInvalidInput, match="already has an on_rollback"):
            wf.on_rollback(lambda bb: None)

        def in_phase2(bb: Any) -> None:
            with pytest.raises(DtmInvalidInput):
                wf.new_branch()
            with pytest.raises(DtmInvalidInput):
                wf.do(lambda bb: b"")
            ids.append(f"commit of {bb.branch_id}")

        wf.on_commit(in_phase2)

    workflow.register(NAME, fn)
    workflow.execute(NAME, "G", b"in")
    assert ids == [f"{i:02d}" for i in range(1, 12)] + ["commit of 11"]


def test_at_most_99_branches(dtm: FakeDtm) -> None:
    def fn(wf: workflow.Workflow, data: bytes) -> None:
        for _ in range(99):
            wf.new_branch()
        with pytest.raises(DtmInvalidInput, match="99"):
            wf.new_branch()

    workflow.register(NAME, fn)
    workflow.execute(NAME, "G", b"in")


def test_do_xa_business_record_without_action_is_failure(dtm: FakeDtm, monkeypatch: pytest.MonkeyPatch) -> None:
    dtm.prepare = prepared_with(progress("01", "business", "succeed"))
    ran: list[Any] = []
    monkeypatch.setattr(workflow.Workflow, "_xa_local", lambda *a: ran.append("local"))
    monkeypatch.setattr(workflow.Workflow, "_xa_phase2", lambda self, conn, bb, *a: ran.append((conn, bb.op)))

    def fn(wf: workflow.Workflow, data: bytes) -> None:
        wf.new_branch().do_xa("CONN", lambda conn: b"never")

    workflow.register(NAME, fn)
    with pytest.raises(DtmFailure, match="not resumable"):
        workflow.execute(NAME, "G", b"in")
    assert ran == [("CONN", "rollback")]  # no local transaction; the prepared one (if any) rolled back
    assert dtm.bodies("submit")[0]["req_extra"]["status"] == "failed"
    assert [r["op"] for r in dtm.bodies("registerBranch")] == ["rollback"]


def test_do_xa_records_business_inside_and_commits_in_phase2(dtm: FakeDtm, monkeypatch: pytest.MonkeyPatch) -> None:
    from dtmcli import _flow

    ran: list[Any] = []

    def local(self: Any, conn: Any, info: Any, fn: Any, register: Any, table: str, dialect: Any) -> Any:
        ran.append((conn, info.gid, info.branch_id, info.op))
        result = fn(conn)
        _flow.run(register, self._client)  # the business record goes out before the prepare
        return result

    monkeypatch.setattr(workflow.Workflow, "_xa_local", local)
    monkeypatch.setattr(workflow.Workflow, "_xa_phase2", lambda self, conn, bb, *a: ran.append((conn, bb.op)))

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        return wf.new_branch().do_xa("CONN", lambda conn: b"xa done")

    workflow.register(NAME, fn)
    assert workflow.execute(NAME, "G", b"in") == b"xa done"
    assert ran == [("CONN", "G", "01", "action"), ("CONN", "commit")]
    assert [(r["op"], r["data"]) for r in dtm.bodies("registerBranch")] == [
        ("business", ""), ("action", "xa done"), ("commit", "")]


# -- async: same core, awaited ----------------------------------------------------------------------


def test_async_flavour_and_its_barrier() -> None:
    fake = AsyncFakeDtm()
    fake.prepare = prepared_with(progress("01", "action", "succeed", b"replayed"))
    got: list[Any] = []

    async def fn(wf: aworkflow.Workflow, data: bytes) -> bytes:
        async def step(bb: Any) -> bytes:
            got.append(bb)
            return b"two"

        got.append(await wf.new_branch().request("GET", f"{BUSI}/a1"))
        got.append(await wf.new_branch().do(step))
        return b"done"

    aworkflow.register(NAME, fn)
    try:
        aworkflow.init_http(AsyncDtmClient(DTM, transport=fake), "http://svc.test/r")  # type: ignore[arg-type]
        assert asyncio.run(aworkflow.execute(NAME, "G", b"in")) == b"done"
    finally:
        aworkflow.unregister(NAME)
    assert got[0].content == b"replayed"
    assert isinstance(got[1], AsyncBranchBarrier) and got[1].branch_id == "02" and got[2] == b"two"
    assert fake.paths() == ["POST prepareWorkflow", "POST registerBranch", "POST submit"]


def test_async_cancel_leaves_the_workflow_prepared() -> None:
    fake = AsyncFakeDtm()
    started = asyncio.Event()

    async def fn(wf: aworkflow.Workflow, data: bytes) -> None:
        await wf.new_branch().do(lambda bb: b"one")

        async def slow(bb: Any) -> bytes:
            started.set()
            await asyncio.sleep(60)
            return b"never"

        await wf.new_branch().do(slow)

    async def main() -> None:
        aworkflow.init_http(AsyncDtmClient(DTM, transport=fake), "http://svc.test/r")  # type: ignore[arg-type]
        task = asyncio.ensure_future(aworkflow.execute(NAME, "G", b"in"))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    aworkflow.register(NAME, fn)
    try:
        asyncio.run(main())
    finally:
        aworkflow.unregister(NAME)
    assert fake.paths() == ["POST prepareWorkflow", "POST registerBranch"]  # step 01 only; no submit


def test_sync_workflow_refuses_async_callbacks(dtm: FakeDtm) -> None:
    async def later(bb: Any) -> None:
        pass

    def fn(wf: workflow.Workflow, data: bytes) -> None:
        with pytest.raises(DtmInvalidInput, match="async"):
            wf.new_branch().on_rollback(later)
        with pytest.raises(DtmInvalidInput, match="awaitable"):
            wf.do(lambda bb: later(bb))  # type: ignore[arg-type,return-value]

    workflow.register(NAME, fn)
    workflow.execute(NAME, "G", b"in")
    assert dtm.bodies("registerBranch") == []


def test_concurrent_executions_each_get_their_own_workflow(dtm: FakeDtm) -> None:
    import threading

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        ids = []
        for _ in range(3):
            wf.new_branch().do(lambda bb: bb.gid.encode())
            ids.append(wf.branch_id)
        return ",".join(ids).encode() + b"@" + wf.gid.encode()

    workflow.register(NAME, fn)
    results: dict[str, bytes] = {}
    barrier = threading.Barrier(8)

    def run(i: int) -> None:
        barrier.wait()
        results[f"G{i}"] = workflow.execute(NAME, f"G{i}", b"in")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {f"G{i}": f"01,02,03@G{i}".encode() for i in range(8)}
    per_gid: dict[str, list[str]] = {}
    for body in dtm.bodies("registerBranch"):
        per_gid.setdefault(body["gid"], []).append(body["branch_id"] + "=" + body["data"])
    assert per_gid == {f"G{i}": [f"0{n}=G{i}" for n in (1, 2, 3)] for i in range(8)}
