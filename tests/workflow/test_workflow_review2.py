"""The guards added after the second review of workflow mode (issue 12; /tmp/notes/review-wf2.md, NEW-1..7).

Scripted transport (wf_fakes) where DTM's answer has to be forced, the ``dtm`` coordinator fixture (embedded,
or a real DTM with ``--dtm-server``) where DTM's own answers matter: a finished gid answers only its own
workflow and input; the outcome another execution stored is reported only when it agrees with what this
execution did (else WorkflowConflict); a step never awaited on the rollback path does not block the
rollback; a FAILURE body of any bytes and size is recorded; one running set for both registries; the
resume token is never logged; after DTM refused a record nothing more runs in the execution.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import warnings
from typing import Any, Iterator, Optional

import pytest
from wf_fakes import BUSI, DTM, AsyncFakeDtm, FakeDtm, custom, installed, prepared, progress

import dtmcli.asyncio.workflow as aworkflow
from dtmcli import DtmFailure, DtmInvalidInput, DtmOngoing, DtmServerError, Msg, local_gid, workflow
from dtmcli._protocol import Response
from dtmcli._workflow import MAX_STEP_DATA
from dtmcli.asyncio import AsyncDtmClient
from dtmcli.client import redact_url
from dtmcli.testing import BranchService, DtmFacade
from dtmcli.workflow import WorkflowConflict

NAME = "wf_review2"
CALLBACK = "http://svc.test/resume"


@pytest.fixture
def fake() -> Iterator[FakeDtm]:
    with installed(NAME, CALLBACK) as dtm:
        yield dtm


def finished(status: str, **trans: Any) -> dict[str, Any]:
    stored = {"result": base64.b64encode(b"theirs").decode()} if status == "succeed" else \
        {"rollback_reason": "theirs FAILURE"}
    return {"transaction": {"status": status, "trans_type": "workflow", **stored, **trans}, "progresses": []}


# -- NEW-1: a finished gid answers only its own workflow and input ----------------------------------


@pytest.mark.parametrize("status", ["succeed", "failed"])
@pytest.mark.parametrize(
    ("trans", "match"),
    [
        ({"trans_type": "msg"}, "type 'msg'"),
        ({"custom_data": custom("other", b"in")}, "another workflow or input"),
        ({"custom_data": custom(NAME, b"other input")}, "another workflow or input"),
    ],
)
def test_a_finished_gid_of_another_type_name_or_input_answers_nothing(
    fake: FakeDtm, status: str, trans: dict[str, Any], match: str
) -> None:
    fake.prepare = finished(status, **trans)
    ran: list[bytes] = []
    workflow.register(NAME, lambda wf, data: ran.append(data))
    with pytest.raises(DtmInvalidInput, match=match) as info:
        workflow.execute(NAME, "G", b"in")
    assert "theirs" not in str(info.value)  # neither the stored result nor the rollback reason leaks
    assert ran == [] and fake.paths() == ["POST prepareWorkflow"]


def test_a_finished_gid_of_this_workflow_and_input_answers_its_outcome(fake: FakeDtm) -> None:
    fake.prepare = finished("succeed", custom_data=custom(NAME, b"in"))
    workflow.register(NAME, lambda wf, data: pytest.fail("nothing runs"))
    assert workflow.execute(NAME, "G", b"in") == b"theirs"
    fake.prepare = finished("failed", custom_data=custom(NAME, b"in"))
    with pytest.raises(DtmFailure, match="theirs FAILURE"):
        workflow.execute(NAME, "G", b"in")


def test_a_workflow_on_a_finished_msg_gid_is_refused(dtm: DtmFacade) -> None:
    gid = local_gid()
    with BranchService() as busi:
        Msg(dtm.url, gid).add(busi.url("/msg-action"), {"amount": 5}).submit()
        assert dtm.wait_status(gid, ["succeed"]).status == "succeed"  # type: ignore[union-attr]
        workflow.init_http(dtm.url, "http://127.0.0.1:9/unused")
        workflow.register(NAME, lambda wf, data: wf.new_branch().request("POST", busi.url("/step")) and b"")
        try:
            with pytest.raises(DtmInvalidInput, match="type 'msg'"):
                workflow.execute(NAME, gid, b"{}")
        finally:
            workflow.unregister(NAME)
        assert busi.calls("/step") == []


# -- NEW-2: the stored outcome only when it agrees with what this execution did -------------------


def _compensating(fail: bool, compensated: list[str]) -> Any:
    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        wf.new_branch().on_rollback(lambda bb: compensated.append("refund")).on_commit(
            lambda bb: compensated.append("commit"))
        wf.do(lambda bb: b"charged")
        if fail:
            wf.new_branch().do(lambda bb: (_ for _ in ()).throw(DtmFailure("stock check said no")))
        return b"mine"

    return fn


@pytest.mark.parametrize("refused", ["submit", "registerBranch"])
def test_this_run_compensated_but_the_gid_succeeded_is_a_conflict(
    fake: FakeDtm, caplog: pytest.LogCaptureFixture, refused: str
) -> None:
    ran: list[str] = []
    workflow.register(NAME, _compensating(True, ran))
    if refused == "submit":
        fake.refuse("submit", 500, b'{"message":"storage: NotFound"}', finished("succeed"))
    else:  # the record of the rollback callback is refused (the action records pass)
        original = fake._answer

        def answer(method: str, url: str, params: Any, body: Optional[bytes]) -> Response:
            if url.endswith("/registerBranch") and json.loads(body or b"{}")["op"] == "rollback":
                fake.calls.append((method, url, None, json.loads(body or b"{}")))
                fake.prepare = finished("succeed")
                return Response(409, b'{"dtm_result":"FAILURE","message":"not prepared"}')
            return original(method, url, params, body)

        fake._answer = answer  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR, "dtmcli"), pytest.raises(WorkflowConflict) as info:
        workflow.execute(NAME, "G", b"in")
    assert ran == ["refund"]  # never "success" after this run compensated
    err = info.value
    assert (err.status, err.phase, err.callbacks) == ("succeed", "rollback", ("01",))
    assert "finished the gid as succeed after this one ran 1 rollback callback" in err.message
    assert [r.levelname for r in caplog.records if "finished the gid as" in r.getMessage()] == ["ERROR"]


def test_this_run_committed_but_the_gid_failed_is_a_conflict(fake: FakeDtm) -> None:
    ran: list[str] = []
    workflow.register(NAME, _compensating(False, ran))
    fake.refuse("submit", 500, b'{"message":"storage: NotFound"}', finished("failed"))
    with pytest.raises(WorkflowConflict, match="as failed after this one ran 1 commit callback"):
        workflow.execute(NAME, "G", b"in")
    assert ran == ["commit"]


@pytest.mark.parametrize(("fail", "stored"), [(True, "failed"), (False, "succeed")])
def test_an_agreeing_outcome_is_returned(fake: FakeDtm, fail: bool, stored: str) -> None:
    ran: list[str] = []
    workflow.register(NAME, _compensating(fail, ran))
    fake.refuse("submit", 500, b'{"message":"storage: NotFound"}', finished(stored))
    if fail:
        with pytest.raises(DtmFailure, match="theirs FAILURE"):
            workflow.execute(NAME, "G", b"in")
    else:
        assert workflow.execute(NAME, "G", b"in") == b"theirs"
    assert ran == ["refund" if fail else "commit"]


@pytest.mark.parametrize("stored", ["succeed", "failed"])
def test_no_callback_run_takes_the_stored_outcome(fake: FakeDtm, stored: str) -> None:
    """This run decided rollback but ran no callback (none registered): nothing contradicts either outcome."""
    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        wf.new_branch().do(lambda bb: (_ for _ in ()).throw(DtmFailure("no")))
        return b""

    workflow.register(NAME, fn)
    fake.refuse("submit", 500, b'{"message":"storage: NotFound"}', finished(stored))
    if stored == "succeed":
        assert workflow.execute(NAME, "G", b"in") == b"theirs"
    else:
        with pytest.raises(DtmFailure, match="theirs FAILURE"):
            workflow.execute(NAME, "G", b"in")


# -- NEW-3: a step never awaited does not block a rollback ------------------------------------------


def _run_async(fn: Any, fake: AsyncFakeDtm) -> Any:
    async def main() -> Any:
        async with AsyncDtmClient(DTM, transport=fake) as client:  # type: ignore[arg-type]
            aworkflow.init_http(client, CALLBACK)
            try:
                return await aworkflow.execute(NAME, "G", b"in")
            except DtmFailure as exc:
                await asyncio.sleep(0.01)  # a Task created by the function gets its turn
                return exc

    aworkflow.register(NAME, fn)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "coroutine was never awaited": it is closed
            return asyncio.run(main())
    finally:
        aworkflow.unregister(NAME)


@pytest.mark.parametrize("as_task", [False, True])
def test_a_step_never_awaited_before_a_dtmfailure_rolls_back(caplog: pytest.LogCaptureFixture,
                                                                as_task: bool) -> None:
    fake = AsyncFakeDtm()
    released: list[str] = []
    loop_errors: list[Any] = []
    tasks: list[Any] = []

    async def fn(wf: aworkflow.Workflow, data: bytes) -> bytes:
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: loop_errors.append(ctx))
        await wf.new_branch().on_rollback(lambda bb: released.append("stock")).request("POST", f"{BUSI}/reserve")
        charge = wf.new_branch().request("POST", f"{BUSI}/charge")
        if as_task:
            tasks.append(asyncio.create_task(charge))
        raise DtmFailure("over the limit")

    with caplog.at_level(logging.WARNING, "dtmcli"):
        outcome = _run_async(fn, fake)
    assert isinstance(outcome, DtmFailure) and outcome.message == "over the limit FAILURE"
    assert released == ["stock"] and "POST /charge" not in fake.paths()
    assert [b["req_extra"]["status"] for b in fake.bodies("submit")] == ["failed"]
    warned = [r.getMessage() for r in caplog.records if "never awaited" in r.getMessage()]
    assert len(warned) == 1 and "request('POST', 'http://busi.test/charge') of branch 02" in warned[0]
    assert loop_errors == []  # a cancelled Task, not "Task exception was never retrieved"
    assert [t.cancelled() for t in tasks] == ([True] if as_task else [])


def test_a_task_never_awaited_on_the_success_path_is_refused() -> None:
    fake = AsyncFakeDtm()
    tasks: list[Any] = []

    async def fn(wf: aworkflow.Workflow, data: bytes) -> bytes:
        tasks.append(asyncio.create_task(wf.new_branch().do(lambda bb: b"late")))
        return b"ok"

    async def main() -> None:
        async with AsyncDtmClient(DTM, transport=fake) as client:  # type: ignore[arg-type]
            aworkflow.init_http(client, CALLBACK)
            with pytest.raises(DtmInvalidInput, match=r"never awaited.*do\(\) of branch 01"):
                await aworkflow.execute(NAME, "G", b"in")
            await asyncio.sleep(0.01)
            assert tasks[0].cancelled()  # cancelled before it started: the step never ran

    aworkflow.register(NAME, fn)
    try:
        asyncio.run(main())
    finally:
        aworkflow.unregister(NAME)
    assert fake.bodies("registerBranch") == [] and fake.bodies("submit") == []


# -- NEW-4: a FAILURE body of any bytes and size is recorded ----------------------------------------


@pytest.mark.parametrize("body", [b"Konto gesperrt: \xdcberziehung", b"<html>" + b"x" * 70_000 + b"</html>"])
def test_a_409_body_of_any_bytes_or_size_is_recorded_and_rolls_back(fake: FakeDtm, body: bytes) -> None:
    fake.branches[f"{BUSI}/charge"] = (409, body)
    released: list[str] = []

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        wf.new_branch().on_rollback(lambda bb: released.append("x")).do(lambda bb: b"reserved")
        wf.new_branch().request("POST", f"{BUSI}/charge")
        return b"ok"

    workflow.register(NAME, fn)
    with pytest.raises(DtmFailure) as fresh:
        workflow.execute(NAME, "G", b"in")
    recorded = [b for b in fake.bodies("registerBranch") if b["status"] == "failed"]
    assert len(recorded) == 1 and len(recorded[0]["data"].encode()) <= MAX_STEP_DATA
    text = recorded[0]["data"]
    if len(body) > MAX_STEP_DATA:
        assert text.startswith("<html>xxx") and text.endswith("bytes in all; clipped to fit DTM's store]")
    else:
        assert text == "Konto gesperrt: \ufffdberziehung"
    assert released == ["x"] and [b["req_extra"]["status"] for b in fake.bodies("submit")] == ["failed"]
    # a resume replays the recorded failure: the same error, fresh and replayed
    fake.calls.clear()
    fake.prepare = prepared(progress("01", "action", "succeed", b"reserved"),
                            progress("02", "action", "failed", text.encode()))
    with pytest.raises(DtmFailure) as replayed:
        workflow.execute(NAME, "G", b"in")
    assert replayed.value.message == fresh.value.message and "POST /charge" not in fake.paths()


def test_a_step_failure_with_binary_data_is_recorded_as_text(fake: FakeDtm) -> None:
    from dtmcli.workflow import StepFailure

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        wf.new_branch().do(lambda bb: (_ for _ in ()).throw(StepFailure("no", data=b"\xff\xfe bin")))
        return b""

    workflow.register(NAME, fn)
    with pytest.raises(DtmFailure, match="\ufffd\ufffd bin FAILURE"):
        workflow.execute(NAME, "G", b"in")
    assert [b["data"] for b in fake.bodies("registerBranch")] == ["\ufffd\ufffd bin"]


# -- NEW-5: one running set for the sync and the asyncio registry -----------------------------------


def test_one_name_in_both_registries_runs_a_gid_once_at_a_time(fake: FakeDtm) -> None:
    afake = AsyncFakeDtm()
    seen: list[Any] = []

    async def other() -> None:
        async with AsyncDtmClient(DTM, transport=afake) as client:  # type: ignore[arg-type]
            aworkflow.init_http(client, CALLBACK)
            with pytest.raises(DtmOngoing, match="already running in this process"):
                await aworkflow.execute(NAME, "G", b"in")
            seen.append("ongoing")

    async def afn(wf: aworkflow.Workflow, data: bytes) -> bytes:
        seen.append("async ran")
        return b""

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        wf.new_branch().do(lambda bb: asyncio.run(other()) or b"")
        return b"ok"

    workflow.register(NAME, fn)
    aworkflow.register(NAME, afn)
    try:
        assert workflow.execute(NAME, "G", b"in") == b"ok"
    finally:
        aworkflow.unregister(NAME)
    assert seen == ["ongoing"] and afake.calls == []


# -- NEW-6: the resume token is never logged -------------------------------------------------------


def test_redact_url() -> None:
    assert redact_url("http://s/r?token=S3CRET") == "http://s/r?token=***"
    assert redact_url("http://s/r?a=1&token=S3CRET&b=2#f") == "http://s/r?a=1&token=***&b=2#f"
    assert redact_url("http://s/r?mytoken=x") == "http://s/r?mytoken=x"


def test_the_token_is_not_logged(dtm: DtmFacade, caplog: pytest.LogCaptureFixture) -> None:
    """prepareWorkflow's DEBUG line, and the coordinator's own resume call (embedded coordinator)."""
    from flask import Flask
    from web_servers import serve_wsgi

    from dtmcli.contrib.flask import workflow_resume_view

    secret = "S3CRET-TOKEN-42"
    gid = local_gid()
    attempts: list[int] = []

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("transient")  # stays prepared: the coordinator resumes it
        return b"ok"

    app = Flask("wf_review2")
    app.add_url_rule("/api/workflow/resume", view_func=workflow_resume_view(token=secret), methods=["GET", "POST"])
    with serve_wsgi(app) as base:
        workflow.init_http(dtm.url, f"{base}/api/workflow/resume?token={secret}")
        workflow.register(NAME, fn, retry_interval=1)
        try:
            with caplog.at_level(logging.DEBUG):
                with pytest.raises(RuntimeError):
                    workflow.execute(NAME, gid, b"in")
                dtm.advance(1.5, [gid])
                trans = dtm.wait_status(gid)
        finally:
            workflow.unregister(NAME)
    assert trans is not None and trans.status == "succeed" and len(attempts) == 2
    assert any("prepareWorkflow" in r.getMessage() for r in caplog.records)
    assert any(r.name == "werkzeug" and secret in r.getMessage() for r in caplog.records)  # documented
    assert [r.getMessage() for r in caplog.records if r.name.startswith("dtmcli") and secret in r.getMessage()] == []


# -- NEW-7: after DTM refused a record nothing more runs in the execution ---------------------------


@pytest.mark.parametrize(("status", "body"), [(409, b'{"dtm_result":"FAILURE","message":"not prepared"}'),
                                              (500, b'{"message":"storage: NotFound"}')])
def test_a_swallowed_refusal_runs_no_later_step(fake: FakeDtm, status: int, body: bytes) -> None:
    fake.refuse("registerBranch", status, body, finished("succeed"))
    later: list[Any] = []

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        try:
            wf.new_branch().request("POST", f"{BUSI}/debit")
        except DtmServerError:
            pass  # careless code
        try:
            wf.new_branch().request("POST", f"{BUSI}/credit")
        except DtmServerError as exc:
            later.append(exc)
        wf.new_branch().do(lambda bb: later.append("ran") or b"")
        return b"mine"

    workflow.register(NAME, fn)
    assert workflow.execute(NAME, "G", b"in") == b"theirs"  # the do() error ends the function: DTM's outcome
    assert "POST /credit" not in fake.paths() and "ran" not in later
    assert isinstance(later[0], DtmServerError) and "no further step or callback runs" in later[0].message


def test_a_swallowed_refusal_returns_the_stored_outcome_when_nothing_else_runs(fake: FakeDtm) -> None:
    fake.refuse("registerBranch", 409, b'{"dtm_result":"FAILURE"}', finished("succeed"))

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        try:
            wf.new_branch().request("POST", f"{BUSI}/debit")
        except DtmServerError:
            pass
        return b"mine"

    workflow.register(NAME, fn)
    assert workflow.execute(NAME, "G", b"in") == b"theirs"
    assert fake.paths() == ["POST prepareWorkflow", "POST /debit", "POST registerBranch", "POST prepareWorkflow"]
