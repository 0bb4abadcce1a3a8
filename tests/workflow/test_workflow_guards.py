"""The guards added after the adversarial review of workflow mode (issue 12; /tmp/notes/review-wf.md).

Scripted transport (wf_fakes) for the decisions, the ``dtm`` coordinator fixture (embedded, or a real DTM
with ``--dtm-server``) where DTM's own answers matter: a gid of another workflow, input or type is refused
before a step runs; one execution per gid in a process (the resume view answers 425) and the outcome of an
execution another process finished; a failed step raises the same DtmFailure fresh and replayed; HTTP steps
by status code only; do_xa and phase-2 callbacks on one branch refused; the phase-consistency guard; async
steps never awaited; the 65,535-byte step result; on_finish as Go's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import warnings
from typing import Any, Iterator, Optional

import pytest
from wf_fakes import BUSI, DTM, AsyncFakeDtm, FakeDtm, custom, installed, prepared, progress

import dtmcli.asyncio.workflow as aworkflow
from dtmcli import DtmFailure, DtmInvalidInput, DtmOngoing, DtmServerError, Msg, local_gid, workflow
from dtmcli.asyncio import AsyncDtmClient
from dtmcli.testing import BranchService, DtmFacade
from dtmcli.workflow import WorkflowConflict

NAME = "wf_guard"
CALLBACK = "http://svc.test/resume"


@pytest.fixture
def fake() -> Iterator[FakeDtm]:
    with installed(NAME, CALLBACK) as dtm:
        yield dtm


def one_step(wf: workflow.Workflow, data: bytes) -> bytes:
    wf.new_branch().do(lambda bb: b"done")
    return b"ok"


# -- M1: the gid must be this workflow with this input ---------------------------------------------


@pytest.mark.parametrize(
    ("trans", "match"),
    [
        ({"trans_type": "msg"}, "type 'msg'"),
        ({"trans_type": "saga", "custom_data": custom(NAME, b"in")}, "type 'saga'"),
        ({"custom_data": custom("other", b"in")}, "another workflow or input"),
        ({"custom_data": custom(NAME, b"other input")}, "another workflow or input"),
        ({"custom_data": "not json"}, "another workflow or input"),
    ],
)
def test_a_gid_of_another_type_name_or_input_runs_nothing(fake: FakeDtm, trans: dict[str, Any], match: str) -> None:
    answer = prepared(progress("01", "action", "succeed", b"theirs"))
    answer["transaction"].update(trans)
    fake.prepare = answer
    ran: list[bytes] = []
    workflow.register(NAME, lambda wf, data: ran.append(data))
    with pytest.raises(DtmInvalidInput, match=match):
        workflow.execute(NAME, "G", b"in")
    assert ran == [] and fake.paths() == ["POST prepareWorkflow"]


def test_the_same_name_and_input_resume(fake: FakeDtm) -> None:
    fake.prepare = prepared(progress("01", "action", "succeed", b"done"), custom_data=custom(NAME, b"\x00in\xff"))
    workflow.register(NAME, one_step)
    assert workflow.execute(NAME, "G", b"\x00in\xff") == b"ok"
    assert fake.paths() == ["POST prepareWorkflow", "POST submit"]


def test_a_finished_gid_without_custom_data_answers_its_outcome(fake: FakeDtm) -> None:
    """boltdb/redis after the submit keep no custom_data: only the type can be checked there."""
    fake.prepare = {"transaction": {"status": "succeed", "trans_type": "workflow",
                                    "result": base64.b64encode(b"stored").decode()}, "progresses": []}
    workflow.register(NAME, one_step)
    assert workflow.execute(NAME, "G", b"anything") == b"stored"


def test_a_workflow_on_a_prepared_msg_gid_is_refused(dtm: DtmFacade) -> None:
    gid = local_gid()
    with BranchService() as busi:
        Msg(dtm.url, gid).add(busi.url("/msg-action"), {"amount": 5}).prepare(busi.url("/query"))
        workflow.init_http(dtm.url, "http://127.0.0.1:9/unused")
        workflow.register(NAME, lambda wf, data: wf.new_branch().request("POST", busi.url("/step")) and b"")
        try:
            with pytest.raises(DtmInvalidInput, match="type 'msg'"):
                workflow.execute(NAME, gid, b"{}")
        finally:
            workflow.unregister(NAME)
        assert busi.calls("/step") == []
    trans = dtm.query(gid)
    assert trans is not None and trans.trans_type == "msg" and trans.status == "prepared"


def _flask_app(view: Any) -> Any:
    from flask import Flask

    app = Flask("wf_guard")
    app.add_url_rule("/resume", view_func=view, methods=["GET", "POST"])
    return app.test_client()


def test_the_resume_view_refuses_another_input_for_a_prepared_gid(
    dtm: DtmFacade, caplog: pytest.LogCaptureFixture
) -> None:
    from dtmcli.contrib.flask import workflow_resume_view

    gid, credits = local_gid(), []

    def pay(wf: workflow.Workflow, data: bytes) -> bytes:
        wf.new_branch().do(lambda bb: b"debited")
        if not credits:
            credits.append("blip")
            raise ConnectionError("transient")
        credits.append(json.loads(data))
        return b""

    workflow.init_http(dtm.url, "http://127.0.0.1:9/unused")
    workflow.register(NAME, pay)
    try:
        with pytest.raises(ConnectionError):
            workflow.execute(NAME, gid, b'{"to":"alice"}')
        client = _flask_app(workflow_resume_view())
        query = f"/resume?gid={gid}&trans_type=workflow&branch_id=00&op={NAME}"
        hostile = client.post(query, data=b'{"to":"mallory"}')
        assert hostile.status_code == 500
        assert base64.b64encode(b'{"to":"alice"}') not in hostile.data  # the stored input is not echoed
        assert "another workflow or input" in caplog.text
        assert credits == ["blip"]
        assert client.post(query, data=b'{"to":"alice"}').status_code == 200
        assert credits == ["blip", {"to": "alice"}]
    finally:
        workflow.unregister(NAME)
    assert dtm.wait_status(gid).status == "succeed"


# -- M1: an optional token in the callback URL's query ------------------------------------------------


def test_resume_view_token(fake: FakeDtm, caplog: pytest.LogCaptureFixture) -> None:
    from dtmcli.contrib.flask import workflow_resume_view

    workflow.register(NAME, one_step)
    client = _flask_app(workflow_resume_view(token="s3cret"))
    base = f"/resume?gid=G&trans_type=workflow&branch_id=00&op={NAME}"
    for extra in ("", "&token=wrong", "&token=s3cret&token=s3cret", "&token="):
        assert client.post(base + extra, data=b"in").status_code == 403
    assert fake.calls == [] and "workflow resume refused" in caplog.text
    assert client.post(base + "&token=s3cret", data=b"in").status_code == 200
    with pytest.raises(DtmInvalidInput, match="non-empty str"):
        workflow_resume_view(token="")


def test_the_coordinator_sends_the_callback_token_back(dtm: DtmFacade) -> None:
    from web_servers import serve_wsgi

    from dtmcli.contrib.flask import workflow_resume_view

    gid, runs = local_gid(), []

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        runs.append(data)
        if len(runs) == 1:
            raise ConnectionError("transient")
        return b""

    from flask import Flask

    app = Flask("wf_guard_token")
    app.add_url_rule("/resume", view_func=workflow_resume_view(token="s3cret"), methods=["GET", "POST"])
    with serve_wsgi(app) as base:
        workflow.init_http(dtm.url, f"{base}/resume?token=s3cret")
        workflow.register(NAME, fn, retry_interval=1)
        try:
            with pytest.raises(ConnectionError):
                workflow.execute(NAME, gid, b"in")
            dtm.advance(1.5, [gid])
            assert dtm.wait_status(gid).status == "succeed"
        finally:
            workflow.unregister(NAME)
    assert runs == [b"in", b"in"]


# -- M2: one execution per gid in a process; an outcome another execution settled ---------------------


def test_a_gid_running_in_this_process_is_ongoing_and_released(fake: FakeDtm) -> None:
    from dtmcli.contrib.flask import workflow_resume_view

    seen: list[Any] = []
    client = _flask_app(workflow_resume_view())

    def step(bb: Any) -> bytes:
        with pytest.raises(DtmOngoing, match="already running"):
            workflow.execute(NAME, "G", b"in")
        resp = client.post(f"/resume?gid=G&trans_type=workflow&branch_id=00&op={NAME}", data=b"in")
        seen.append(resp.status_code)
        assert workflow.execute(NAME, "OTHER", b"in") == b""  # another gid runs meanwhile
        seen.append("other ran")
        return b""

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        if wf.gid == "G":
            wf.new_branch().do(step)
            raise RuntimeError("leaves it prepared")
        return b""

    workflow.register(NAME, fn)
    with pytest.raises(RuntimeError):
        workflow.execute(NAME, "G", b"in")
    assert seen == [425, "other ran"]
    assert [p for p in fake.paths() if p == "POST prepareWorkflow"] == ["POST prepareWorkflow"] * 2
    assert not workflow.registry._running
    with pytest.raises(RuntimeError):  # released after an error: runs again
        workflow.execute(NAME, "G", b"in")


def test_async_cancellation_releases_the_gid() -> None:
    fake = AsyncFakeDtm()

    async def main() -> None:
        entered, hold = asyncio.Event(), asyncio.Event()

        async def step(bb: Any) -> bytes:
            entered.set()
            await hold.wait()
            return b""

        async def fn(wf: aworkflow.Workflow, data: bytes) -> bytes:
            await wf.new_branch().do(step)
            return b""

        aworkflow.register(NAME, fn)
        async with AsyncDtmClient(DTM, transport=fake) as client:  # type: ignore[arg-type]
            aworkflow.init_http(client, CALLBACK)
            task = asyncio.create_task(aworkflow.execute(NAME, "G", b"in"))
            await entered.wait()
            with pytest.raises(DtmOngoing):
                await aworkflow.execute(NAME, "G", b"in")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not aworkflow.registry._running
            hold.set()
            assert await aworkflow.execute(NAME, "G", b"in") == b""

    try:
        asyncio.run(main())
    finally:
        aworkflow.unregister(NAME)


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [("registerBranch", 409, b'{"dtm_result":"FAILURE","message":"not prepared"}'),
     ("registerBranch", 500, b'{"message":"storage: UniqueKeyConflict"}'),
     ("submit", 500, b'{"message":"storage: NotFound"}')],
)
def test_finished_by_another_execution_returns_its_outcome(fake: FakeDtm, path: str, status: int, body: bytes) -> None:
    done = {"transaction": {"status": "succeed", "trans_type": "workflow",
                            "result": base64.b64encode(b"theirs").decode()}, "progresses": []}
    fake.refuse(path, status, body, done)
    committed: list[str] = []

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        wf.new_branch().on_commit(lambda bb: committed.append("commit"))
        wf.do(lambda bb: b"1")
        return b"mine"

    workflow.register(NAME, fn)
    assert workflow.execute(NAME, "G", b"in") == b"theirs"
    assert fake.paths()[-1] == "POST prepareWorkflow"
    assert committed == ([] if path == "registerBranch" else ["commit"])
    # failed meanwhile: DtmFailure(reason), as a re-execute of the failed gid raises
    fake.calls.clear()
    failed = {"transaction": {"status": "failed", "trans_type": "workflow", "rollback_reason": "theirs FAILURE"},
              "progresses": []}
    fake.prepare = prepared()
    fake.refuse(path, status, body, failed)
    if path == "submit":  # this run committed (its callback ran): DTM's "failed" contradicts it
        with pytest.raises(WorkflowConflict, match="as failed after this one ran 1 commit callback"):
            workflow.execute(NAME, "G", b"in")
        return
    with pytest.raises(DtmFailure) as info:
        workflow.execute(NAME, "G", b"in")
    assert info.value.message == "theirs FAILURE"


def test_a_still_prepared_gid_keeps_the_error(fake: FakeDtm) -> None:
    fake.refuse("submit", 500, b'{"message":"busy"}', prepared())
    workflow.register(NAME, one_step)
    with pytest.raises(DtmServerError, match="busy"):
        workflow.execute(NAME, "G", b"in")


def test_a_swallowed_refusal_runs_no_phase2(fake: FakeDtm) -> None:
    done = {"transaction": {"status": "failed", "trans_type": "workflow", "rollback_reason": "r"}, "progresses": []}
    fake.refuse("registerBranch", 409, b'{"dtm_result":"FAILURE"}', done)
    committed: list[str] = []

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        wf.new_branch().on_commit(lambda bb: committed.append("commit"))
        try:
            wf.do(lambda bb: b"1")
        except Exception:  # what careless code does
            pass
        return b""

    workflow.register(NAME, fn)
    with pytest.raises(DtmFailure, match="r FAILURE"):
        workflow.execute(NAME, "G", b"in")
    assert committed == [] and "POST submit" not in fake.paths()


def test_another_process_finished_the_gid(dtm: DtmFacade) -> None:
    """Two registries stand for two processes: B runs the gid to its end while A is in its step."""
    gid = local_gid()
    other = type(workflow.registry)()
    other.init_http(dtm.url, "http://127.0.0.1:9/unused")

    def run_b() -> bytes:
        entry, client, callback = other.lookup(NAME)
        wf = workflow.Workflow(entry, client, callback, gid, b"in")
        from dtmcli import _flow

        return _flow.run(wf._execute_flow(entry.fn, wf), client)

    who = ["A"]

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        def step(bb: Any) -> bytes:
            if who[-1] == "A":
                who.append("B")
                assert run_b() == b"B"  # B runs the gid to its end while A is in its step
                who.append("A again")
            return b"s"

        wf.new_branch().do(step)
        return b"B" if who[-1] == "B" else b"A"

    workflow.init_http(dtm.url, "http://127.0.0.1:9/unused")
    workflow.register(NAME, fn)
    other.register(NAME, fn)
    try:
        assert workflow.execute(NAME, gid, b"in") == b"B"  # A's record is refused: B's outcome
    finally:
        workflow.unregister(NAME)
    trans = dtm.query(gid)
    assert trans is not None and trans.status == "succeed"


# -- M3 and the NIT: fresh = replay ------------------------------------------------------------------


class OutOfStock(DtmFailure):
    pass


def test_a_fresh_failure_raises_what_its_replay_raises(fake: FakeDtm) -> None:
    seen: list[tuple[type, str, Optional[str], Optional[str]]] = []

    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        def reserve(bb: Any) -> bytes:
            raise OutOfStock("warehouse A empty")

        for step in (lambda: wf.new_branch().do(reserve), lambda: wf.new_branch().request("POST", f"{BUSI}/x")):
            try:
                step()
            except DtmFailure as exc:
                seen.append((type(exc), exc.message, exc.branch_id, exc.op))
        return b""

    fake.branches[f"{BUSI}/x"] = (409, b'{"error":"no"}')
    workflow.register(NAME, fn)
    workflow.execute(NAME, "G", b"in")
    fresh = list(seen)
    assert fresh == [(DtmFailure, "warehouse A empty FAILURE", "01", "action"),
                     (DtmFailure, '{"error":"no"} FAILURE', "02", "action")]
    seen.clear()
    fake.prepare = prepared(*[progress(r["branch_id"], "action", r["status"], r["data"].encode())
                              for r in fake.bodies("registerBranch")])
    workflow.execute(NAME, "G", b"in")
    assert seen == fresh


def test_a_clipped_rollback_reason_is_the_same_fresh_and_re_executed(fake: FakeDtm) -> None:
    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        raise DtmFailure("x" * 5000)

    workflow.register(NAME, fn)
    with pytest.raises(DtmFailure) as fresh:
        workflow.execute(NAME, "G", b"in")
    reason = fake.bodies("submit")[0]["req_extra"]["rollback_reason"]
    fake.prepare = {"transaction": {"status": "failed", "trans_type": "workflow", "rollback_reason": reason},
                    "progresses": []}
    with pytest.raises(DtmFailure) as again:
        workflow.execute(NAME, "G", b"in")
    assert fresh.value.message == again.value.message and fresh.value.message.endswith("... FAILURE")


# -- M5: do_xa and phase-2 callbacks do not share a branch -------------------------------------------


@pytest.mark.parametrize("order", ["xa_then_commit", "xa_then_rollback", "xa_then_finish", "rollback_then_xa",
                                   "commit_then_xa"])
def test_do_xa_and_callbacks_on_one_branch_are_refused(
    fake: FakeDtm, monkeypatch: pytest.MonkeyPatch, order: str
) -> None:
    ran: list[str] = []
    monkeypatch.setattr(workflow.Workflow, "_xa_local", lambda *a: ran.append("local") or b"")
    monkeypatch.setattr(workflow.Workflow, "_xa_phase2", lambda *a: ran.append("phase2"))

    def fn(wf: workflow.Workflow, data: bytes) -> None:
        wf.new_branch()
        if order.endswith("_xa"):
            getattr(wf, "on_" + order.split("_")[0])(lambda bb: None)
            wf.do_xa("CONN", lambda conn: b"")
        else:
            wf.do_xa("CONN", lambda conn: b"")
            getattr(wf, "on_" + order.rsplit("_", 1)[1])(lambda *a: None)

    workflow.register(NAME, fn)
    with pytest.raises(DtmInvalidInput, match="do_xa"):
        workflow.execute(NAME, "G", b"in")
    assert ran == ([] if order.endswith("_xa") else ["local"])
    assert "POST submit" not in fake.paths()
    if order.endswith("_xa"):
        assert fake.paths() == ["POST prepareWorkflow"]


# -- Minor 1: phase consistency ----------------------------------------------------------------------


@pytest.mark.parametrize("recorded", ["rollback", "commit"])
def test_a_run_contradicting_the_recorded_phase_is_refused(fake: FakeDtm, recorded: str) -> None:
    fake.prepare = prepared(progress("01", "action", "succeed", b"1"), progress("01", recorded, "succeed"))
    ran: list[str] = []

    def fn(wf: workflow.Workflow, data: bytes) -> None:
        wf.new_branch().on_commit(lambda bb: ran.append("commit")).on_rollback(lambda bb: ran.append("rollback"))
        wf.do(lambda bb: b"1")
        if recorded == "commit":
            raise DtmFailure("changed path")

    workflow.register(NAME, fn)
    with pytest.raises(workflow.WorkflowPhase2Error, match=f"recorded run took the {recorded} phase"):
        workflow.execute(NAME, "G", b"in")
    assert ran == [] and fake.paths() == ["POST prepareWorkflow"]


# -- Minor 4: an async step never awaited -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["request", "do", "do_xa"])
def test_an_async_step_never_awaited_is_refused(kind: str) -> None:
    fake = AsyncFakeDtm()

    async def fn(wf: aworkflow.Workflow, data: bytes) -> bytes:
        wf.new_branch().on_rollback(lambda bb: None)
        if kind == "request":
            wf.request("POST", f"{BUSI}/forgotten")
        elif kind == "do":
            wf.do(lambda bb: b"")
        else:
            wf.do_xa("CONN", lambda conn: b"")
        await wf.new_branch().request("POST", f"{BUSI}/credit")
        return b"ok"

    async def main() -> None:
        async with AsyncDtmClient(DTM, transport=fake) as client:  # type: ignore[arg-type]
            aworkflow.init_http(client, CALLBACK)
            with pytest.raises(DtmInvalidInput, match="never awaited"):
                await aworkflow.execute(NAME, "G", b"in")

    aworkflow.register(NAME, fn)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "coroutine was never awaited" either: it is closed
            asyncio.run(main())
    finally:
        aworkflow.unregister(NAME)
    assert [p for p in fake.paths() if "submit" in p or "forgotten" in p] == []


def test_an_async_step_never_awaited_in_a_callback_is_refused() -> None:
    fake = AsyncFakeDtm()

    async def fn(wf: aworkflow.Workflow, data: bytes) -> bytes:
        async def commit(bb: Any) -> None:
            wf.request("POST", f"{BUSI}/forgotten")

        await wf.new_branch().on_commit(commit).do(lambda bb: b"")
        return b"ok"

    async def main() -> None:
        async with AsyncDtmClient(DTM, transport=fake) as client:  # type: ignore[arg-type]
            aworkflow.init_http(client, CALLBACK)
            with pytest.raises(DtmInvalidInput, match="never awaited"):
                await aworkflow.execute(NAME, "G", b"in")

    aworkflow.register(NAME, fn)
    try:
        asyncio.run(main())
    finally:
        aworkflow.unregister(NAME)
    assert [b["op"] for b in fake.bodies("registerBranch")] == ["action"]  # the commit is not recorded
    assert "POST submit" not in fake.paths()


def test_async_steps_work_as_tasks() -> None:
    fake = AsyncFakeDtm()

    async def fn(wf: aworkflow.Workflow, data: bytes) -> bytes:
        first = await asyncio.create_task(wf.new_branch().do(lambda bb: b"a"))
        second = await asyncio.ensure_future(wf.new_branch().request("POST", f"{BUSI}/b"))
        return first + second.content

    async def main() -> bytes:
        async with AsyncDtmClient(DTM, transport=fake) as client:  # type: ignore[arg-type]
            aworkflow.init_http(client, CALLBACK)
            return await aworkflow.execute(NAME, "G", b"in")

    aworkflow.register(NAME, fn)
    try:
        assert asyncio.run(main()) == b'a{"dtm_result":"SUCCESS"}'
    finally:
        aworkflow.unregister(NAME)


# -- Minor 6: a step result DTM's MySQL store can keep -------------------------------------------------


def test_a_step_result_over_65535_bytes_is_refused_before_registerbranch(fake: FakeDtm) -> None:
    def fn(wf: workflow.Workflow, data: bytes) -> bytes:
        wf.new_branch().do(lambda bb: b"x" * int(data))
        return b""

    workflow.register(NAME, fn)
    assert workflow.execute(NAME, "G", b"65535") == b""
    assert len(fake.bodies("registerBranch")[0]["data"]) == 65535
    fake.calls.clear()
    with pytest.raises(DtmInvalidInput, match="65536 bytes; DTM's MySQL store keeps 65535"):
        workflow.execute(NAME, "G", b"65536")
    assert fake.paths() == ["POST prepareWorkflow"]
