"""The coordinator answers or closes every request promptly and keeps serving (issue 10.12).

Hostile requests go raw over a socket; after each, the server must still answer a normal request and
no handler thread may be left waiting on the refused connection while the client keeps it open.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import requests

from dtmcli.testing import Answer, BranchService, DtmTestServer, _engine
from dtmcli.testing._httpserver import MAX_BODY, Server

INT64_MAX = 2**63 - 1


def handler_threads(dtm: DtmTestServer) -> int:
    """Threads serving a connection of ``dtm`` (not of the branch service)."""
    return sum(1 for t in threading.enumerate() if t.name == f"http-{dtm.port}-conn" and t.is_alive())


class Raw:
    """One raw client connection to the coordinator."""

    def __init__(self, dtm: DtmTestServer) -> None:
        self.dtm = dtm
        self.sock = socket.create_connection(("127.0.0.1", dtm.port), timeout=5)

    def request(self, head: str, body: bytes = b"") -> None:
        self.sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)

    def response(self) -> tuple[int, Any]:
        resp = http.client.HTTPResponse(self.sock)
        resp.begin()
        return resp.status, json.loads(resp.read() or b"null")

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, socket.timeout):
            return False

    def close(self) -> None:
        self.sock.close()


def post_head(path: str, *headers: str) -> str:
    return "\n".join([f"POST /api/dtmsvr/{path} HTTP/1.1", "Host: x", "Content-Type: application/json",
                      *headers, ""])


def assert_still_serving(dtm: DtmTestServer) -> None:
    assert requests.get(f"{dtm.base_url}/api/ping", timeout=5).json() == {"msg": "pong"}


def wait_handlers_at_most(dtm: DtmTestServer, count: int) -> None:
    deadline = time.monotonic() + 3
    while handler_threads(dtm) > count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handler_threads(dtm) <= count, "a handler thread is still busy with a refused connection"


REFUSED = [
    pytest.param([post_head("submit", "Content-Length: -1")], 400, id="content-length-negative"),
    pytest.param([post_head("submit", "Content-Length: 12abc")], 400, id="content-length-not-a-number"),
    pytest.param([post_head("submit", "Content-Length: 5", "Content-Length: 7")], 400, id="content-length-twice"),
    pytest.param([post_head("submit", f"Content-Length: {MAX_BODY + 1}")], 413, id="content-length-over-max"),
    pytest.param([post_head("submit", "Content-Length: " + "9" * 40)], 413, id="content-length-huge"),
    pytest.param([post_head("submit", "Transfer-Encoding: chunked"), "FFFFFFFFFFFF\r\n"], 413, id="chunk-huge"),
    pytest.param([post_head("submit", "Transfer-Encoding: chunked"), "-1\r\n"], 400, id="chunk-size-negative"),
    pytest.param([post_head("submit", "Transfer-Encoding: chunked"), "0x10\r\n"], 400, id="chunk-size-0x"),
    pytest.param([post_head("submit", "Transfer-Encoding: chunked"), "2\r\n{}XX\r\n"], 400, id="chunk-no-crlf"),
    pytest.param([post_head("submit", "Transfer-Encoding: gzip")], 501, id="transfer-encoding-gzip"),
]


@pytest.mark.parametrize(("parts", "status"), REFUSED)
def test_bad_framing_is_answered_and_closed_while_the_client_waits(
    dtm_server: DtmTestServer, parts: list[str], status: int
) -> None:
    baseline = handler_threads(dtm_server)
    raw = Raw(dtm_server)
    try:
        raw.request(parts[0], "".join(parts[1:]).encode())
        got, body = raw.response()
        assert got == status and body["message"]
        assert raw.closed_by_server()
        wait_handlers_at_most(dtm_server, baseline)  # our end is still open: the server must not wait on it
    finally:
        raw.close()
    assert_still_serving(dtm_server)
    assert dtm_server.query_json("x") == {"transaction": None, "branches": []}


def raw_json(path: str, body: Any) -> tuple[str, bytes]:
    data = json.dumps(body).encode()
    return post_head(path, f"Content-Length: {len(data)}"), data


def issue_cases(svc: BranchService) -> list[tuple[str, list[tuple[str, bytes]], list[int]]]:
    """The reproductions of issue 10.12, each a list of raw requests and the statuses they get."""
    step = {"action": svc.url("/i/a"), "compensate": svc.url("/i/c")}
    deep_body = ('{"gid":"I","trans_type":"saga","x":' + deep(200_000) + "}").encode()
    return [
        ("content-length -1", [(post_head("submit", "Content-Length: -1"), b"")], [400]),
        ("huge content-length", [(post_head("submit", f"Content-Length: {2**62}"), b"")], [413]),
        ("huge chunk", [(post_head("submit", "Transfer-Encoding: chunked"), b"7FFFFFFFFFFFFFFF\r\n")], [413]),
        ("json 200k deep", [(post_head("submit", f"Content-Length: {len(deep_body)}"), deep_body)], [500]),
        ("orders as a list", [raw_json("submit", {"gid": "I1", "trans_type": "saga", "steps": [step],
                                                  "payloads": ["{}"], "custom_data": '{"orders":[[0]]}'})], [500]),
        ("retry_interval 2**62", [
            raw_json("submit", {"gid": "I2", "trans_type": "saga", "steps": [step], "payloads": ["{}"],
                                "retry_interval": 2**62, "wait_result": True}),
            ("GET /api/dtmsvr/query?gid=I2 HTTP/1.1\nHost: x\n", b""),
            ("GET /api/dtmsvr/all HTTP/1.1\nHost: x\n", b""),
        ], [200, 200, 200]),
    ]


def test_issue_reproductions_raw_then_a_normal_request(dtm_server: DtmTestServer,
                                                       branch_service: BranchService) -> None:
    for name, requests_, statuses in issue_cases(branch_service):
        baseline = handler_threads(dtm_server)
        raw = Raw(dtm_server)
        try:
            got = []
            for head, body in requests_:
                raw.request(head, body)
                got.append(raw.response()[0])
            assert got == statuses, name
        finally:
            raw.close()
        wait_handlers_at_most(dtm_server, baseline)
        assert_still_serving(dtm_server)
    assert dtm_server.query("I2").status == "succeed"  # type: ignore[union-attr]


def test_chunks_adding_up_past_the_limit_are_refused(dtm_server: DtmTestServer, monkeypatch: Any) -> None:
    monkeypatch.setattr(Server, "max_body", 1000)
    raw = Raw(dtm_server)
    try:
        raw.request(post_head("submit", "Transfer-Encoding: chunked"), b"200\r\n" + b" " * 512 + b"\r\n" + b"200\r\n")
        assert raw.response()[0] == 413
        assert raw.closed_by_server()
    finally:
        raw.close()
    body = json.dumps({"gid": "OK", "trans_type": "msg"}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    raw = Raw(dtm_server)
    try:
        raw.request(post_head("prepare", "Transfer-Encoding: chunked"), chunked)
        assert raw.response() == (200, {"dtm_result": "SUCCESS"})
    finally:
        raw.close()


def test_truncated_and_stalled_bodies(dtm_server: DtmTestServer, monkeypatch: Any) -> None:
    raw = Raw(dtm_server)
    try:
        raw.request(post_head("submit", "Content-Length: 100"), b'{"gid":')
        raw.sock.shutdown(socket.SHUT_WR)
        status, body = raw.response()
        assert status == 400 and "ended after 7 of 100 bytes" in body["message"]
    finally:
        raw.close()
    monkeypatch.setattr(Server, "read_timeout", 0.3)
    baseline = handler_threads(dtm_server)
    raw = Raw(dtm_server)
    try:
        raw.request(post_head("submit", "Content-Length: 100"), b'{"gid":')  # and then nothing
        started = time.monotonic()
        assert raw.response()[0] == 408
        assert time.monotonic() - started < 3
        assert raw.closed_by_server()
        wait_handlers_at_most(dtm_server, baseline)
    finally:
        raw.close()
    assert_still_serving(dtm_server)


def test_idle_keep_alive_connection_is_not_timed_out(dtm_server: DtmTestServer, monkeypatch: Any) -> None:
    monkeypatch.setattr(Server, "read_timeout", 0.2)
    raw = Raw(dtm_server)
    try:
        for _ in range(2):
            raw.request("GET /api/ping HTTP/1.1\nHost: x\n")
            assert raw.response() == (200, {"msg": "pong"})
            time.sleep(0.5)  # idle between requests for longer than read_timeout
            assert handler_threads(dtm_server) == 1  # the connection's thread waits for the next request
    finally:
        raw.close()


DRIP_BODY = b'{"gid":"drip","trans_type":"saga"}'
DRIPPED = [  # (sent at once, dripped one byte at a time)
    pytest.param(post_head("prepare", f"Content-Length: {len(DRIP_BODY)}").replace("\n", "\r\n").encode() + b"\r\n",
                 DRIP_BODY, id="body"),
    pytest.param(b"POST /api/dtmsvr/prepare HTTP/1.1\r\n", b"Host: x\r\nContent-Type: application/json\r\n" * 3,
                 id="headers"),
    pytest.param(b"P", b"OST /api/dtmsvr/prepare HTTP/1.1", id="request-line"),
]


def drip_until_answered(raw: Raw, first: bytes, rest: bytes, gap: float) -> float:
    """Send ``first``, then ``rest`` a byte per ``gap`` until the server answers; seconds from the first byte."""
    started = time.monotonic()
    raw.sock.sendall(first)
    for byte in rest:
        readable, _, _ = select.select([raw.sock], [], [], gap)
        if readable:
            break
        raw.sock.sendall(bytes([byte]))
    select.select([raw.sock], [], [], 5)
    return time.monotonic() - started


@pytest.mark.parametrize(("first", "rest"), DRIPPED)
def test_a_dripped_request_gets_408_at_its_deadline(dtm_server: DtmTestServer, monkeypatch: Any,
                                                    first: bytes, rest: bytes) -> None:
    """read_timeout bounds the whole request from its first byte, not each receive (each gap is shorter)."""
    monkeypatch.setattr(Server, "read_timeout", 0.5)
    baseline = handler_threads(dtm_server)
    raw = Raw(dtm_server)
    try:
        elapsed = drip_until_answered(raw, first, rest, gap=0.1)
        assert raw.response()[0] == 408
        assert 0.4 < elapsed < 1.5, elapsed
        assert raw.closed_by_server()
        wait_handlers_at_most(dtm_server, baseline)
    finally:
        raw.close()
    assert_still_serving(dtm_server)


@pytest.mark.parametrize("partial", [b"POST /api/dtmsvr/prepare HTT", b"GET /api/ping HTTP/1.1\r\nHost: x\r\n"],
                         ids=["request-line", "headers"])
def test_a_request_cut_short_gets_408(dtm_server: DtmTestServer, monkeypatch: Any, partial: bytes) -> None:
    """A request line without its CRLF, or headers without their blank line, then silence."""
    monkeypatch.setattr(Server, "read_timeout", 0.3)
    baseline = handler_threads(dtm_server)
    raw = Raw(dtm_server)
    try:
        raw.sock.sendall(partial)
        started = time.monotonic()
        assert raw.response()[0] == 408
        assert time.monotonic() - started < 2
        assert raw.closed_by_server()
        wait_handlers_at_most(dtm_server, baseline)
    finally:
        raw.close()


def test_a_pipelined_partial_request_has_its_deadline_too(dtm_server: DtmTestServer, monkeypatch: Any) -> None:
    """The next request's first bytes came with the previous one: its clock starts without another receive."""
    monkeypatch.setattr(Server, "read_timeout", 0.3)
    baseline = handler_threads(dtm_server)
    raw = Raw(dtm_server)
    try:
        raw.sock.sendall(b"GET /api/ping HTTP/1.1\r\nHost: x\r\n\r\nGET /api/ping HTT")
        assert raw.response() == (200, {"msg": "pong"})
        started = time.monotonic()
        assert raw.response()[0] == 408
        assert time.monotonic() - started < 2
        wait_handlers_at_most(dtm_server, baseline)
    finally:
        raw.close()


def test_a_slow_request_within_its_deadline_is_served(dtm_server: DtmTestServer, monkeypatch: Any) -> None:
    monkeypatch.setattr(Server, "read_timeout", 2.0)
    raw = Raw(dtm_server)
    try:
        raw.sock.sendall(b"GET /api/ping HTTP/1.1\r\n")
        for part in (b"Host: x\r\n", b"X-A: 1\r\n", b"\r\n"):
            time.sleep(0.1)
            raw.sock.sendall(part)
        assert raw.response() == (200, {"msg": "pong"})
        raw.request("GET /api/ping HTTP/1.1\nHost: x\n")  # the connection is kept alive
        assert raw.response() == (200, {"msg": "pong"})
    finally:
        raw.close()


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_a_decode_error_and_the_connection_keeps_serving(dtm_server: DtmTestServer) -> None:
    raw = Raw(dtm_server)
    try:
        submit = ('{"gid":"DEEP","trans_type":"saga","x":' + deep(200_000) + "}").encode()
        raw.request(post_head("submit", f"Content-Length: {len(submit)}"), submit)
        # A body DTM cannot decode is a 500 on /submit (bad_payload_object.json), 400 on registerBranch.
        assert raw.response() == (500, {"message": "exceeded max depth"})
        register = ('{"gid":"DEEP","x":' + deep(200_000) + "}").encode()
        raw.request(post_head("registerBranch", f"Content-Length: {len(register)}"), register)
        assert raw.response() == (400, {"message": "exceeded max depth"})
        custom = json.dumps({"gid": "DEEP", "trans_type": "saga", "custom_data": deep(200_000)}).encode()
        raw.request(post_head("submit", f"Content-Length: {len(custom)}"), custom)
        assert raw.response() == (500, {"message": "exceeded max depth"})
        msg = json.dumps({"gid": "DEEP", "trans_type": "msg", "custom_data": '{"delay":' + deep(5000) + "}"}).encode()
        raw.request(post_head("prepare", f"Content-Length: {len(msg)}"), msg)
        assert raw.response() == (500, {"message": "exceeded max depth"})
        raw.request("GET /api/ping HTTP/1.1\nHost: x\n")  # same connection, still in step
        assert raw.response() == (200, {"msg": "pong"})
    finally:
        raw.close()
    assert dtm_server.query_json("DEEP")["transaction"] is None


@pytest.mark.parametrize(("custom", "message"), [
    ('{"orders":[[0],[1]]}',
     "json: cannot unmarshal array into Go struct field cSagaCustom.orders of type map[int][]int"),
    ('{"orders":"1"}', "json: cannot unmarshal string into Go struct field cSagaCustom.orders of type map[int][]int"),
    ('{"concurrent":1}', "json: cannot unmarshal number 1 into Go struct field cSagaCustom.concurrent of type bool"),
    ('{"concurrent":0}', "json: cannot unmarshal number 0 into Go struct field cSagaCustom.concurrent of type bool"),
    ('{"orders":{"1_0":[0]}}', "saga orders key '1_0' is not a step index"),
    ('{"orders":{" 1":[0]}}', "saga orders key ' 1' is not a step index"),
    ("[1]", "json: cannot unmarshal array into Go value of type dtmsvr.cSagaCustom"),
    ('{"concurrent":NaN}', "invalid character 'N' looking for beginning of value"),
])
def test_bad_saga_custom_data_is_refused_with_a_go_message(api: Any, branch_service: BranchService, custom: str,
                                                          message: str) -> None:
    body = {"gid": "CD", "trans_type": "saga", "payloads": ["{}", "{}"], "custom_data": custom,
            "steps": [{"action": branch_service.url(f"/a{i}"), "compensate": branch_service.url(f"/c{i}")}
                      for i in range(2)]}
    resp = api.post("submit", body)
    assert (resp.status_code, resp.json()) == (500, {"message": message})
    assert api.query("CD")["transaction"] is None and branch_service.calls() == []
    ok = api.post("submit", {**body, "custom_data": '{"concurrent":null,"orders":null}', "wait_result": True})
    assert ok.status_code == 200


def test_msg_delay_beyond_uint64_is_refused(api: Any, branch_service: BranchService) -> None:
    body = {"gid": "MD", "trans_type": "msg", "steps": [{"action": branch_service.url("/m")}], "payloads": ["{}"]}
    resp = api.post("prepare", {**body, "custom_data": json.dumps({"delay": 2**64})})
    assert (resp.status_code, resp.json()) == (
        500, {"message": f"json: cannot unmarshal number {2**64} into Go struct field cMsgCustom.delay of type uint64"})
    assert api.post("prepare", {**body, "custom_data": json.dumps({"delay": 2**64 - 1})}).status_code == 200


def test_int64_options_never_poison_query_or_all(dtm_server: DtmTestServer, api: Any,
                                                 branch_service: BranchService) -> None:
    branch_service.route("/big/a", 500)
    body = {"gid": "BIG", "trans_type": "saga", "retry_interval": 2**62, "timeout_to_fail": INT64_MAX,
            "steps": [{"action": branch_service.url("/big/a"), "compensate": branch_service.url("/big/c")}],
            "payloads": ["{}"]}
    assert api.post("submit", body).status_code == 200
    dtm_server.wait_idle()
    other = api.post("prepare", {"gid": "SMALL", "trans_type": "msg"})
    assert other.status_code == 200
    trans = api.query("BIG")["transaction"]
    assert trans["retry_interval"] == 2**62 and trans["next_cron_time"].startswith("9999-")
    assert trans["next_cron_interval"] == INT64_MAX  # the failed action doubled 2**62: clamped
    listed = api.get("all")
    assert listed.status_code == 200
    assert {t["gid"] for t in listed.json()["transactions"]} == {"BIG", "SMALL"}
    too_big = api.post("submit", {**body, "gid": "BIGGER", "retry_interval": 2**63})
    assert too_big.status_code == 500 and "of type int64" in too_big.json()["message"]


def test_stored_out_of_range_values_are_clamped_after_a_restart(tmp_path: Path,
                                                                  branch_service: BranchService) -> None:
    db = str(tmp_path / "dtm.sqlite")
    branch_service.route("/p/a", 500, 425, 500)
    with DtmTestServer(sqlite_path=db) as dtm:
        requests.post(f"{dtm.url}/submit", timeout=5, json={
            "gid": "P", "trans_type": "saga", "payloads": ["{}"],
            "steps": [{"action": branch_service.url("/p/a"), "compensate": branch_service.url("/p/c")}]})
        dtm.wait_idle()
    with sqlite3.connect(db) as conn:  # as left by an older version, or edited by hand
        (text,) = conn.execute("SELECT body FROM dtm_trans WHERE gid = 'P'").fetchone()
        rec = json.loads(text)
        rec["options"]["retry_interval"] = rec["next_cron_interval"] = 10**400
        rec["next_cron_time"] = rec["create_time"]
        rec["update_time"] = 1e308
        rec["rollback_reason"] = "lone \ud800 surrogate"  # json.dumps escapes it; loading restores it
        conn.execute("UPDATE dtm_trans SET body = ? WHERE gid = 'P'", (json.dumps(rec),))
    with DtmTestServer(sqlite_path=db) as dtm:
        for path in ("/query?gid=P", "/all"):
            assert requests.get(f"{dtm.url}{path}", timeout=5).status_code == 200
        reason = requests.get(f"{dtm.url}/query?gid=P", timeout=5).json()["transaction"]["rollback_reason"]
        assert reason == "lone \ufffd surrogate"
        dtm.advance(1)  # ONGOING keeps the interval: the due time is clamped, not a float overflow
        trans = dtm.query_json("P")["transaction"]
        assert trans["next_cron_interval"] == 10**400 and trans["next_cron_time"].startswith("9999-")
        requests.post(f"{dtm.url}/resetNextCronTime", json={"gid": "P"}, timeout=5)
        dtm.advance(1)  # an error doubles the interval: clamped to int64
        assert dtm.query_json("P")["transaction"]["next_cron_interval"] == INT64_MAX
        assert requests.get(f"{dtm.url}/all", timeout=5).status_code == 200
    assert len(branch_service.calls("/p/a")) == 3


def test_lone_surrogate_escapes_become_replacement_characters(api: Any) -> None:
    # Go's decoder turns an unpaired "\\ud800" into U+FFFD; kept as is, it could not be sent as UTF-8
    # and every later /query or /all showing it would fail.
    raw = b'{"gid":"S\\ud800\\ud83d\\ude00\\uDFFF","trans_type":"msg","custom_data":"{\\"\\\\udc00\\":1}"}'
    assert api.post("prepare", raw=raw).status_code == 200
    listed = api.get("all")
    assert listed.status_code == 200
    trans = listed.json()["transactions"][0]
    assert trans["gid"] == "S\ufffd\U0001f600\ufffd"
    assert api.query("S\ufffd\U0001f600\ufffd")["transaction"]["custom_data"] == '{"\\udc00":1}'


def test_huge_request_timeout_still_calls_the_branch(api: Any, branch_service: BranchService) -> None:
    body = {"gid": "RT", "trans_type": "saga", "request_timeout": 2**62, "wait_result": True,
            "steps": [{"action": branch_service.url("/rt/a"), "compensate": branch_service.url("/rt/c")}],
            "payloads": ["{}"]}
    resp = api.post("submit", body)
    assert (resp.status_code, resp.json()) == (200, {"dtm_result": "SUCCESS"})
    assert [c.path for c in branch_service.calls()] == ["/rt/a"]


@pytest.mark.parametrize(("name", "params"), [
    ("all", {"createTimeStart": "1" + "0" * 400}),
    ("all", {"limit": "1_0"}),
    ("resetCronTime", {"timeout": "9" * 400}),
    ("resetCronTime", {"limit": " 5"}),
])
def test_out_of_range_query_parameters_are_refused(api: Any, name: str, params: dict[str, str]) -> None:
    resp = api.get(name, **params)
    assert resp.status_code == 500 and resp.json()["message"].startswith('strconv.Atoi: parsing "')
    assert api.get(name).status_code == 200


def test_an_unexpected_error_is_answered_not_dropped(dtm_server: DtmTestServer, monkeypatch: Any) -> None:
    def broken(*args: Any) -> Any:
        raise KeyError("bug")

    monkeypatch.setitem(_engine._ROUTES, "version", broken)
    resp = requests.get(f"{dtm_server.url}/version", timeout=5)
    assert (resp.status_code, resp.json()) == (500, {"message": "KeyError: 'bug'"})
    assert_still_serving(dtm_server)


def reply(body: str, status: int = 409) -> Answer:
    return Answer(status, body, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize(("answer", "reason"), [
    (reply('{"dtm_result":"FAILURE","message":"no money"}\n'), '{"dtm_result":"FAILURE","message":"no money"}'),
    (reply(" \t no money\r\n\u3000"), "no money"),
    (reply("no money FAILURE\n", 200), "no money"),  # DTM adds " FAILURE" once, not twice
    (reply("\x1cno money\x1f"), "\x1cno money\x1f"),  # not space to Go's TrimSpace
])
def test_rollback_reason_is_the_trimmed_reply(api: Any, branch_service: BranchService, answer: Answer,
                                             reason: Optional[str]) -> None:
    url = branch_service.route("/tr/a", answer)
    body = {"gid": "TR", "trans_type": "saga", "wait_result": True, "payloads": ["{}"],
            "steps": [{"action": url, "compensate": branch_service.url("/tr/c")}]}
    resp = api.post("submit", body)
    expected = f"url:{url} return failed: {reason} FAILURE"
    assert (resp.status_code, resp.json()) == (409, {"dtm_result": "FAILURE", "message": expected})
    assert api.query("TR")["transaction"]["rollback_reason"] == expected


def test_unknown_branch_result_text_is_trimmed(api: Any, branch_service: BranchService) -> None:
    api.post("prepare", {"gid": "TU", "trans_type": "tcc"})
    api.post("registerBranch", {"gid": "TU", "trans_type": "tcc", "branch_id": "01", "data": "{}",
                                "confirm": branch_service.route("/tu/c", reply("db down\n", 500)),
                                "cancel": branch_service.url("/tu/x")})
    resp = api.post("submit", {"gid": "TU", "trans_type": "tcc", "wait_result": True})
    assert resp.status_code == 500 and resp.json()["message"].endswith(
        "unkown result will be retried: http response status: 500, Message: db down")
