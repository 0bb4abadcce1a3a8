"""Both transports against a real local HTTP server: same bytes on the wire, typed failures."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from web_servers import serve_http

from dtmcli import DtmClient, DtmInvalidInput, DtmTimeout, DtmTransportError, Msg, Saga
from dtmcli._transport import Http11Transport, RequestsTransport, Transport, Urllib3Transport, default_transport


class Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]]

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        u = urlsplit(self.path)
        self.server.seen.append(  # type: ignore[attr-defined]
            {"method": self.command, "path": u.path, "query": dict(parse_qsl(u.query)), "body": body,
             "content_type": self.headers.get("Content-Type"), "peer": self.client_address}
        )
        if u.path.endswith("/slow"):
            time.sleep(0.5)
        out = b'{"dtm_result":"SUCCESS"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _handle

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    with serve_http(Recorder, seen=[]) as srv:
        yield srv


TRANSPORTS = [pytest.param(RequestsTransport, id="requests"), pytest.param(Urllib3Transport, id="urllib3")]


def run_calls(transport: Transport, base: str) -> None:
    dtm = DtmClient(f"{base}/api/dtmsvr", transport=transport)
    Saga(dtm, "G1", retry_interval=2).add(f"{base}/a", f"{base}/c", {"amount": 30, "name": "Zoë"}).submit()
    msg = Msg(dtm, "G2").add(f"{base}/a", "")
    msg.prepare(f"{base}/qp")
    msg.query_prepared_status()
    transport.close()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_wire_bytes(server: ThreadingHTTPServer, factory: Any) -> None:
    base = f"http://127.0.0.1:{server.server_address[1]}"
    run_calls(factory(), base)
    seen = server.seen  # type: ignore[attr-defined]
    assert [(s["method"], s["path"]) for s in seen] == [
        ("POST", "/api/dtmsvr/submit"), ("POST", "/api/dtmsvr/prepare"), ("GET", "/qp"),
    ]
    assert seen[0]["body"] == (
        '{"gid":"G1","trans_type":"saga","steps":[{"action":"BASE/a","compensate":"BASE/c"}],'
        '"payloads":["{\\"amount\\":30,\\"name\\":\\"Zoë\\"}"],"retry_interval":2,"concurrent":false,"protocol":""}'
    ).replace("BASE", base).encode()
    assert seen[0]["content_type"] == "application/json"
    assert seen[2]["body"] == b"" and seen[2]["query"] == {
        "dtm": f"{base}/api/dtmsvr", "gid": "G2", "branch_id": "00", "trans_type": "msg", "op": "msg",
    }
    # keep-alive: every call reused one connection
    assert len({s["peer"] for s in seen}) == 1


def test_both_transports_send_identical_requests(server: ThreadingHTTPServer) -> None:
    base = f"http://127.0.0.1:{server.server_address[1]}"
    run_calls(RequestsTransport(), base)
    run_calls(Urllib3Transport(), base)
    seen = [{k: v for k, v in s.items() if k != "peer"} for s in server.seen]  # type: ignore[attr-defined]
    assert seen[:3] == seen[3:]


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_timeout(server: ThreadingHTTPServer, factory: Any) -> None:
    transport = factory(timeout=0.1)
    with pytest.raises(DtmTimeout):
        transport.request("GET", f"http://127.0.0.1:{server.server_address[1]}/slow")
    transport.close()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_connection_refused(factory: Any) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DtmTransportError) as info:
        factory().request("GET", f"http://127.0.0.1:{port}/x")
    assert not isinstance(info.value, DtmTimeout)


def test_default_transport_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DTMCLI_TRANSPORT", "")
    assert isinstance(default_transport(), Http11Transport)  # the lean transport (issue 15)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert isinstance(default_transport(), RequestsTransport)  # requests honours proxy variables
    monkeypatch.setenv("DTMCLI_TRANSPORT", "urllib3")
    assert isinstance(default_transport(), Urllib3Transport)
    monkeypatch.setenv("DTMCLI_TRANSPORT", "carrier-pigeon")
    with pytest.raises(DtmInvalidInput):
        default_transport()
