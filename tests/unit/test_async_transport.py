"""The asyncio transports (httpx, aiohttp) against real local servers: the same wire and the same
typed failures as the sync default transport, one pool per event loop, none shared with a forked child."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import select
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

import pytest
from tcp_listener import Listener, read_message
from web_servers import serve_http

from dtmcli import DtmConnectError, DtmConnectTimeout, DtmInvalidInput, DtmTimeout, DtmTransportError
from dtmcli._transport import Urllib3Transport
from dtmcli.asyncio import _transport as transport_module
from dtmcli.asyncio._transport import (
    AiohttpTransport,
    AsyncTransport,
    HttpxTransport,
    default_async_transport,
    request_target,
)

TRANSPORTS = [pytest.param(HttpxTransport, id="httpx"), pytest.param(AiohttpTransport, id="aiohttp")]
Factory = Callable[..., Any]


# -- servers ------------------------------------------------------------------------------------------


class Recorder(BaseHTTPRequestHandler):
    """Records each request (raw target, headers, body, peer) and each closed connection."""

    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.server.seen.append(  # type: ignore[attr-defined]
            {"method": self.command, "target": self.path, "headers": dict(self.headers), "body": body,
             "peer": self.client_address}
        )
        status, extra, out = 200, {}, b'{"dtm_result":"SUCCESS"}'
        if self.path.startswith("/status/"):
            status, out = int(self.path.split("/")[2]), b'{"message":"nope"}'
        elif self.path == "/redirect":
            status, extra = 302, {"Location": "/elsewhere"}
        elif self.path == "/cookie":
            extra = {"Set-Cookie": "sticky=1; Path=/"}
        elif self.path.startswith("/echo"):
            out = self.path.encode()
        self.send_response(status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = _handle

    def finish(self) -> None:
        super().finish()
        self.server.closed.append(self.client_address)  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    with serve_http(Recorder, seen=[], closed=[]) as srv:
        yield srv


def base_of(srv: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}"


class RawServer(Listener):
    """A TCP server running ``answer(conn, stop)`` for each connection in its own thread."""

    def __init__(self, answer: Callable[[socket.socket, threading.Event], None]) -> None:
        self.answer = answer
        self.stop = threading.Event()
        super().__init__()

    def serve(self, conn: socket.socket, number: int) -> None:
        with conn:
            try:
                self.answer(conn, self.stop)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


def read_request(conn: socket.socket, buf: bytearray) -> bytes:
    """The next request head from ``conn`` (its body, per Content-Length, is consumed too); b"" at EOF."""
    message = read_message(conn, buf)
    return message[0] if message is not None else b""


def answer(body: bytes, status: str = "200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status.encode(), len(body), body)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- the wire ------------------------------------------------------------------------------------------


def test_both_implement_the_protocol() -> None:
    assert isinstance(HttpxTransport(), AsyncTransport)
    assert isinstance(AiohttpTransport(), AsyncTransport)


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_status_body_and_headers_round_trip(server: ThreadingHTTPServer, factory: Factory) -> None:
    base = base_of(server)
    sync = Urllib3Transport()
    sync.request("POST", f"{base}/a", body=b'{"x":1}')
    sync.request("POST", f"{base}/a", body=b'{"x":1}', headers={"X-Trace": "1"})
    sync.close()

    async def main() -> list[Any]:
        t = factory(timeout=5)
        try:
            return [
                await t.request("POST", f"{base}/a", body=b'{"x":1}'),
                await t.request("POST", f"{base}/a", body=b'{"x":1}', headers={"X-Trace": "1"}),
                await t.request("GET", f"{base}/status/409"),
                await t.request("PUT", f"{base}/status/503", body=b"{}"),
            ]
        finally:
            await t.aclose()

    ok, _custom, failure, unavailable = run(main())
    assert (ok.status, ok.content) == (200, b'{"dtm_result":"SUCCESS"}')
    assert (failure.status, failure.json()) == (409, {"message": "nope"})
    assert unavailable.status == 503
    seen = server.seen  # type: ignore[attr-defined]
    sync_json, sync_custom, mine_json, mine_custom, get, put = seen
    assert mine_json["body"] == b'{"x":1}' and get["body"] == b"" and put["method"] == "PUT"
    # JSON content type when a body comes without headers; none added to the caller's headers (as urllib3)
    assert sync_json["headers"].get("Content-Type") == mine_json["headers"].get("Content-Type") == "application/json"
    assert "Content-Type" not in sync_custom["headers"] and "Content-Type" not in mine_custom["headers"]
    assert mine_custom["headers"]["X-Trace"] == "1"
    assert len({s["peer"] for s in seen[2:]}) == 1  # keep-alive: one connection for all four


DOTDOT = ".."


def _targets(base: str) -> list[tuple[str, Any]]:
    return [
        (f"{base}/api/dtmsvr/query", {"gid": "a b+c/d?e&f=g~h%i;j'k*(l)!", "x": "Zoë€", "branch_id": "01", "e": ""}),
        (f"{base}/qp?x=1&y=a%20b", {"gid": "G2", "op": "msg"}),
        (f"{base}/qp?", {"gid": "G2"}),
        (f"{base}/p%C3%A4th/Zoë/~a/'x'/a;b|c^d", None),
        (f"{base}/a/{DOTDOT}/b/./c", {"dtm": f"{base}/api/dtmsvr"}),  # dot segments are removed
        (f"{base}/q?a=b+c&d=%7E&e=ö&f=%zz&g=[x]", None),
        (f"{base}/frag#here", {"gid": "G3"}),
        (base, {"gid": "G4"}),
    ]


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_request_target_is_the_sync_transports(server: ThreadingHTTPServer, factory: Factory) -> None:
    """Query parameters (and the URL around them) reach the wire byte for byte as urllib3 sends them."""
    base = base_of(server)
    cases = _targets(base)
    sync = Urllib3Transport()
    for url, params in cases:
        sync.request("GET", url, params=params)
    sync.close()

    async def main() -> None:
        t = factory()
        for url, params in cases:
            await t.request("GET", url, params=params)
        await t.aclose()

    run(main())
    targets = [s["target"] for s in server.seen]  # type: ignore[attr-defined]
    assert targets[len(cases):] == targets[: len(cases)]
    assert targets[0].endswith("?gid=a+b%2Bc%2Fd%3Fe%26f%3Dg~h%25i%3Bj%27k%2A%28l%29%21&x=Zo%C3%AB%E2%82%AC"
                               "&branch_id=01&e=")


def test_request_target_cache_matches_a_full_parse() -> None:
    from urllib3.util import parse_url

    for url, params in _targets("http://Example.COM:80"):
        if params:
            full = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
            assert request_target(url, params) == parse_url(full).url


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_credentials_in_the_url_are_never_sent(server: ThreadingHTTPServer, factory: Factory) -> None:
    """urllib3, the sync default, ignores a URL's userinfo: the async transports send it neither."""
    url = base_of(server).replace("//", "//user:secret@") + "/api/dtmsvr/query"
    sync = Urllib3Transport()
    sync.request("GET", url, params={"gid": "G1"})
    sync.close()

    async def main() -> None:
        t = factory()
        await t.request("GET", url, params={"gid": "G1"})
        await t.request("GET", f"{url}#frag", params={"gid": "G1"})
        await t.aclose()

    run(main())
    seen = server.seen  # type: ignore[attr-defined]
    assert [s["target"] for s in seen] == ["/api/dtmsvr/query?gid=G1"] * 2 + ["/api/dtmsvr/query"]
    assert [s["headers"].get("Authorization") for s in seen] == [None] * 3
    assert "secret" not in request_target(url, {"gid": "G1"}) + request_target(url, None)


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_redirects_are_not_followed_and_cookies_not_kept(server: ThreadingHTTPServer, factory: Factory) -> None:
    base = base_of(server).replace("127.0.0.1", "localhost")  # aiohttp keeps no cookie for an IP address

    async def main() -> int:
        t = factory()
        r = await t.request("GET", f"{base}/redirect")
        await t.request("GET", f"{base}/cookie")
        await t.request("GET", f"{base}/after")
        await t.aclose()
        return r.status

    assert run(main()) == 302
    seen = server.seen  # type: ignore[attr-defined]
    assert [s["target"] for s in seen] == ["/redirect", "/cookie", "/after"]
    assert "Cookie" not in seen[2]["headers"]


# -- typed failures -------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_refused_port_is_a_connect_error(factory: Factory) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DtmConnectError):
        run(factory(timeout=5).request("POST", f"http://127.0.0.1:{port}/x", body=b"{}"))


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_unknown_host_is_a_connect_error(factory: Factory) -> None:
    with pytest.raises(DtmConnectError):  # .invalid never resolves (RFC 6761)
        run(factory(timeout=5).request("POST", "http://dtm.invalid/api/dtmsvr/submit", body=b"{}"))


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_silent_server_times_out_within_the_deadline(factory: Factory) -> None:
    def never(conn: socket.socket, stop: threading.Event) -> None:
        read_request(conn, bytearray())
        stop.wait(10)

    srv = RawServer(never)
    started = time.monotonic()
    try:
        with pytest.raises(DtmTimeout) as info:
            run(factory(timeout=0.3).request("GET", f"{srv.url}/x"))
    finally:
        srv.close()
    assert 0.25 < time.monotonic() - started < 1.5
    assert not isinstance(info.value, DtmConnectError), "the request went out: it may have been processed"


DRIPPED = answer(b'{"transaction":null,"branches":[]}' * 3)


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_dripping_server_hits_the_total_deadline(factory: Factory) -> None:
    """One byte per 0.1 s never trips a per-read timeout; the 0.5 s total deadline ends the call."""

    def drip(conn: socket.socket, stop: threading.Event) -> None:
        buf = bytearray()
        while True:
            head = read_request(conn, buf)
            if not head:
                return
            if b" /drip " not in head:  # the request after the timeout is answered at once
                conn.sendall(answer(b"fresh"))
                continue
            for i in range(len(DRIPPED)):
                if stop.wait(0.1):
                    return
                conn.sendall(DRIPPED[i : i + 1])

    srv = RawServer(drip)

    async def main() -> bytes:
        t = factory(timeout=0.5)
        started = time.monotonic()
        with pytest.raises(DtmTimeout):
            await t.request("GET", f"{srv.url}/drip")
        assert time.monotonic() - started < 1.5, "the deadline is not total"
        r = await t.request("GET", f"{srv.url}/next")  # and the transport is still usable
        await t.aclose()
        return bytes(r.content)

    try:
        assert run(main()) == b"fresh"
    finally:
        srv.close()


# -- a deadline before or after the request went out ----------------------------------------------------


@pytest.fixture
def unreachable() -> Iterator[str]:
    """An address whose TCP connects never complete: a listener whose accept queue is full drops SYNs."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    addr = srv.getsockname()
    fillers = []
    for _ in range(64):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(addr)
        fillers.append(s)
        if not select.select([], [s], [], 0.2)[1]:  # this one hangs: the queue is full
            break
    else:
        pytest.fail("could not fill the listen queue")
    try:
        yield f"http://127.0.0.1:{addr[1]}"
    finally:
        for s in [*fillers, srv]:
            s.close()


def silent_after(answered: int) -> Callable[[socket.socket, threading.Event], None]:
    """A RawServer answer: the first ``answered`` requests of a connection get 200, the next none."""

    def serve(conn: socket.socket, stop: threading.Event) -> None:
        buf = bytearray()
        for _ in range(answered):
            if not read_request(conn, buf):
                return
            conn.sendall(answer(b"{}"))
        read_request(conn, buf)
        stop.wait(10)

    return serve


def _deadline_of(coro: Any) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises(DtmTimeout) as info:
        run(coro)
    return info.value, time.monotonic() - started


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_deadline_while_connecting_is_a_connect_timeout(unreachable: str, factory: Factory) -> None:
    """As the sync transports: nothing was sent, so a submit may be sent again or to another server."""
    exc, took = _deadline_of(factory(timeout=0.4).request("POST", f"{unreachable}/api/dtmsvr/submit", body=b"{}"))
    assert isinstance(exc, DtmConnectTimeout) and isinstance(exc, DtmConnectError), repr(exc)
    assert 0.35 < took < 1.5
    with pytest.raises(DtmConnectTimeout):  # the same answer as the sync default transport
        Urllib3Transport(timeout=0.4).request("POST", f"{unreachable}/x", body=b"{}")


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_deadline_during_the_tls_handshake_is_a_connect_timeout(factory: Factory) -> None:
    srv = RawServer(lambda conn, stop: stop.wait(10))  # accepts, never answers the ClientHello
    try:
        exc, _ = _deadline_of(factory(timeout=0.4).request("GET", srv.url.replace("http:", "https:") + "/x"))
    finally:
        srv.close()
    assert isinstance(exc, DtmConnectTimeout), repr(exc)


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_deadline_at_the_proxy(factory: Factory) -> None:
    """Through a silent proxy: an https target is still connecting (CONNECT unanswered), an http one
    was handed to the proxy, which may have forwarded it."""
    srv = RawServer(silent_after(0))
    try:
        tunnel, _ = _deadline_of(factory(timeout=0.4, proxy_url=srv.url).request("GET", "https://dtm.invalid/x"))
        forward, _ = _deadline_of(factory(timeout=0.4, proxy_url=srv.url).request("GET", "http://dtm.invalid/x"))
    finally:
        srv.close()
    assert isinstance(tunnel, DtmConnectTimeout), repr(tunnel)
    assert not isinstance(forward, DtmConnectError), repr(forward)


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_deadline_on_a_reused_connection_is_not_a_connect_timeout(factory: Factory) -> None:
    srv = RawServer(silent_after(1))

    async def main() -> None:
        t = factory(timeout=0.4)
        assert (await t.request("GET", f"{srv.url}/first")).status == 200
        with pytest.raises(DtmTimeout) as info:
            await t.request("GET", f"{srv.url}/second")  # the same connection: nothing to connect
        assert not isinstance(info.value, DtmConnectError), repr(info.value)
        await t.aclose()

    try:
        run(main())
    finally:
        srv.close()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_deadline_waiting_for_a_free_connection_is_a_connect_timeout(factory: Factory) -> None:
    """The pool's only connection is busy: the second request never left."""
    srv = RawServer(silent_after(0))

    async def main() -> None:
        t = factory(timeout=5, pool_maxsize=1)
        busy = asyncio.ensure_future(t.request("GET", f"{srv.url}/busy"))
        await asyncio.sleep(0.2)
        with pytest.raises(DtmConnectTimeout):
            await t.request("GET", f"{srv.url}/queued", timeout=0.3)
        busy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await busy
        await t.aclose()

    try:
        run(main())
    finally:
        srv.close()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_deadline_with_the_users_client_may_have_been_sent(unreachable: str, factory: Factory) -> None:
    """Another client's connector or transport does not tell when it starts sending: DtmTimeout."""

    async def main() -> None:
        if factory is AiohttpTransport:
            import aiohttp

            own: Any = aiohttp.ClientSession()
        else:
            import httpx

            own = httpx.AsyncClient()
        t = factory(own, timeout=0.3)
        with pytest.raises(DtmTimeout) as info:
            await t.request("GET", f"{unreachable}/x")
        assert not isinstance(info.value, DtmConnectError)
        await (own.close() if factory is AiohttpTransport else own.aclose())

    run(main())


def test_aiohttps_own_connect_timeout_is_a_connect_timeout() -> None:
    """aiohttp raises ConnectionTimeoutError only while connecting (here: a resolver that times out),
    which says "nothing sent" even for a user session."""
    import aiohttp

    class TimingOutResolver(aiohttp.abc.AbstractResolver):
        async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> Any:
            raise asyncio.TimeoutError

        async def close(self) -> None:
            pass

    async def main() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=TimingOutResolver())) as own:
            with pytest.raises(DtmConnectTimeout):
                await AiohttpTransport(own, timeout=5).request("GET", "http://dtm.invalid/x")

    if not hasattr(aiohttp, "ConnectionTimeoutError"):
        pytest.skip("aiohttp < 3.10 has no ConnectionTimeoutError")
    run(main())


def test_async_submit_that_never_left_can_be_sent_again(unreachable: str) -> None:
    """The async client now tells "nothing sent" too: the saga stays new and the next submit goes out."""
    from dtmcli.asyncio import AsyncDtmClient, Saga
    from dtmcli.testing import DtmTestServer

    async def main(dtm_url: str) -> tuple[str, str]:
        client = AsyncDtmClient([f"{unreachable}/api/dtmsvr", dtm_url], timeout=0.5)
        saga = Saga(client).add("http://127.0.0.1:1/busi/a", "http://127.0.0.1:1/busi/b", {})
        with pytest.raises(DtmConnectTimeout):
            await saga.submit()
        first = saga.state
        await saga.submit()  # the unreachable server was set aside: the other one takes it
        status = await client.query_status(saga.gid)
        await client.aclose()
        return first, status

    with DtmTestServer() as dtm:
        assert run(main(dtm.url)) == ("new", "submitted")


# -- cancellation against the deadline --------------------------------------------------------------------


@pytest.mark.parametrize("own_task", [False, True], ids=["same-task", "own-task"])
@pytest.mark.parametrize("cancel_first", [True, False], ids=["cancel-first", "deadline-first"])
@pytest.mark.parametrize("factory", TRANSPORTS)
def test_a_cancel_in_the_iteration_the_deadline_fires_wins(
    factory: Factory, cancel_first: bool, own_task: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``task.cancel()`` and the deadline due in one loop iteration, in either order: the caller's
    cancellation is never turned into DtmTimeout. ``own-task`` is the Python < 3.11 implementation."""
    if not own_task and sys.version_info < (3, 11):
        pytest.skip("Python < 3.11 always runs the request in its own task")
    monkeypatch.setattr(transport_module, "_OWN_TASK", own_task, raising=False)
    srv = RawServer(silent_after(1))
    deadline = 0.3

    async def main() -> None:
        loop = asyncio.get_running_loop()
        t = factory(timeout=5)
        await t.request("GET", f"{srv.url}/warm")  # connected: only the deadline and the cancel remain
        before = loop.time()
        task = asyncio.ensure_future(t.request("GET", f"{srv.url}/hang", timeout=deadline))
        await asyncio.sleep(0)  # its first step has set the deadline, due in [before, after] + deadline
        after = loop.time()
        cancel_at = before + deadline - 0.005 if cancel_first else after + deadline + 0.005
        loop.call_at(cancel_at, task.cancel)
        # Block the loop past both, so that they are run in the same iteration.
        loop.call_at(before + deadline - 0.05, time.sleep, 0.1)
        with pytest.raises(asyncio.CancelledError):
            await task
        await t.aclose()

    try:
        run(main())
    finally:
        srv.close()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_the_callers_timeouts_and_cancellation_are_left_alone(factory: Factory) -> None:
    srv = RawServer(silent_after(0))

    async def main() -> None:
        t = factory(timeout=0.2)
        with pytest.raises(DtmTimeout):
            await t.request("GET", f"{srv.url}/a")
        task = asyncio.current_task()
        assert task is not None
        if sys.version_info >= (3, 11):
            assert task.cancelling() == 0  # the deadline's cancellation was taken back
        await asyncio.sleep(0.01)  # and none is pending
        with pytest.raises(asyncio.TimeoutError):  # the caller's own, shorter deadline is the caller's
            await asyncio.wait_for(factory(timeout=5).request("GET", f"{srv.url}/b"), 0.2)
        await t.aclose()

    try:
        run(main())
    finally:
        srv.close()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_reset_mid_answer_is_a_transport_error(factory: Factory) -> None:
    def reset(conn: socket.socket, stop: threading.Event) -> None:
        read_request(conn, bytearray())
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"dtm_res")
        time.sleep(0.05)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST

    srv = RawServer(reset)
    try:
        with pytest.raises(DtmTransportError) as info:
            run(factory(timeout=5).request("POST", f"{srv.url}/x", body=b"{}"))
    finally:
        srv.close()
    assert not isinstance(info.value, (DtmConnectError, DtmTimeout))


@pytest.mark.parametrize("from_env", [False, True], ids=["proxy_url", "env"])
@pytest.mark.parametrize("factory", TRANSPORTS)
def test_proxy(factory: Factory, from_env: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``proxy_url``, or a proxy variable in the environment (as the sync default honours it)."""
    targets: list[bytes] = []

    def proxy(conn: socket.socket, stop: threading.Event) -> None:
        buf = bytearray()
        while True:
            head = read_request(conn, buf)
            if not head:
                return
            targets.append(head.split(b" ")[1])
            conn.sendall(answer(b"via proxy"))

    srv = RawServer(proxy)
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    if from_env:
        monkeypatch.setenv("HTTP_PROXY", srv.url)
    try:
        t = factory(timeout=5) if from_env else factory(timeout=5, proxy_url=srv.url)
        r = run(t.request("GET", "http://dtm.invalid:36789/api/dtmsvr/query", params={"gid": "G 1"}))
    finally:
        srv.close()
    assert (r.status, r.content) == (200, b"via proxy")
    assert targets == [b"http://dtm.invalid:36789/api/dtmsvr/query?gid=G+1"]


# -- TLS ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"), "-out",
         str(d / "cert.pem"), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return d


@pytest.fixture
def tls_server(tls_cert: Path) -> Iterator[str]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tls_cert / "cert.pem", tls_cert / "key.pem")
    with serve_http(Recorder, seen=[], closed=[]) as srv:
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        yield f"https://127.0.0.1:{srv.server_address[1]}"


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_tls(tls_server: str, tls_cert: Path, factory: Factory) -> None:
    """An untrusted certificate is a transport error, not a connect error (as urllib3's SSLError);
    ``ssl_context`` trusts it."""
    trusting = ssl.create_default_context(cafile=str(tls_cert / "cert.pem"))

    async def main() -> int:
        with pytest.raises(DtmTransportError) as info:
            await factory(timeout=5).request("GET", f"{tls_server}/x")
        assert not isinstance(info.value, (DtmConnectError, DtmTimeout)), info.value
        t = factory(timeout=5, ssl_context=trusting)
        status = (await t.request("GET", f"{tls_server}/x")).status
        await t.aclose()
        return status

    assert run(main()) == 200


# -- pools: the user's client, event loops, cancellation ---------------------------------------------------


@pytest.mark.parametrize("close", [False, True])
def test_user_httpx_client_is_closed_only_when_asked(server: ThreadingHTTPServer, close: bool) -> None:
    import httpx

    async def main() -> None:
        client = httpx.AsyncClient()
        t = HttpxTransport(client, close_client=close)
        assert (await t.request("GET", f"{base_of(server)}/x")).status == 200
        await t.aclose()
        assert client.is_closed is close
        await client.aclose()

    run(main())


@pytest.mark.parametrize("close", [False, True])
def test_user_aiohttp_session_is_closed_only_when_asked(server: ThreadingHTTPServer, close: bool) -> None:
    import aiohttp

    async def main() -> None:
        session = aiohttp.ClientSession()
        t = AiohttpTransport(session, close_session=close)
        assert (await t.request("GET", f"{base_of(server)}/x")).status == 200
        await t.aclose()
        assert session.closed is close
        await session.close()

    run(main())


def test_user_aiohttp_session_raising_for_status_still_gets_dtms_answers(server: ThreadingHTTPServer) -> None:
    """A 409 FAILURE or a 503 is an answer to the flows, not a transport error."""
    import aiohttp

    async def main() -> list[tuple[int, bytes]]:
        async with aiohttp.ClientSession(raise_for_status=True) as session:
            t = AiohttpTransport(session)
            return [((r := await t.request("POST", f"{base_of(server)}/status/{code}", body=b"{}")).status,
                     bytes(r.content)) for code in (409, 425, 503)]

    assert run(main()) == [(409, b'{"message":"nope"}'), (425, b'{"message":"nope"}'), (503, b'{"message":"nope"}')]


@pytest.mark.parametrize("reads_first", [False, True], ids=["hook-only", "hook-reads-body"])
def test_user_httpx_client_raising_for_status_still_gets_dtms_answers(
    server: ThreadingHTTPServer, reads_first: bool
) -> None:
    import httpx

    async def raise_for_status(response: httpx.Response) -> None:
        if reads_first:
            await response.aread()
        response.raise_for_status()

    async def main() -> tuple[int, bytes]:
        async with httpx.AsyncClient(event_hooks={"response": [raise_for_status]}) as client:
            r = await HttpxTransport(client).request("POST", f"{base_of(server)}/status/409", body=b"{}")
            return r.status, bytes(r.content)

    assert run(main()) == (409, b'{"message":"nope"}' if reads_first else b"")


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_closed_user_client_is_invalid_input(server: ThreadingHTTPServer, factory: Factory) -> None:
    """Closed by its owner, or by ``aclose()`` when asked to: DtmInvalidInput, nothing sent (no RuntimeError)."""

    async def main() -> None:
        if factory is AiohttpTransport:
            import aiohttp

            own: Any = aiohttp.ClientSession()
            closing = factory(own, close_session=True)
            await own.close()
        else:
            import httpx

            own = httpx.AsyncClient()
            closing = factory(own, close_client=True)
            await own.aclose()
        with pytest.raises(DtmInvalidInput, match="closed"):
            await factory(own).request("GET", f"{base_of(server)}/x")
        await closing.aclose()
        with pytest.raises(DtmInvalidInput, match="closed"):
            await closing.request("GET", f"{base_of(server)}/x")

    run(main())
    assert server.seen == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_successive_asyncio_runs_each_get_a_pool_closed_with_their_loop(
    server: ThreadingHTTPServer, factory: Factory
) -> None:
    t = factory(timeout=5)
    url = f"{base_of(server)}/x"
    for _ in range(2):
        assert run(t.request("GET", url)).status == 200
    deadline = time.monotonic() + 2
    while len(server.closed) < 2 and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.01)
    peers = [s["peer"] for s in server.seen]  # type: ignore[attr-defined]
    assert peers[0] != peers[1]
    assert sorted(server.closed) == sorted(peers), "asyncio.run() ended a loop without closing its pool"  # type: ignore[attr-defined]
    assert t._pools.by_loop == {}


@pytest.mark.filterwarnings("ignore::ResourceWarning")  # its sockets are closed when collected, unclosed
@pytest.mark.parametrize("factory", TRANSPORTS)
def test_pool_of_a_loop_closed_without_asyncio_run_is_dropped_quietly(
    server: ThreadingHTTPServer, factory: Factory, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    t = factory(timeout=5)
    url = f"{base_of(server)}/x"
    loop = asyncio.new_event_loop()
    assert loop.run_until_complete(t.request("GET", url)).status == 200
    loop.close()  # no shutdown_asyncgens: its pool can no longer be closed
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        assert run(t.request("GET", url)).status == 200
        del loop
        gc.collect()
        assert len(t._pools.by_loop) == 0
        other = asyncio.new_event_loop()  # a transport dropped while its only pool's loop is closed
        t = factory(timeout=5)
        assert other.run_until_complete(t.request("GET", url)).status == 200
        other.close()
        del t, other
        gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    assert not unraisable, [u.exc_value for u in unraisable]


class Quiet:
    """Collects what a dropped pool could complain with: loop errors, unraisable exceptions, warnings."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loop_errors: list[Any] = []
        self.unraisable: list[Any] = []
        monkeypatch.setattr(sys, "unraisablehook", self.unraisable.append)
        self._warnings = warnings.catch_warnings(record=True)
        self.warned = self._warnings.__enter__()
        warnings.simplefilter("always")

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.set_debug(True)  # asyncio then refuses (and reports) loop calls from other threads
        loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context.get("message")))

    def check(self) -> None:
        self._warnings.__exit__(None, None, None)
        slow = "Executing <"  # debug mode's slow-callback notes are not complaints
        assert not self.unraisable, [u.exc_value for u in self.unraisable]
        assert not [m for m in self.loop_errors if not str(m).startswith(slow)], self.loop_errors
        assert not [w for w in self.warned if issubclass(w.category, ResourceWarning)], [str(w.message)
                                                                                        for w in self.warned]


def _drop_and_collect(holder: list[Any]) -> None:
    holder.clear()
    gc.collect()


async def _wait_closed(server: ThreadingHTTPServer, peers: set[Any]) -> None:
    for _ in range(200):
        if peers <= set(server.closed):  # type: ignore[attr-defined]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not closed: {peers - set(server.closed)}")  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["refcount", "gc-cycle", "other-thread", "client"])
@pytest.mark.parametrize("factory", TRANSPORTS)
def test_a_transport_dropped_without_aclose_closes_its_pool_in_its_loop(
    server: ThreadingHTTPServer, factory: Factory, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client made per call, or a shared client evicted from the cache, is never closed: its pool
    is closed inside its loop (no "Unclosed client session", no socket closed from a GC thread)."""
    from dtmcli.asyncio import AsyncDtmClient

    quiet = Quiet(monkeypatch)
    url = f"{base_of(server)}/x"

    async def main() -> None:
        quiet.watch(asyncio.get_running_loop())
        for _ in range(3):
            holder: list[Any] = [factory(timeout=5)]
            if how == "client":  # a client made per call, as AsyncDtmClient(url).query(gid)
                holder = [AsyncDtmClient(f"{base_of(server)}/api/dtmsvr", transport=holder[0])]
                assert await holder[0].ping()
            else:
                assert (await holder[0].request("GET", url)).status == 200
            if how == "gc-cycle":  # only the cyclic GC can free it
                holder.append(holder)
            if how == "other-thread":  # the last reference goes, and GC runs, in another thread
                th = threading.Thread(target=_drop_and_collect, args=(holder,))
                th.start()
                th.join()
            else:
                del holder
                gc.collect()
            await _wait_closed(server, {s["peer"] for s in server.seen})  # type: ignore[attr-defined]

    run(main())
    quiet.check()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_threads_with_their_own_loops_share_a_transport(server: ThreadingHTTPServer, factory: Factory) -> None:
    t = factory(timeout=5)
    url = f"{base_of(server)}/x"
    results: list[int] = []

    async def calls() -> None:
        for _ in range(5):
            results.append((await t.request("GET", url)).status)

    threads = [threading.Thread(target=run, args=(calls(),)) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == [200] * 20


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_cancelled_request_leaves_no_half_read_connection(factory: Factory) -> None:
    """The stalled answer resumes after the cancel, followed by a stale extra answer: a connection
    put back into the pool would hand both to the next request."""
    release = threading.Event()
    stalled = threading.Event()

    def stall(conn: socket.socket, stop: threading.Event) -> None:
        buf = bytearray()
        while True:
            head = read_request(conn, buf)
            if not head:
                return
            target = head.split(b" ")[1]
            if target == b"/stall":
                whole = answer(b'{"stalled":"' + b"x" * 40 + b'"}')
                conn.sendall(whole[:-20])
                stalled.set()
                release.wait(5)
                conn.sendall(whole[-20:] + answer(b'"stale"'))
            else:
                conn.sendall(answer(target))

    srv = RawServer(stall)

    async def main() -> Any:
        t = factory(timeout=5)
        first = asyncio.ensure_future(t.request("GET", f"{srv.url}/stall"))
        while not stalled.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        release.set()
        await asyncio.sleep(0.1)  # the rest and the stale answer are in the old socket by now
        answers = [await t.request("GET", f"{srv.url}/echo?n={i}") for i in range(3)]
        await t.aclose()
        return answers

    try:
        answers = run(main())
    finally:
        srv.close()
    assert [(a.status, a.content) for a in answers] == [(200, f"/echo?n={i}".encode()) for i in range(3)]


# -- fork ----------------------------------------------------------------------------------------------


def _fork(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work`` in a forked child; its JSON report (killed after 10 s)."""
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(rfd)
        code = 1
        try:
            report = work()
            code = 0
        except BaseException as exc:
            report = {"error": repr(exc)}
        try:
            os.write(wfd, json.dumps(report).encode())
        finally:
            os._exit(code)
    os.close(wfd)
    for _ in range(200):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            with os.fdopen(rfd, "rb") as r:
                out: dict[str, Any] = json.loads(r.read() or b'{"error": "no report"}')
            out["exit"] = os.waitstatus_to_exitcode(status)
            return out
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(rfd)
    return {"error": "child hung", "exit": -9}


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@needs_fork
@pytest.mark.parametrize("same_loop", [False, True], ids=["new-loop", "same-loop"])
@pytest.mark.parametrize("factory", TRANSPORTS)
def test_forked_child_never_uses_the_parents_sockets(
    server: ThreadingHTTPServer, factory: Factory, same_loop: bool
) -> None:
    """The parent holds an idle keep-alive connection in a loop that is still open. The child gets
    its own connection, whether it runs a new loop or carries on with the parent's loop object, and
    leaves the parent's connection alone (the parent reuses it afterwards)."""
    t = factory(timeout=5)
    url = f"{base_of(server)}/echo"
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(t.request("GET", f"{url}/parent-1")).status == 200

        def child() -> dict[str, Any]:
            async def calls() -> list[bytes]:
                got = [bytes((await t.request("GET", f"{url}/child-{i}")).content) for i in range(2)]
                await t.aclose()
                return got

            got = loop.run_until_complete(calls()) if same_loop else asyncio.run(calls())
            gc.collect()
            return {"got": [g.decode() for g in got]}

        report = _fork(child)
        assert report.get("exit") == 0, report
        assert report["got"] == ["/echo/child-0", "/echo/child-1"]
        assert loop.run_until_complete(t.request("GET", f"{url}/parent-2")).content == b"/echo/parent-2"
        loop.run_until_complete(t.aclose())
    finally:
        loop.close()
    peers = {s["target"]: s["peer"] for s in server.seen}  # type: ignore[attr-defined]
    assert peers["/echo/parent-1"] == peers["/echo/parent-2"], "the child closed or used the parent's connection"
    assert peers["/echo/child-0"] != peers["/echo/parent-1"], "the child reused the parent's socket"


# -- the default ------------------------------------------------------------------------------------------


def test_default_async_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    from dtmcli.asyncio._transport import AsyncHttp11Transport

    monkeypatch.delenv("DTMCLI_ASYNC_TRANSPORT", raising=False)
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(default_async_transport(), AsyncHttp11Transport)  # the fastest, per the benchmark
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert isinstance(default_async_transport(), AiohttpTransport)  # the fastest that speaks to proxies
    t = default_async_transport(3.0)
    assert t.timeout == 3.0  # type: ignore[attr-defined]
    monkeypatch.setenv("DTMCLI_ASYNC_TRANSPORT", "httpx")
    assert isinstance(default_async_transport(), HttpxTransport)
    monkeypatch.setenv("DTMCLI_ASYNC_TRANSPORT", "carrier-pigeon")
    with pytest.raises(DtmInvalidInput):
        default_async_transport()
    with pytest.raises(DtmInvalidInput):
        AiohttpTransport(timeout=0)
    with pytest.raises(DtmInvalidInput):
        HttpxTransport(pool_maxsize=0)


def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DTMCLI_ASYNC_TRANSPORT", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # the default needs a library only then
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # as if not installed
    assert isinstance(default_async_transport(), HttpxTransport)  # the other one is taken
    monkeypatch.setenv("DTMCLI_ASYNC_TRANSPORT", "aiohttp")
    with pytest.raises(ImportError, match=r"pip install 'dtmcli\[asyncio\]'"):
        default_async_transport()
    monkeypatch.delenv("DTMCLI_ASYNC_TRANSPORT")
    monkeypatch.setitem(sys.modules, "httpx", None)
    with pytest.raises(ImportError, match=r"dtmcli\[asyncio\].*dtmcli\[httpx\]"):
        default_async_transport()
    with pytest.raises(ImportError, match=r"pip install 'dtmcli\[httpx\]'"):
        HttpxTransport()
