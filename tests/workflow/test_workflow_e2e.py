"""Workflow mode end to end, sync and asyncio: every recorded workflow scenario (tests/data/traces/workflow_*.json)
through a real HTTP branch service and a real HTTP resume endpoint (Flask for sync, FastAPI for asyncio).

Uses the ``dtm`` facade, so it runs against the in-process coordinator (default mode: workflow progress is
stored only because the SDK sends ``"sync": "1"``) or, unchanged, with ``--dtm-server URL`` against a real DTM
(which must reach 127.0.0.1 of this machine for the resume callback).

One workflow body serves both flavours: it is a generator that yields each awaitable-or-value the workflow API
returns (``r = yield wf.request(...)``); :func:`flavoured` turns it into a plain ``def`` (sync) or an ``async def``
that awaits each yielded step (asyncio).
"""

from __future__ import annotations

import base64
import importlib
import inspect
import itertools
import json
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import pytest
from flavours import Flavour, both
from web_servers import serve_asgi, serve_wsgi

from dtmcli import DtmFailure, local_gid
from dtmcli.testing import Answer, BranchService, DtmFacade

pytestmark = both

Body = Callable[[Any, bytes], Generator[Any, Any, Any]]
TIMEOUT_TO_FAIL = 3  # seconds before the coordinator resumes a prepared workflow (instant on the manual clock)
_names = itertools.count(1)


def flavoured(flavour: Flavour, body: Body) -> Callable[..., Any]:
    """The workflow function for ``flavour``: ``body`` driven step by step, awaiting each yielded step in asyncio."""
    if not flavour.is_async:

        def run(wf: Any, data: bytes) -> Any:
            gen = body(wf, data)
            value: Any = None
            while True:
                try:
                    value = gen.send(value)  # sync steps have already run: pass their result back
                except StopIteration as stop:
                    return stop.value

        return run

    async def run_async(wf: Any, data: bytes) -> Any:
        gen = body(wf, data)
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = gen.throw(error) if error is not None else gen.send(value)
            except StopIteration as stop:
                return stop.value
            try:
                value, error = (await step if inspect.isawaitable(step) else step), None
            except Exception as exc:  # thrown back into the body at its yield, as a sync step raises
                value, error = None, exc

    return run_async


def callback(flavour: Flavour, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A phase-2 callback (``on_rollback``/``on_commit``) in the flavour's style: ``async def`` in asyncio."""
    if not flavour.is_async:
        return fn

    async def cb(bb: Any) -> Any:
        result = fn(bb)
        return await result if inspect.isawaitable(result) else result

    return cb


@dataclass
class Env:
    """The workflow module of the flavour, initialised with the coordinator and a live resume endpoint."""

    flavour: Flavour
    wf: ModuleType
    dtm: DtmFacade
    svc: BranchService

    def register(self, body: Body, **options: Any) -> str:
        """Register ``body`` under a fresh name (names are per process), returning the name."""
        name = f"wf{next(_names)}_{self.flavour.name}"
        self.wf.register(name, flavoured(self.flavour, body), **options)
        return name

    def execute(self, name: str, gid: str, data: Any) -> Any:
        return self.flavour.run(self.wf.execute(name, gid, json.dumps(data).encode()))

    def calls(self) -> list[tuple[str, str, str]]:
        """(path, op, branch_id) of every call the branch service received, in order."""
        return [(c.path, c.op, c.branch_id) for c in self.svc.calls()]


@pytest.fixture
def env(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> Iterator[Env]:
    wf = importlib.import_module(f"{flavour.module}.workflow")
    if flavour.is_async:
        from fastapi import FastAPI

        from dtmcli.contrib.fastapi import workflow_resume_endpoint

        app: Any = FastAPI()
        app.add_api_route("/api/workflow/resume", workflow_resume_endpoint(), methods=["GET", "POST"])
        server = serve_asgi(app)
    else:
        from flask import Flask

        from dtmcli.contrib.flask import workflow_resume_view

        app = Flask(__name__)
        app.add_url_rule("/api/workflow/resume", view_func=workflow_resume_view(), methods=["GET", "POST"])
        server = serve_wsgi(app)
    with server as base:
        wf.init_http(dtm.url, f"{base}/api/workflow/resume")
        yield Env(flavour, wf, dtm, branch_service)


def post(wf: Any, url: str, body: Any = None) -> Any:
    """An HTTP step or callback: POST ``body`` as JSON (no body when ``None``)."""
    return wf.request("POST", url) if body is None else wf.request("POST", url, json=body)


def result_of(dtm: DtmFacade, gid: str) -> bytes:
    trans = dtm.query(gid)
    assert trans is not None
    return base64.b64decode(trans.result)


def check_branch_queries(env: Env, gid: str) -> None:
    """Every call the workflow made carries gid, trans_type=workflow, branch_id and op, and no ``dtm``."""
    for call in env.svc.calls():
        assert call.query["gid"] == gid and call.query["trans_type"] == "workflow", call
        assert call.branch_id and call.op and "dtm" not in call.query, call


def two_http_steps(env: Env, prefix: str) -> Body:
    """workflow_success / _rollback / _compensate_error_branch: two HTTP steps, each with an HTTP rollback."""
    url = env.svc.url

    def body(wf: Any, data: bytes) -> Generator[Any, Any, bytes]:
        req = json.loads(data)
        got = []
        for i in (1, 2):
            on_rollback = callback(env.flavour, lambda bb, i=i: post(wf, url(f"{prefix}/c{i}"), req))
            resp = yield wf.new_branch().on_rollback(on_rollback).request("POST", url(f"{prefix}/a{i}"), json=req)
            got.append(resp.json())
        return json.dumps(got).encode()

    return body


def test_success_runs_each_step_once_and_stores_the_result(env: Env, dtm: DtmFacade) -> None:
    name = env.register(two_http_steps(env, "/ws"))
    gid = local_gid()
    result = env.execute(name, gid, {"amount": 30})
    assert json.loads(result) == [{"dtm_result": "SUCCESS"}] * 2
    assert env.calls() == [("/ws/a1", "action", "01"), ("/ws/a2", "action", "02")]
    assert [c.json() for c in env.svc.calls()] == [{"amount": 30}] * 2
    check_branch_queries(env, gid)
    trans = dtm.wait_status(gid)
    assert trans.status == "succeed" and trans.trans_type == "workflow"
    assert result_of(dtm, gid) == result


def test_rollback_compensates_earlier_steps_only(env: Env, dtm: DtmFacade) -> None:
    env.svc.route("/wr/a2", (409, {"error": "insufficient balance"}))
    name = env.register(two_http_steps(env, "/wr"))
    gid = local_gid()
    with pytest.raises(DtmFailure, match="insufficient balance") as failure:
        env.execute(name, gid, {"amount": 30})
    assert env.calls() == [("/wr/a1", "action", "01"), ("/wr/a2", "action", "02"), ("/wr/c1", "rollback", "01")]
    assert env.svc.calls("/wr/c1")[0].json() == {"amount": 30}
    check_branch_queries(env, gid)
    trans = dtm.wait_status(gid)
    assert trans.status == "failed" and "insufficient balance" in trans.rollback_reason
    assert failure.value.message == trans.rollback_reason
    # Executing the failed gid again: the stored outcome, nothing called.
    with pytest.raises(DtmFailure, match="insufficient balance"):
        env.execute(name, gid, {"amount": 30})
    assert len(env.svc.calls()) == 3


def test_compensate_error_branch_rolls_back_the_failed_step_first(env: Env, dtm: DtmFacade) -> None:
    env.svc.route("/wc/a2", (409, {"error": "insufficient balance"}))
    name = env.register(two_http_steps(env, "/wc"), compensate_error_branch=True)
    gid = local_gid()
    with pytest.raises(DtmFailure, match="insufficient balance"):
        env.execute(name, gid, {"amount": 30})
    assert env.calls() == [
        ("/wc/a1", "action", "01"),
        ("/wc/a2", "action", "02"),
        ("/wc/c2", "rollback", "02"),
        ("/wc/c1", "rollback", "01"),
    ]
    assert dtm.wait_status(gid).status == "failed"


def test_local_steps_commit_callbacks_and_idempotent_re_execute(env: Env, dtm: DtmFacade) -> None:
    url = env.svc.url
    local_calls: list[tuple[str, str, str, str]] = []

    def local(text: bytes) -> Callable[[Any], bytes]:
        def step(bb: Any) -> bytes:
            local_calls.append((bb.gid, bb.trans_type, bb.branch_id, bb.op))
            return text

        return env.flavour.busi(step)

    def body(wf: Any, data: bytes) -> Generator[Any, Any, bytes]:
        req = json.loads(data)
        on_commit = callback(env.flavour, lambda bb: post(wf, url("/wd/commit1"), {"note": "commit of a local step"}))
        step1 = yield wf.new_branch().on_commit(on_commit).do(local(json.dumps({"local": "done", **req}).encode()))
        step2 = yield wf.new_branch().do(local(b"plain text, not JSON"))
        step3 = yield wf.new_branch().request("POST", url("/wd/a3"), json=req)
        assert step2 == b"plain text, not JSON"
        return json.dumps({"step1": json.loads(step1), "step3": step3.json()}).encode()

    name = env.register(body)
    gid = local_gid()
    result = env.execute(name, gid, {"amount": 30})
    assert json.loads(result) == {"step1": {"local": "done", "amount": 30}, "step3": {"dtm_result": "SUCCESS"}}
    assert local_calls == [(gid, "workflow", "01", "action"), (gid, "workflow", "02", "action")]
    assert env.calls() == [("/wd/a3", "action", "03"), ("/wd/commit1", "commit", "01")]
    check_branch_queries(env, gid)
    assert dtm.wait_status(gid).status == "succeed" and result_of(dtm, gid) == result
    # Idempotent: executing the finished gid again returns the stored result and calls no step at all.
    assert env.execute(name, gid, {"amount": 30}) == result
    assert len(local_calls) == 2 and len(env.svc.calls()) == 2


def test_local_step_failure_rolls_back(env: Env, dtm: DtmFacade) -> None:
    url = env.svc.url
    attempts: list[str] = []

    def reserve(bb: Any) -> bytes:
        attempts.append("reserve")
        return b'{"reserved":true}'

    def check_stock(bb: Any) -> bytes:
        attempts.append("check")
        raise DtmFailure("out of stock")

    def body(wf: Any, data: bytes) -> Generator[Any, Any, None]:
        on_rollback = callback(env.flavour, lambda bb: post(wf, url("/wf2/c1")))  # no body, as in the trace
        yield wf.new_branch().on_rollback(on_rollback).do(env.flavour.busi(reserve))
        yield wf.new_branch().do(env.flavour.busi(check_stock))
        raise AssertionError("not reached: the failed step raises DtmFailure")

    name = env.register(body)
    gid = local_gid()
    with pytest.raises(DtmFailure, match="out of stock"):
        env.execute(name, gid, {"amount": 30})
    assert attempts == ["reserve", "check"]
    assert env.calls() == [("/wf2/c1", "rollback", "01")]
    assert env.svc.calls("/wf2/c1")[0].body == ""
    trans = dtm.wait_status(gid)
    assert trans.status == "failed" and "out of stock" in trans.rollback_reason
    with pytest.raises(DtmFailure, match="out of stock"):  # the stored outcome; nothing runs again
        env.execute(name, gid, {"amount": 30})
    assert attempts == ["reserve", "check"] and len(env.svc.calls()) == 1


def test_transient_error_leaves_it_prepared_and_the_coordinator_resumes_it(env: Env, dtm: DtmFacade) -> None:
    env.svc.route("/wm/a2", (500, {"error": "temporarily unavailable"}), 200)
    name = env.register(two_http_steps(env, "/wm"), timeout_to_fail=TIMEOUT_TO_FAIL)
    gid = local_gid()
    with pytest.raises(Exception) as error:
        env.execute(name, gid, {"amount": 30})
    assert not isinstance(error.value, DtmFailure), error.value
    trans = dtm.query(gid)
    assert trans is not None and trans.status == "prepared"
    assert env.calls() == [("/wm/a1", "action", "01"), ("/wm/a2", "action", "02")]
    # The coordinator calls the resume endpoint; the recorded step 01 is replayed, not called again.
    dtm.advance(TIMEOUT_TO_FAIL + 1, gids=[gid])
    trans = dtm.wait_status(gid, timeout=30)
    assert trans.status == "succeed"
    assert env.calls() == [("/wm/a1", "action", "01"), ("/wm/a2", "action", "02"), ("/wm/a2", "action", "02")]
    assert json.loads(result_of(dtm, gid)) == [{"dtm_result": "SUCCESS"}] * 2


def test_resume_replays_the_recorded_step_results(env: Env, dtm: DtmFacade) -> None:
    """A resumed workflow gets each recorded step's stored body back, not a new call's."""
    seq = itertools.count(1)
    env.svc.route("/wp/a1", lambda call: Answer(200, {"dtm_result": "SUCCESS", "call": next(seq)}))
    env.svc.route("/wp/a2", 503, lambda call: Answer(200, {"dtm_result": "SUCCESS", "call": next(seq)}))
    name = env.register(two_http_steps(env, "/wp"), timeout_to_fail=TIMEOUT_TO_FAIL)
    gid = local_gid()
    with pytest.raises(Exception):  # noqa: B017 - any non-final error: the 503
        env.execute(name, gid, {"amount": 30})
    dtm.advance(TIMEOUT_TO_FAIL + 1, gids=[gid])
    assert dtm.wait_status(gid, timeout=30).status == "succeed"
    assert json.loads(result_of(dtm, gid)) == [{"dtm_result": "SUCCESS", "call": n} for n in (1, 2)]
    assert len(env.svc.calls("/wp/a1")) == 1
