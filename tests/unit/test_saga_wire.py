"""Saga submit bodies, pinned to the Go client's recorded bodies (tests/data/traces/goclient_saga_*)."""

from __future__ import annotations

import json

import pytest
import responses
import traces
from traces import BUSI, DTM

from dtmcli import DtmClient, DtmInvalidInput, Saga


@pytest.fixture
def dtm() -> DtmClient:
    return DtmClient(DTM)


def submit_body(rsps: responses.RequestsMock) -> dict[str, object]:
    (call,) = [c for c in rsps.calls if c.request.url == f"{DTM}/submit"]
    assert call.request.method == "POST"
    assert call.request.headers["Content-Type"] == "application/json"
    body: dict[str, object] = json.loads(call.request.body)
    return body


def test_plain_saga_body_matches_go_client(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", json={"dtm_result": "SUCCESS"})
        Saga(dtm, "GID").add(f"{BUSI}/sp/a1", f"{BUSI}/sp/c1", {"amount": 1}).add(
            f"{BUSI}/sp/a2", "", {"amount": 2}
        ).submit()
        assert submit_body(rsps) == traces.request_body("goclient_saga_plain", "/submit")


def test_all_options_saga_body_matches_go_client(dtm: DtmClient) -> None:
    saga = (
        Saga(dtm, "GID", wait_result=True, timeout_to_fail=60)
        .set_retry_interval(7)
        .set_retry_limit(2)
        .set_request_timeout(5)
        .set_branch_headers({"Authorization": "Bearer abc", "X-Tenant": "t1"})
        .add(f"{BUSI}/sa/a1", f"{BUSI}/sa/c1", {"amount": 30, "user_id": 1})
        .add(f"{BUSI}/sa/a2", f"{BUSI}/sa/c2", {"amount": 30, "user_id": 2})
        .add(f"{BUSI}/sa/a3", f"{BUSI}/sa/c3", None)
    )
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", json={"dtm_result": "SUCCESS"})
        saga.submit()
        assert submit_body(rsps) == traces.request_body("goclient_saga_all_options", "/submit")


def test_concurrent_saga_with_orders_matches_go_client(dtm: DtmClient) -> None:
    saga = Saga(dtm, "GID").enable_concurrent()
    for i in (1, 2, 3):
        saga.add(f"{BUSI}/sc/a{i}", f"{BUSI}/sc/c{i}", {"amount": i})
    saga.add_branch_order(2, [0, 1])
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/submit", json={"dtm_result": "SUCCESS"})
        saga.submit()
        body = submit_body(rsps)
    expected = traces.request_body("goclient_saga_concurrent_orders", "/submit")
    assert body == expected
    # custom_data is a JSON *string* (the server rejects an object), orders are 0-based step indexes.
    assert body["custom_data"] == '{"concurrent":true,"orders":{"2":[0,1]}}'


def test_concurrent_saga_without_orders_sends_empty_orders(dtm: DtmClient) -> None:
    saga = Saga(dtm, "GID").enable_concurrent()
    saga.add(f"{BUSI}/sn/a1", f"{BUSI}/sn/c1", {"amount": 1}).add(f"{BUSI}/sn/a2", f"{BUSI}/sn/c2", {"amount": 2})
    assert saga.build_body() == traces.request_body("goclient_saga_concurrent_no_orders", "/submit")


def test_payload_forms(dtm: DtmClient) -> None:
    saga = Saga(dtm, "GID")
    saga.add(f"{BUSI}/a", "", "raw text").add(f"{BUSI}/b", "", b'{"k":"v"}').add(f"{BUSI}/c", "", "")
    saga.add(f"{BUSI}/d", "", {"name": "Zoë", "n": [1, 2.5]})
    assert saga.build_body()["payloads"] == ["raw text", '{"k":"v"}', "", '{"name":"Zoë","n":[1,2.5]}']


@pytest.mark.parametrize(
    "build",
    [
        lambda s: s.submit(),  # no steps
        lambda s: s.add("ftp://x/a", "", {}),
        lambda s: s.add("http://127.0.0.1:8081/a", "not a url", {}),
        lambda s: s.add("http://127.0.0.1:8081/a", "", {"x": object()}),
        lambda s: s.add("http://127.0.0.1:8081/a", "", {"x": float("nan")}),
        lambda s: s.add("http://127.0.0.1:8081/a", "", b"\xff\xfe"),
        lambda s: s.add("http://127.0.0.1:8081/a", "", {}).add_branch_order(0, [0]),
        lambda s: s.add("http://127.0.0.1:8081/a", "", {}).add_branch_order(-1, [0]),
        lambda s: s.add("http://127.0.0.1:8081/a", "", {}).add_branch_order(1, [0]).enable_concurrent().submit(),
        lambda s: s.add("http://127.0.0.1:8081/a", "", {}).add_branch_order(0, [0 + 1]).submit(),
        lambda s: s.add("http://x/a", "", {}).add("http://x/b", "", {}).enable_concurrent()
        .add_branch_order(0, [1]).add_branch_order(1, [0]).submit(),
        lambda s: s.set_retry_limit(-1),
        lambda s: s.set_timeout_to_fail(True),
        lambda s: s.set_branch_headers({"X-A": "line\nbreak"}),
        lambda s: s.set_branch_headers({"bad header": "v"}),
        lambda s: s.set_options(no_such_option=1),
    ],
)
def test_bad_input_is_rejected_before_anything_is_sent(dtm: DtmClient, build: object) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.post(f"{DTM}/submit", json={"dtm_result": "SUCCESS"})
        with pytest.raises(DtmInvalidInput) as info:
            build(Saga(dtm, "GID"))  # type: ignore[operator]
        assert len(rsps.calls) == 0
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "gid", ["", "a" * 129, "has space", "quote'", 'dq"', "semi;colon", "new\nline", "ünï", 12345, None.__class__]
)
def test_bad_gids(dtm: DtmClient, gid: object) -> None:
    with pytest.raises(DtmInvalidInput):
        Saga(dtm, gid)  # type: ignore[arg-type]


def test_gid_limits_accepted(dtm: DtmClient) -> None:
    assert Saga(dtm, "a" * 128).gid == "a" * 128
    assert Saga(dtm, "Az09_-").gid == "Az09_-"


def test_local_gid_by_default(dtm: DtmClient) -> None:
    a, b = Saga(dtm).gid, Saga(dtm).gid
    assert a != b and len(a) == 22


@pytest.mark.parametrize("url", ["", "localhost:36789", "http://", "http://host:notaport/api", "mailto:x@y"])
def test_bad_dtm_url(url: str) -> None:
    with pytest.raises(DtmInvalidInput):
        Saga(url, "GID")


def test_failed_option_update_changes_nothing(dtm: DtmClient) -> None:
    saga = Saga(dtm, "GID", retry_interval=3)
    with pytest.raises(DtmInvalidInput):
        saga.set_options(retry_interval=5, timeout_to_fail="x")
    assert saga.options.retry_interval == 3 and saga.options.timeout_to_fail is None
