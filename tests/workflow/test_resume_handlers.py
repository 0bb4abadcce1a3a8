"""The workflow resume views (Flask, FastAPI, Django): DTM's resume call answered 200 / 409 / 500 (protocol.md §12),
425 for a gid already running in the process, 403 without the ``token`` a view was given."""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import django
import flask
import pytest
from django.test import Client, override_settings
from django.urls import path
from fastapi import FastAPI
from fastapi.testclient import TestClient
from wf_fakes import DTM, AsyncFakeDtm, FakeDtm

import dtmcli.asyncio.workflow as aworkflow
from dtmcli import DtmClient, DtmFailure, workflow
from dtmcli.asyncio import AsyncDtmClient
from dtmcli.contrib import django as dj
from dtmcli.contrib.fastapi import workflow_resume_endpoint
from dtmcli.contrib.flask import workflow_resume_view

SEEN: list[tuple[str, bytes]] = []
RESUME = "/api/workflow/resume"
RESUME_T = "/api/workflow/resume-t"  # the same view with token="s3cret"
CALLBACK = f"http://svc.test{RESUME}"


def q(name: str, trans_type: str = "workflow") -> str:
    return f"gid=G1&trans_type={trans_type}&branch_id=00&op={name}"


def ok(wf: workflow.Workflow, data: bytes) -> bytes:
    SEEN.append(("ok", data))
    return b"done"


def fails(wf: workflow.Workflow, data: bytes) -> None:
    SEEN.append(("fails", data))
    raise DtmFailure("insufficient balance")


def breaks(wf: workflow.Workflow, data: bytes) -> None:
    SEEN.append(("breaks", data))
    raise RuntimeError("database down")


async def a_ok(wf: aworkflow.Workflow, data: bytes) -> bytes:
    SEEN.append(("a_ok", data))
    return b"done"


async def a_fails(wf: aworkflow.Workflow, data: bytes) -> None:
    SEEN.append(("a_fails", data))
    raise DtmFailure("insufficient balance")


@pytest.fixture(autouse=True)
def registered() -> Iterator[tuple[FakeDtm, AsyncFakeDtm]]:
    SEEN.clear()
    sync_dtm, async_dtm = FakeDtm(), AsyncFakeDtm()
    workflow.init_http(DtmClient(DTM, transport=sync_dtm), CALLBACK)  # type: ignore[arg-type]
    aworkflow.init_http(AsyncDtmClient(DTM, transport=async_dtm), CALLBACK)  # type: ignore[arg-type]
    for name, fn in (("ok", ok), ("fails", fails), ("breaks", breaks)):
        workflow.register(name, fn)
    aworkflow.register("a_ok", a_ok)
    aworkflow.register("a_fails", a_fails)
    yield sync_dtm, async_dtm
    for name in ("ok", "fails", "breaks"):
        workflow.unregister(name)
    for name in ("a_ok", "a_fails"):
        aworkflow.unregister(name)


# -- one client per framework, all called as (method, url, body) -> (status, json) -------------------


def flask_call() -> Callable[[str, str, bytes], tuple[int, Any]]:
    app = flask.Flask(__name__)
    app.add_url_rule(RESUME, view_func=workflow_resume_view(), methods=["GET", "POST"])
    app.add_url_rule(RESUME_T, endpoint="t", view_func=workflow_resume_view(token="s3cret"), methods=["GET", "POST"])
    client = app.test_client()

    def call(method: str, url: str, body: bytes) -> tuple[int, Any]:
        r = client.open(url, method=method, data=body, content_type="application/json")
        return r.status_code, r.get_json()

    return call


def fastapi_call() -> Callable[[str, str, bytes], tuple[int, Any]]:
    app = FastAPI()
    app.add_api_route(RESUME, workflow_resume_endpoint(), methods=["GET", "POST"])
    app.add_api_route(RESUME_T, workflow_resume_endpoint(token="s3cret"), methods=["GET", "POST"])
    client = TestClient(app)

    def call(method: str, url: str, body: bytes) -> tuple[int, Any]:
        r = client.request(method, url, content=body or None, headers={"Content-Type": "application/json"})
        return r.status_code, r.json()

    return call


urlpatterns = [path(RESUME.lstrip("/"), dj.workflow_resume_view()),
               path(RESUME_T.lstrip("/"), dj.workflow_resume_view(token="s3cret"))]


def django_call() -> Callable[[str, str, bytes], tuple[int, Any]]:
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            SECRET_KEY="test", DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
        )
        django.setup()
    client = Client(enforce_csrf_checks=True)

    def call(method: str, url: str, body: bytes) -> tuple[int, Any]:
        with override_settings(ROOT_URLCONF=__name__, MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"],
                               ALLOWED_HOSTS=["testserver"]):
            if method == "GET":
                r = client.get(url)
            else:
                r = client.post(url, data=body, content_type="application/json")
        return r.status_code, r.json()

    return call


FRAMEWORKS = {"flask": flask_call, "fastapi": fastapi_call, "django": django_call}


@pytest.fixture(params=sorted(FRAMEWORKS))
def call(request: pytest.FixtureRequest) -> Callable[[str, str, bytes], tuple[int, Any]]:
    return FRAMEWORKS[request.param]()


RAW = b'\x00\xff{"not":"json"'


def test_success_answers_200_with_the_raw_input(call: Any, registered: Any) -> None:
    status, body = call("POST", f"{RESUME}?{q('ok')}", RAW)
    assert (status, body) == (200, {"dtm_result": "SUCCESS"})
    assert SEEN == [("ok", RAW)]
    sync_dtm, _ = registered
    assert [b["gid"] for b in sync_dtm.bodies("prepareWorkflow")] == ["G1"]
    assert sync_dtm.bodies("submit")[0]["req_extra"]["status"] == "succeed"


def test_get_runs_the_workflow_with_empty_input(call: Any) -> None:
    status, _ = call("GET", f"{RESUME}?{q('ok')}", b"")
    assert status == 200 and SEEN == [("ok", b"")]


def test_failure_answers_409(call: Any) -> None:
    status, body = call("POST", f"{RESUME}?{q('fails')}", b"{}")
    assert status == 409 and body["dtm_result"] == "FAILURE" and "insufficient balance" in body["message"]


def test_other_error_answers_500_and_nothing_is_submitted(call: Any, registered: Any) -> None:
    status, _ = call("POST", f"{RESUME}?{q('breaks')}", b"{}")
    assert status == 500 and SEEN == [("breaks", b"{}")]
    assert registered[0].bodies("submit") == []


def test_unknown_name_answers_500_with_a_log_line(call: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="dtmcli"):
        status, _ = call("POST", f"{RESUME}?{q('nobody')}", b"{}")
    assert status == 500 and SEEN == []
    assert "no workflow named 'nobody' is registered" in caplog.text


def test_not_a_workflow_call_answers_400(call: Any) -> None:
    workflow.register("try", ok)  # a name that is also a tcc op
    try:
        status, _ = call("POST", f"{RESUME}?{q('try', 'tcc')}", b"{}")
    finally:
        workflow.unregister("try")
    assert status == 400 and SEEN == []
    status, _ = call("POST", f"{RESUME}?gid=G1", b"{}")
    assert status == 400 and SEEN == []


def test_async_registry_names_are_served_too(call: Any, registered: Any) -> None:
    status, _ = call("POST", f"{RESUME}?{q('a_ok')}", b"in")
    assert status == 200 and SEEN == [("a_ok", b"in")]
    assert registered[1].bodies("submit")[0]["req_extra"]["status"] == "succeed"
    status, _ = call("POST", f"{RESUME}?{q('a_fails')}", b"in")
    assert status == 409


@pytest.mark.parametrize("name", ["ok", "a_ok"])
def test_a_gid_running_in_this_process_answers_425(call: Any, registered: Any, name: str) -> None:
    registry = workflow.registry if name == "ok" else aworkflow.registry
    with registry.running("G1"):
        status, body = call("POST", f"{RESUME}?{q(name)}", b"in")
    assert (status, body["dtm_result"]) == (425, "ONGOING") and SEEN == []
    assert registered[0].calls == [] and registered[1].calls == []
    assert call("POST", f"{RESUME}?{q(name)}", b"in")[0] == 200  # released


def test_a_view_with_a_token_needs_it_in_the_query(call: Any, caplog: pytest.LogCaptureFixture) -> None:
    for extra in ("", "&token=nope", "&token=s3cret&token=s3cret"):
        assert call("POST", f"{RESUME_T}?{q('ok')}{extra}", b"in")[0] == 403
    assert SEEN == [] and "workflow resume refused" in caplog.text
    assert call("POST", f"{RESUME_T}?{q('ok')}&token=s3cret", b"in")[0] == 200 and SEEN == [("ok", b"in")]
