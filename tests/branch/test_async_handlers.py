"""``async def`` branch handlers over real HTTP: FastAPI ``DtmRoute``, Starlette ``branch_endpoint``, Django
async views under ASGI (all served by uvicorn) and Flask async views.

Every outcome maps exactly as for sync handlers (409/425/500/400, returned FAILURE/ONGOING, native
responses unchanged); concurrent requests each see their own :func:`~dtmcli.branch.current_branch_info`
(a ContextVar); a forged ``dtm`` is refused (400) in async handlers too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any, Callable, Iterator

import httpx
import pytest
import requests
from django.http import HttpRequest, JsonResponse
from django.urls import path
from fastapi import APIRouter, Depends, FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from web_servers import serve_asgi

from dtmcli import BranchInfo, DtmDuplicated, DtmFailure, DtmOngoing, _dtm_servers, set_dtm_servers
from dtmcli.branch import current_branch_info
from dtmcli.contrib.django import branch_handler as django_branch_handler
from dtmcli.contrib.django import branch_payload as django_payload
from dtmcli.contrib.fastapi import BranchDep, DtmRoute, PayloadDep
from dtmcli.contrib.starlette import branch_endpoint, branch_payload

SAGA = "gid=G-async&trans_type=saga&branch_id=01"
DTM = "http://dtm.internal:36789/api/dtmsvr"


class Outcome(BaseModel):
    dtm_result: str
    message: str = ""


async def business(kind: str, info: BranchInfo, body: Any = None) -> Any:
    """What every async handler does, whatever the framework; it awaits like real async code."""
    await asyncio.sleep(0)
    assert current_branch_info() == info
    if kind == "failure":
        return {"dtm_result": "FAILURE", "message": "insufficient balance"}
    if kind == "ongoing":
        return {"dtm_result": "ONGOING"}
    if kind == "unknown":
        return {"dtm_result": "MAYBE"}
    if kind == "note":
        return {"note": "the previous attempt ended in FAILURE"}
    if kind == "raise_failure":
        raise DtmFailure("raised")
    if kind == "raise_ongoing":
        raise DtmOngoing("later")
    if kind == "dup":
        raise DtmDuplicated("done before")
    if kind == "crash":
        raise RuntimeError("db down")
    if kind == "dtm":
        return {"dtm": info.require_dtm()}
    if kind == "none":
        return None
    return {"balance": 7, "body": body}


# -- concurrency probe: two requests meet inside their handlers, then each reports its own call ---------------


class Rendezvous:
    """Holds the first ``n`` arrivals on the server's loop until all have arrived (or a timeout)."""

    def __init__(self, n: int = 2) -> None:
        self.n, self.arrived, self.event = n, 0, None  # the Event is made on the serving loop
        self.lock = threading.Lock()

    async def meet(self) -> None:
        with self.lock:
            if self.event is None:
                self.event = asyncio.Event()
            self.arrived += 1
            if self.arrived >= self.n:
                self.event.set()
        event = self.event
        await asyncio.wait_for(event.wait(), 5)


async def probe(info: BranchInfo, meeting: Rendezvous) -> dict[str, Any]:
    before = current_branch_info()
    await meeting.meet()  # the other request has set its call by now
    after = current_branch_info()
    return {"injected": info.gid, "before": before and before.gid, "after": after and after.gid}


# -- servers --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fastapi_server(meeting: Rendezvous) -> Iterator[str]:
    app = FastAPI()
    router = APIRouter(route_class=DtmRoute)

    @router.post("/busi/{kind}")
    async def busi(kind: str, info: BranchDep, body: PayloadDep) -> Any:
        return await business(kind, info, body)

    @router.post("/probe")
    async def probe_route(info: BranchDep) -> Any:
        return await probe(info, meeting)

    @router.post("/model/{result}")
    async def model(result: str, info: BranchDep) -> Outcome:
        return Outcome(dtm_result=result, message="from a model")

    @router.post("/own")
    async def own(info: BranchDep) -> JSONResponse:
        return JSONResponse({"dtm_result": "FAILURE"}, headers={"X-Own": "1"})

    async def refuse_dep(info: BranchDep) -> None:
        if info.gid.startswith("dep-fail"):
            raise DtmFailure("refused by a dependency")

    @router.post("/dep", dependencies=[Depends(refuse_dep)])
    async def dep(info: BranchDep) -> None:
        return None

    @router.post("/sync-sees-its-call")
    def sync_route(info: BranchDep) -> Any:  # thread pool: the context is copied into the worker
        current = current_branch_info()
        return {"same": current == info}

    app.include_router(router)
    with serve_asgi(app) as base:
        yield base


@contextlib.contextmanager
def starlette_server(meeting: Rendezvous) -> Iterator[str]:
    @branch_endpoint
    async def busi(request: Request, info: BranchInfo) -> Any:
        return await business(request.path_params["kind"], info, await branch_payload(request, info))

    @branch_endpoint
    async def probe_ep(request: Request, info: BranchInfo) -> Any:
        return await probe(info, meeting)

    @branch_endpoint
    def sync_ep(request: Request, info: BranchInfo) -> Any:
        return {"same": current_branch_info() == info}

    app = Starlette(routes=[
        Route("/busi/{kind}", busi, methods=["POST"]),
        Route("/probe", probe_ep, methods=["POST"]),
        Route("/sync-sees-its-call", sync_ep, methods=["POST"]),
    ])
    with serve_asgi(app) as base:
        yield base


DJANGO_MEETING: list[Rendezvous] = []


@django_branch_handler
async def django_busi(request: HttpRequest, kind: str, info: BranchInfo) -> Any:
    asyncio.get_running_loop()  # an async view runs on the loop, not through async_to_sync in a thread
    if kind == "native":
        return JsonResponse({"dtm_result": "FAILURE"}, headers={"X-Own": "1"})
    return await business(kind, info, django_payload(request, info))


@django_branch_handler
async def django_probe(request: HttpRequest, info: BranchInfo) -> Any:
    return await probe(info, DJANGO_MEETING[-1])


@django_branch_handler
def django_sync(request: HttpRequest, info: BranchInfo) -> Any:  # under ASGI: sync_to_async, in a thread
    return {"same": current_branch_info() == info}


urlpatterns = [
    path("busi/<str:kind>", django_busi), path("probe", django_probe), path("sync-sees-its-call", django_sync),
]


@contextlib.contextmanager
def django_server(meeting: Rendezvous) -> Iterator[str]:
    import django
    from django.conf import settings
    from django.core.handlers.asgi import ASGIHandler
    from django.test import override_settings

    if not settings.configured:
        settings.configure(
            SECRET_KEY="test", DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}}
        )
        django.setup()
    DJANGO_MEETING.append(meeting)
    with override_settings(
        ROOT_URLCONF=__name__, MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"], ALLOWED_HOSTS=["127.0.0.1"]
    ), serve_asgi(ASGIHandler()) as base:
        yield base


SERVERS: dict[str, Callable[[Rendezvous], Any]] = {
    "fastapi": fastapi_server, "starlette": starlette_server, "django": django_server,
}


@pytest.fixture(params=sorted(SERVERS))
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Rendezvous]]:
    meeting = Rendezvous()
    with SERVERS[request.param](meeting) as base:
        yield base, meeting


def post(base: str, kind: str, op: str, query: str = SAGA, **kw: Any) -> requests.Response:
    kw.setdefault("json", {"amount": 1})
    return requests.post(f"{base}/busi/{kind}?{query}&op={op}", timeout=10, **kw)


# -- the mapping ----------------------------------------------------------------------------------------------


def test_returned_and_raised_outcomes(server: tuple[str, Rendezvous], caplog: pytest.LogCaptureFixture) -> None:
    base, _ = server
    r = post(base, "ok", "action")
    assert r.status_code == 200 and r.json().pop("dtm_result", "SUCCESS") == "SUCCESS"  # FastAPI sends the value
    assert {k: v for k, v in r.json().items() if k != "dtm_result"} == {"balance": 7, "body": {"amount": 1}}
    assert post(base, "none", "compensate").json() == {"dtm_result": "SUCCESS"}
    r = post(base, "failure", "action")
    assert (r.status_code, r.json()) == (409, {"dtm_result": "FAILURE", "message": "insufficient balance"})
    assert post(base, "raise_failure", "action").status_code == 409
    with caplog.at_level(logging.ERROR, logger="dtmcli"):
        for kind in ("failure", "raise_failure"):  # FAILURE is not allowed on a compensation
            r = post(base, kind, "compensate")
            assert r.status_code == 500 and "FAILURE" not in r.text
    assert "op=compensate" in caplog.text
    for kind in ("ongoing", "raise_ongoing"):
        r = post(base, kind, "compensate")
        assert r.status_code == 425 and r.json()["dtm_result"] == "ONGOING"
    assert post(base, "dup", "action").json() == {"dtm_result": "SUCCESS"}
    r = post(base, "unknown", "action")
    assert r.status_code == 500 and "MAYBE" in r.text
    r = post(base, "note", "action")
    assert r.status_code == 500 and "FAILURE" not in r.text


def test_errors_and_bad_requests(server: tuple[str, Rendezvous]) -> None:
    base, _ = server
    assert post(base, "crash", "action").status_code == 500
    r = requests.post(f"{base}/busi/ok?gid=G&op=action", json={}, timeout=10)
    assert r.status_code == 400 and "trans_type" in r.json()["message"]
    r = post(base, "ok", "try")
    assert r.status_code == 400 and "unknown op" in r.json()["message"]
    r = post(base, "ok", "action", json=None, data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not JSON" in r.json()["message"]


def test_concurrent_requests_each_see_their_own_call(server: tuple[str, Rendezvous]) -> None:
    base, _ = server

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client:
            return list(await asyncio.gather(*(
                client.post(f"{base}/probe?gid=G-{n}&trans_type=saga&branch_id=01&op=action") for n in ("a", "b")
            )))

    first, second = asyncio.run(both())
    for r, gid in ((first, "G-a"), (second, "G-b")):
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["injected"], body["before"], body["after"]) == (gid, gid, gid), body


def test_sync_route_in_the_thread_pool_sees_its_call(server: tuple[str, Rendezvous]) -> None:
    base, _ = server
    r = requests.post(f"{base}/sync-sees-its-call?{SAGA}&op=action", timeout=10)
    assert r.status_code == 200 and r.json()["same"] is True


# -- trusted DTM servers ----------------------------------------------------------------------------------------


@pytest.fixture
def trusted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("DTMCLI_SERVER", raising=False)
    monkeypatch.setattr(_dtm_servers, "_warned", False)
    set_dtm_servers(DTM)
    yield
    set_dtm_servers()


def test_forged_dtm_is_400_in_async_handlers(server: tuple[str, Rendezvous], trusted: None) -> None:
    base, _ = server
    tcc = "gid=G-ssrf&trans_type=tcc&branch_id=01"
    r = post(base, "dtm", "try", query=f"{tcc}&dtm=http://127.0.0.1:6379/api/dtmsvr")
    assert r.status_code == 400 and "not a trusted DTM server" in r.json()["message"]
    r = post(base, "dtm", "try", query=f"{tcc}&dtm=HTTP://DTM.internal:36789/api/dtmsvr/")
    assert (r.status_code, r.json()["dtm"]) == (200, "HTTP://DTM.internal:36789/api/dtmsvr/")


# -- framework specifics ----------------------------------------------------------------------------------------


def test_fastapi_models_native_responses_and_dependencies() -> None:
    with fastapi_server(Rendezvous()) as base:
        r = requests.post(f"{base}/model/FAILURE?{SAGA}&op=action", timeout=10)
        assert (r.status_code, r.json()) == (409, {"dtm_result": "FAILURE", "message": "from a model"})
        assert requests.post(f"{base}/model/FAILURE?{SAGA}&op=compensate", timeout=10).status_code == 500
        assert requests.post(f"{base}/model/ONGOING?{SAGA}&op=action", timeout=10).status_code == 425
        r = requests.post(f"{base}/own?{SAGA}&op=action", timeout=10)  # sent unchanged, as for sync routes
        assert (r.status_code, r.json(), r.headers["X-Own"]) == (200, {"dtm_result": "FAILURE"}, "1")
        r = requests.post(f"{base}/dep?gid=dep-fail-1&trans_type=saga&branch_id=01&op=action", timeout=10)
        assert (r.status_code, r.json()["message"]) == (409, "refused by a dependency")
        r = requests.post(f"{base}/dep?gid=dep-fail-1&trans_type=saga&branch_id=01&op=compensate", timeout=10)
        assert r.status_code == 500
        assert requests.post(f"{base}/busi/crash?{SAGA}&op=action", timeout=10).status_code == 500


def test_django_async_view_native_response_and_csrf() -> None:
    with django_server(Rendezvous()) as base:
        r = post(base, "native", "action")  # no CSRF token: DTM sends none
        assert (r.status_code, r.json(), r.headers["X-Own"]) == (200, {"dtm_result": "FAILURE"}, "1")
        r = post(base, "crash", "action")
        assert r.status_code == 500 and "db down" in r.json()["message"]
    assert asyncio.iscoroutinefunction(django_busi) and django_busi.csrf_exempt  # type: ignore[attr-defined]


def test_flask_async_view() -> None:
    import flask

    from dtmcli.contrib.flask import branch_handler
    from dtmcli.contrib.flask import branch_payload as flask_payload

    app = flask.Flask(__name__)

    @app.post("/busi/<kind>")
    @branch_handler
    async def busi(kind: str, info: BranchInfo) -> Any:
        if kind == "native":
            return flask.Response("mine", headers={"X-Own": "1"})
        return await business(kind, info, flask_payload(info))

    client = app.test_client()
    r = client.post(f"/busi/ok?{SAGA}&op=action", json={"amount": 2})
    assert r.get_json() == {"dtm_result": "SUCCESS", "balance": 7, "body": {"amount": 2}}
    assert client.post(f"/busi/failure?{SAGA}&op=action").status_code == 409
    assert client.post(f"/busi/failure?{SAGA}&op=compensate").status_code == 500
    assert client.post(f"/busi/ongoing?{SAGA}&op=action").status_code == 425
    assert client.post(f"/busi/ok?{SAGA}&op=try").status_code == 400
    assert client.post(f"/busi/native?{SAGA}&op=action").data == b"mine"
