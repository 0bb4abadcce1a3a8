"""A returned ``{"dtm_result": "FAILURE" | "ONGOING"}`` means what a raised DtmFailure / DtmOngoing means.

Checked over real HTTP for every integration: Flask, Django, FastAPI (a ``DtmRoute`` router with
no exception handlers installed), and the framework-neutral ``handle_query`` behind a plain HTTP
server; plus ``handle_async``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable, Iterator

import pytest
import requests
from django.http import HttpRequest
from django.urls import path
from fastapi import APIRouter, FastAPI
from web_servers import serve_asgi, serve_wsgi

from dtmcli import BranchInfo, DtmFailure, DtmOngoing
from dtmcli.branch import handle_async, handle_query
from dtmcli.contrib.django import branch_handler as django_branch_handler
from dtmcli.contrib.fastapi import BranchDep, DtmRoute
from dtmcli.testing import Answer, BranchService, Call

SAGA = "gid=G-res&trans_type=saga&branch_id=01"


def business(kind: str) -> Any:
    """What each route does, whatever the framework."""
    if kind == "failure":
        return {"dtm_result": "FAILURE"}
    if kind == "failure_msg":
        return {"dtm_result": "FAILURE", "message": "insufficient balance"}
    if kind == "ongoing":
        return {"dtm_result": "ONGOING"}
    if kind == "unknown":
        return {"dtm_result": "MAYBE"}
    if kind == "note":  # DTM reads the word anywhere in a 200 body
        return {"note": "the previous attempt ended in FAILURE"}
    if kind == "raise_failure":
        raise DtmFailure("raised")
    if kind == "raise_ongoing":
        raise DtmOngoing("later")
    return {"balance": 7}


@contextlib.contextmanager
def flask_server() -> Iterator[str]:
    import flask

    from dtmcli.contrib.flask import branch_handler

    app = flask.Flask(__name__)

    @app.post("/busi/<kind>")
    @branch_handler
    def busi(kind: str, info: BranchInfo) -> Any:
        return business(kind)

    with serve_wsgi(app) as base:
        yield base


@django_branch_handler
def django_busi(request: HttpRequest, kind: str, info: BranchInfo) -> Any:
    return business(kind)


urlpatterns = [path("busi/<str:kind>", django_busi)]


@contextlib.contextmanager
def django_server() -> Iterator[str]:
    import django
    from django.conf import settings
    from django.core.handlers.wsgi import WSGIHandler
    from django.test import override_settings

    if not settings.configured:
        settings.configure(
            SECRET_KEY="test", DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
        )
        django.setup()
    with override_settings(
        ROOT_URLCONF=__name__, MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"], ALLOWED_HOSTS=["127.0.0.1"]
    ), serve_wsgi(WSGIHandler()) as base:
        yield base


@contextlib.contextmanager
def fastapi_server() -> Iterator[str]:
    app = FastAPI()  # no add_exception_handlers: DtmRoute alone answers as DTM expects
    router = APIRouter(route_class=DtmRoute)

    @router.post("/busi/{kind}")
    def busi(kind: str, info: BranchDep) -> Any:
        return business(kind)

    @router.post("/async/{kind}")
    async def busi_async(kind: str, info: BranchDep) -> Any:
        return business(kind)

    app.include_router(router)
    with serve_asgi(app) as base:
        yield base


@contextlib.contextmanager
def plain_server() -> Iterator[str]:
    def answer(call: Call) -> Answer:
        resp = handle_query(call.query, lambda info: business(call.path.rsplit("/", 1)[1]))
        return Answer(resp.status, resp.content)

    with BranchService(default=answer) as svc:
        yield svc.base_url


SERVERS: dict[str, Callable[[], Any]] = {
    "flask": flask_server, "django": django_server, "fastapi": fastapi_server, "plain": plain_server,
}


@pytest.fixture(params=sorted(SERVERS), scope="module")
def base(request: pytest.FixtureRequest) -> Iterator[str]:
    with SERVERS[request.param]() as url:
        yield url


def post(base: str, kind: str, op: str, query: str = SAGA) -> requests.Response:
    return requests.post(f"{base}/busi/{kind}?{query}&op={op}", json={"amount": 1}, timeout=10)


def test_returned_failure_is_409_on_an_action(base: str) -> None:
    r = post(base, "failure", "action")
    assert r.status_code == 409 and r.json()["dtm_result"] == "FAILURE"
    r = post(base, "failure_msg", "action")
    assert (r.status_code, r.json()) == (409, {"dtm_result": "FAILURE", "message": "insufficient balance"})


def test_returned_failure_where_not_allowed_is_500_like_a_raised_one(
    base: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="dtmcli"):
        returned = post(base, "failure", "compensate")
        raised = post(base, "raise_failure", "compensate")
    for r in (returned, raised):
        assert r.status_code == 500 and "FAILURE" not in r.text  # DTM would read the word
    assert "op=compensate" in caplog.text


def test_returned_ongoing_is_425(base: str) -> None:
    for op in ("action", "compensate"):
        r = post(base, "ongoing", op)
        assert r.status_code == 425 and r.json()["dtm_result"] == "ONGOING"


def test_unknown_dtm_result_is_500(base: str) -> None:
    r = post(base, "unknown", "action")
    assert r.status_code == 500 and "MAYBE" in r.text


def test_reserved_word_in_a_returned_value_is_500(base: str) -> None:
    for op in ("action", "compensate"):
        r = post(base, "note", op)
        assert r.status_code == 500 and "FAILURE" not in r.text, (op, r.status_code, r.text)


def test_raised_errors_and_bad_query(base: str) -> None:
    assert post(base, "raise_failure", "action").status_code == 409
    assert post(base, "raise_ongoing", "action").status_code == 425
    assert post(base, "ok", "action").status_code == 200
    r = requests.post(f"{base}/busi/ok?gid=G-res&op=action", json={}, timeout=10)
    assert r.status_code == 400 and "trans_type" in r.json()["message"]


def test_fastapi_async_route() -> None:
    with fastapi_server() as url:
        assert requests.post(f"{url}/async/failure?{SAGA}&op=action", timeout=10).status_code == 409
        assert requests.post(f"{url}/async/failure?{SAGA}&op=compensate", timeout=10).status_code == 500
        assert requests.post(f"{url}/async/ongoing?{SAGA}&op=action", timeout=10).status_code == 425
        r = requests.post(f"{url}/async/ok?{SAGA}&op=action", timeout=10)
        assert (r.status_code, r.json()) == (200, {"balance": 7})


def test_handle_async_honours_returned_failure() -> None:
    info = BranchInfo.from_query({"gid": "G", "trans_type": "tcc", "branch_id": "01", "op": "try"})

    async def fail() -> Any:
        return {"dtm_result": "FAILURE", "message": "no"}

    assert asyncio.run(handle_async(info, fail)).status == 409
