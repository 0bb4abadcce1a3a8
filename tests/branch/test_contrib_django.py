"""dtmcli.contrib.django with Django's test Client (CSRF checks on) and RequestFactory."""

from __future__ import annotations

import logging
from typing import Any

import django
import pytest
from django.http import HttpRequest, HttpResponse
from django.test import Client, RequestFactory, override_settings
from django.urls import path

from dtmcli import BranchInfo, DtmFailure, DtmOngoing
from dtmcli.contrib.django import branch_handler, branch_payload

SEEN: list[Any] = []


@branch_handler
def busi(request: HttpRequest, name: str, info: BranchInfo) -> Any:
    body = branch_payload(request, info)
    SEEN.append((name, info, body))
    if name == "fail":
        raise DtmFailure("no")
    if name == "ongoing":
        raise DtmOngoing("wait")
    if name == "native":
        return HttpResponse("mine", status=200)
    return {"ok": 1} if name == "value" else None


urlpatterns = [path("busi/<str:name>", busi)]
Q = "gid=G1&trans_type=xa&branch_id=01"


@pytest.fixture(autouse=True)
def _clear() -> None:
    SEEN.clear()


@pytest.fixture(autouse=True)
def _settings() -> Any:
    # Configure Django only at test time, and only if no other test module did (settings are
    # process-wide); then override just what these tests need.
    from django.conf import settings

    if not settings.configured:
        settings.configure(
            SECRET_KEY="test",
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        )
        django.setup()
    with override_settings(
        ROOT_URLCONF=__name__,
        MIDDLEWARE=["django.middleware.csrf.CsrfViewMiddleware"],
        ALLOWED_HOSTS=["testserver"],
    ):
        yield


@pytest.fixture
def client() -> Client:
    return Client(enforce_csrf_checks=True)


def test_success_without_csrf_token(client: Client) -> None:
    r = client.post(
        f"/busi/ok?{Q}&op=action&phase2_url=http://busi/xa", data=b'{"a":1}', content_type="application/json"
    )
    assert r.status_code == 200 and r.json() == {"dtm_result": "SUCCESS"}
    _name, info, body = SEEN[0]
    assert (info.trans_type, info.op, info.phase2_url, body) == ("xa", "action", "http://busi/xa", {"a": 1})


def test_xa_phase2_post_with_empty_body(client: Client) -> None:
    r = client.post(f"/busi/ok?{Q}&op=commit", data=b"", content_type="application/json")
    assert r.status_code == 200 and SEEN[0][2] is None


def post(client: Client, url: str) -> Any:
    return client.post(url, data=b"{}", content_type="application/json")


def test_outcomes(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    assert post(client, f"/busi/fail?{Q}&op=action").status_code == 409
    with caplog.at_level(logging.ERROR, logger="dtmcli"):
        r = post(client, f"/busi/fail?{Q}&op=rollback")
    assert r.status_code == 500 and b"FAILURE" not in r.content and "op=rollback" in caplog.text
    assert post(client, f"/busi/ongoing?{Q}&op=commit").status_code == 425
    assert post(client, f"/busi/value?{Q}&op=action").json() == {"dtm_result": "SUCCESS", "ok": 1}
    assert post(client, f"/busi/native?{Q}&op=action").content == b"mine"


def test_bad_input_is_400(client: Client) -> None:
    r = client.post("/busi/ok?gid=G1&trans_type=xa&op=action")
    assert r.status_code == 400 and "branch_id" in r.json()["message"]
    r = client.post(f"/busi/ok?{Q}&op=action", data=b"<xml/>", content_type="application/xml")
    assert r.status_code == 400 and "not JSON" in r.json()["message"]
    r = client.post(f"/busi/ok?{Q}&op=try")
    assert r.status_code == 400 and "unknown op" in r.json()["message"]


def test_request_factory() -> None:
    request = RequestFactory().post(f"/busi/ok?{Q}&op=action&dtm=ftp://x")
    r = busi(request, name="ok")
    assert r.status_code == 400 and SEEN == []
    assert busi(RequestFactory().get(f"/busi/ok?{Q}&op=commit"), name="ok").status_code == 200
