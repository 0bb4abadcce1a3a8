"""The lean HTTP/1.1 transport (``Http11Transport``, the default) against real sockets.

First the suites written for the requests/urllib3 transports, run again with this one (wire bytes,
timeouts, total deadlines, fork safety, header smuggling). Then what only a hand-written HTTP client
can get wrong: keep-alive connections the server closed (the stale-connection rule: a request is
sent again only when the server cannot have processed it), stalls, resets, huge and odd bodies
(chunked, read to close, gzip, interim 1xx answers, malformed framing), TLS with a certificate made
here by the openssl CLI, a proxy configured in the environment, threads, and forked children.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import test_deadline as deadline_suite
import test_fork_safety as fork_suite
import test_input_validation as validation_suite
import test_transport as transport_suite
from hypothesis import given, settings
from hypothesis import strategies as st
from tcp_listener import Listener, read_message

from dtmcli import DtmClient, DtmConnectError, DtmInvalidInput, DtmTimeout, DtmTransportError, Msg, _http11, local_gid
from dtmcli._transport import Http11Transport, RequestsTransport, Urllib3Transport, default_transport

# Fixtures of the reused suites, under their own names so pytest finds them here.
server = transport_suite.server
drip = deadline_suite.drip
coordinator = fork_suite.coordinator
peer_server = fork_suite.peer_server
dtm_server = validation_suite.dtm_server
raw_branch = validation_suite.raw_branch

OK = b'{"dtm_result":"SUCCESS"}'


# -- the suites of the other transports, with this one ------------------------------------------


def test_wire_bytes(server: Any) -> None:
    transport_suite.test_wire_bytes(server, Http11Transport)


def test_sends_what_urllib3_sends(server: Any) -> None:
    """Method, target (urllib3's normalisation), query, body and content type are identical."""
    base = f"http://127.0.0.1:{server.server_address[1]}"
    transport_suite.run_calls(Urllib3Transport(), base)
    transport_suite.run_calls(Http11Transport(), base)
    seen = [{k: v for k, v in s.items() if k != "peer"} for s in server.seen]
    assert seen[:3] == seen[3:]
    odd = base + "/a b/" + ".." + "/c?x=1&y=%41#frag"  # a dot segment, a space, a fragment
    for t in (Urllib3Transport(), Http11Transport()):
        t.request("GET", odd, params={"gid": "G 1/ü"})
        t.request("POST", f"http://u:p@127.0.0.1:{server.server_address[1]}/p", body=b"{}")
    assert server.seen[6:8] == [dict(s, peer=server.seen[6 + i]["peer"]) for i, s in enumerate(server.seen[8:10])]


def test_timeout(server: Any) -> None:
    transport_suite.test_timeout(server, Http11Transport)


def test_connection_refused() -> None:
    transport_suite.test_connection_refused(Http11Transport)
    with pytest.raises(DtmConnectError):
        Http11Transport().request("POST", f"http://127.0.0.1:{deadline_suite._closed_port()}/x", body=b"{}")


def test_total_deadline(drip: Any) -> None:
    deadline_suite.test_total_deadline(drip, Http11Transport)


def test_per_call_timeout_argument_is_a_deadline_too(drip: Any) -> None:
    deadline_suite.test_per_call_timeout_argument_is_a_deadline_too(drip, Http11Transport)


def test_client_query_times_out_typed(drip: Any) -> None:
    deadline_suite.test_client_query_times_out_typed(drip, Http11Transport)


def test_a_fast_answer_after_a_timeout_still_works() -> None:
    deadline_suite.test_a_fast_answer_after_a_timeout_still_works(Http11Transport)


def test_one_deadline_across_retries(drip: Any) -> None:
    deadline_suite.test_one_deadline_across_retries(drip, Http11Transport)


def test_client_timeout_defaults_to_the_transports() -> None:
    deadline_suite.test_client_timeout_defaults_to_the_transports(Http11Transport)


def test_timeout_none_means_no_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    deadline_suite.test_timeout_none_means_no_deadline("http11", monkeypatch)
    assert Http11Transport(timeout=None).timeout is None


@pytest.mark.parametrize("bad", [True, 0, -1, float("nan"), float("inf"), 1e10, "5"])
def test_bad_timeout_is_refused_at_construction(bad: Any) -> None:
    with pytest.raises(DtmInvalidInput, match="timeout must be a positive number of seconds"):
        Http11Transport(timeout=bad)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "8"])
def test_bad_pool_size_is_refused(bad: Any) -> None:
    with pytest.raises(DtmInvalidInput, match="pool_maxsize"):
        Http11Transport(pool_maxsize=bad)


fork_only = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


@fork_only
def test_explicit_client_after_fork(coordinator: Any) -> None:
    fork_suite.test_explicit_client_after_fork(coordinator, Http11Transport)


@fork_only
def test_shared_client_after_fork(coordinator: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fork_suite.test_shared_client_after_fork(coordinator, "http11", monkeypatch)


@fork_only
def test_child_gets_fresh_connections_and_leaves_the_parents_alone(peer_server: Any) -> None:
    fork_suite.test_child_drops_inherited_sockets_without_closing_the_parents(peer_server, Http11Transport)


@fork_only
def test_child_threads_renew_the_pool_once(coordinator: Any) -> None:
    fork_suite.test_child_threads_renew_the_pool_once(coordinator, Http11Transport)


@fork_only
def test_renew_lock_held_at_fork(coordinator: Any) -> None:
    client = DtmClient(coordinator.url, transport=Http11Transport())
    client.query(local_gid())
    with _http11._renew_lock:
        report = fork_suite._child_finishes(lambda: {"ok": client.query(local_gid()) is None})
    assert report["ok"] and report["exit"] == 0, report
    client.close()


def test_tcc_try_cannot_smuggle_a_request_to_the_branch(dtm_server: Any, raw_branch: Any) -> None:
    validation_suite.test_tcc_try_cannot_smuggle_a_request_to_the_branch(
        dtm_server, raw_branch, Http11Transport, {"Content-Length": "0"}, validation_suite.SMUGGLED
    )


def test_default_transport_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DTMCLI_TRANSPORT", "")
    assert isinstance(default_transport(), Http11Transport)
    for name, cls in (("http11", Http11Transport), ("urllib3", Urllib3Transport), ("requests", RequestsTransport)):
        monkeypatch.setenv("DTMCLI_TRANSPORT", name)
        assert isinstance(default_transport(), cls)
    monkeypatch.setenv("DTMCLI_TRANSPORT", "")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert isinstance(default_transport(), RequestsTransport)  # this transport speaks to servers directly


# -- a scriptable raw server ---------------------------------------------------------------------


class RawServer(Listener):
    """Accepts connections; ``script(conn, index, request)`` answers each request (``index`` counts
    the requests on that connection) and returns False to stop serving the connection."""

    def __init__(self, script: Callable[[socket.socket, int, bytes], bool], tls: Optional[ssl.SSLContext] = None):
        self.script = script
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.requests: list[tuple[int, bytes]] = []  # (connection number, request head + body)
        super().__init__()

    def serve(self, conn: socket.socket, number: int) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            buf = bytearray()
            index = 0
            while True:
                message = read_message(conn, buf)
                if message is None:
                    return
                request = message[0] + b"\r\n\r\n" + message[1]
                self.requests.append((number, request))
                if not self.script(conn, index, request):
                    return
                index += 1
        except (OSError, ssl.SSLError):
            return
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


def answer(body: bytes = OK, extra: bytes = b"", status: bytes = b"200 OK") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status, len(body), extra, body,
    )


def always(payload: bytes) -> Callable[[socket.socket, int, bytes], bool]:
    def script(conn: socket.socket, index: int, request: bytes) -> bool:
        conn.sendall(payload)
        return True

    return script


def reset(conn: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


@pytest.fixture
def raw() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def make(script: Callable[[socket.socket, int, bytes], bool], tls: Optional[ssl.SSLContext] = None) -> RawServer:
        servers.append(RawServer(script, tls))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


# -- keep-alive and stale connections ------------------------------------------------------------


def test_keep_alive_reuses_one_connection(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(answer()))
    t = Http11Transport()
    for _ in range(5):
        assert t.request("POST", f"{srv.url}/submit", body=b"{}").content == OK
    assert srv.connections == 1 and len(srv.requests) == 5
    t.close()


def test_connection_close_is_honoured(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(answer(extra=b"Connection: close\r\n")))
    t = Http11Transport()
    for _ in range(3):
        assert t.request("GET", f"{srv.url}/x").content == OK
    assert srv.connections == 3


def test_http10_without_keep_alive_is_not_reused(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    t = Http11Transport()
    assert [t.request("GET", f"{srv.url}/x").content for _ in range(2)] == [b"ok", b"ok"]
    assert srv.connections == 2


def closes_after_first(conn: socket.socket, index: int, request: bytes) -> bool:
    """Answers the first request on a connection, then closes it (an idle timeout on the server)."""
    conn.sendall(answer())
    return False


def test_idle_connection_closed_by_the_server_is_replaced(raw: Callable[..., RawServer]) -> None:
    """The poll before reuse sees the server's FIN: the POST goes on a new connection, once."""
    srv = raw(closes_after_first)
    t = Http11Transport()
    for _ in range(3):
        assert t.request("POST", f"{srv.url}/submit", body=b'{"gid":"G"}').content == OK
        time.sleep(0.05)  # let the FIN arrive
    assert srv.connections == 3 and len(srv.requests) == 3


def read_then_close(how: Callable[[socket.socket], None]) -> Callable[[socket.socket, int, bytes], bool]:
    """Answers the first request on each connection; closes on the second without answering."""

    def script(conn: socket.socket, index: int, request: bytes) -> bool:
        if index == 0:
            conn.sendall(answer())
            return True
        how(conn)
        return False

    return script


def test_post_sent_whole_on_a_reused_connection_is_never_resent(raw: Callable[..., RawServer]) -> None:
    """The server read the second POST, then closed: it may have processed it, so no resend."""
    srv = raw(read_then_close(lambda conn: conn.shutdown(socket.SHUT_RDWR)))
    t = Http11Transport()
    t.request("POST", f"{srv.url}/submit", body=b"{}")
    with pytest.raises(DtmTransportError, match="may have been processed") as info:
        t.request("POST", f"{srv.url}/submit", body=b"{}")
    assert not isinstance(info.value, (DtmConnectError, DtmTimeout))
    time.sleep(0.1)
    assert len(srv.requests) == 2 and srv.connections == 1  # not sent a second time


def test_post_reset_after_it_was_read_is_never_resent(raw: Callable[..., RawServer]) -> None:
    srv = raw(read_then_close(reset))
    t = Http11Transport()
    t.request("POST", f"{srv.url}/submit", body=b"{}")
    with pytest.raises(DtmTransportError) as info:
        t.request("POST", f"{srv.url}/submit", body=b"{}")
    assert not isinstance(info.value, (DtmConnectError, DtmTimeout))
    time.sleep(0.1)
    assert len(srv.requests) == 2 and srv.connections == 1


def test_get_closed_before_any_answer_byte_is_resent_once(raw: Callable[..., RawServer]) -> None:
    srv = raw(read_then_close(lambda conn: conn.shutdown(socket.SHUT_RDWR)))
    t = Http11Transport()
    t.request("GET", f"{srv.url}/query")
    assert t.request("GET", f"{srv.url}/query").content == OK  # a safe method: resent on a new connection
    assert len(srv.requests) == 3 and srv.connections == 2


def test_close_on_a_fresh_connection_is_not_resent(raw: Callable[..., RawServer]) -> None:
    srv = raw(lambda conn, index, request: False)  # reads the request, closes without answering
    t = Http11Transport()
    for method in ("GET", "POST"):
        with pytest.raises(DtmTransportError) as info:
            t.request(method, f"{srv.url}/x")
        assert not isinstance(info.value, DtmConnectError)
    time.sleep(0.1)
    assert len(srv.requests) == 2


def test_race_send_fails_on_a_reset_connection_resends(
    raw: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server reset the idle connection just as it was taken (the poll saw nothing yet): the send
    fails, so the request never arrived whole and goes once on a new connection, even a POST."""
    srv = raw(lambda conn, index, request: (conn.sendall(answer()), reset(conn))[0] is not None)
    t = Http11Transport()
    t.request("POST", f"{srv.url}/submit", body=b"{}")
    time.sleep(0.1)  # the RST has arrived
    monkeypatch.setattr(_http11._Conn, "stale", lambda self: False)  # as if the poll came too early
    assert t.request("POST", f"{srv.url}/submit", body=b"{}").content == OK
    assert len(srv.requests) == 2 and srv.connections == 2


def test_race_fin_before_the_post_is_not_resent(raw: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """The same race with a FIN: the send succeeds and only EOF comes back, which cannot be told from
    a server that processed the POST and died: the error is raised, nothing is sent twice."""
    srv = raw(closes_after_first)
    t = Http11Transport()
    t.request("POST", f"{srv.url}/submit", body=b"{}")
    time.sleep(0.1)
    monkeypatch.setattr(_http11._Conn, "stale", lambda self: False)
    with pytest.raises(DtmTransportError, match="may have been processed"):
        t.request("POST", f"{srv.url}/submit", body=b"{}")
    assert len(srv.requests) == 1 and srv.connections == 1


def test_submit_through_the_client_is_not_resent_on_a_dropped_connection(
    raw: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = raw(read_then_close(lambda conn: conn.shutdown(socket.SHUT_RDWR)))
    client = DtmClient(f"{srv.url}/api/dtmsvr", transport=Http11Transport())
    Msg(client, "G-prep").add(f"{srv.url}/busi", {}).prepare(f"{srv.url}/qp")
    msg = Msg(client, "G-sub").add(f"{srv.url}/busi", {})
    with pytest.raises(DtmTransportError):
        msg.submit()
    time.sleep(0.1)
    assert [r[1].split(b" ")[1] for r in srv.requests] == [b"/api/dtmsvr/prepare", b"/api/dtmsvr/submit"]


# -- stalls and resets ------------------------------------------------------------------------------


def test_stalled_server_times_out_within_the_deadline(raw: Callable[..., RawServer]) -> None:
    srv = raw(lambda conn, index, request: time.sleep(5) is not None)
    t = Http11Transport(timeout=0.3)
    started = time.monotonic()
    with pytest.raises(DtmTimeout) as info:
        t.request("POST", f"{srv.url}/x", body=b"{}")
    assert time.monotonic() - started < 1.0
    assert not isinstance(info.value, DtmConnectError)


def test_a_server_that_never_reads_a_big_request_times_out() -> None:
    """The send is bounded by the deadline too."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        t = Http11Transport(timeout=0.5)
        started = time.monotonic()
        with pytest.raises(DtmTimeout):
            t.request("POST", f"http://127.0.0.1:{lsock.getsockname()[1]}/x", body=b"x" * (64 << 20))
        assert time.monotonic() - started < 1.5


def test_reset_mid_answer(raw: Callable[..., RawServer]) -> None:
    def script(conn: socket.socket, index: int, request: bytes) -> bool:
        conn.sendall(answer(b"x" * 1000)[:60])
        time.sleep(0.05)
        reset(conn)
        return False

    srv = raw(script)
    with pytest.raises(DtmTransportError) as info:
        Http11Transport().request("GET", f"{srv.url}/x")
    assert not isinstance(info.value, (DtmConnectError, DtmTimeout))


def test_eof_mid_body(raw: Callable[..., RawServer]) -> None:
    srv = raw(lambda conn, index, request: conn.sendall(answer(b"x" * 1000)[:-10]) is not None and False)
    with pytest.raises(DtmTransportError, match="closed the connection after"):
        Http11Transport().request("GET", f"{srv.url}/x")


# -- bodies and framing -------------------------------------------------------------------------


def test_huge_body_with_content_length(raw: Callable[..., RawServer]) -> None:
    big = os.urandom(1 << 20) * 24  # 24 MiB
    srv = raw(always(answer(big)))
    t = Http11Transport()
    assert t.request("GET", f"{srv.url}/big").content == big
    assert t.request("GET", f"{srv.url}/big").content == big
    assert srv.connections == 1


def test_chunked_body(raw: Callable[..., RawServer]) -> None:
    parts = [os.urandom(n) for n in (1, 4095, 70000, 1 << 20, 3)]
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: 1\r\n\r\n"
    srv = raw(always(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked))
    t = Http11Transport()
    for _ in range(2):
        assert t.request("GET", f"{srv.url}/c").content == b"".join(parts)
    assert srv.connections == 1  # the chunked answer was read exactly: the connection is reused


def test_body_read_to_close(raw: Callable[..., RawServer]) -> None:
    body = os.urandom(300000)

    def script(conn: socket.socket, index: int, request: bytes) -> bool:
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + body)
        return False

    srv = raw(script)
    t = Http11Transport()
    assert t.request("GET", f"{srv.url}/x").content == body
    assert t.request("GET", f"{srv.url}/x").content == body
    assert srv.connections == 2


def test_interim_answers_are_skipped(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + answer()))
    t = Http11Transport()
    assert [t.request("POST", f"{srv.url}/x", body=b"{}").content for _ in range(2)] == [OK, OK]


def test_gzip_body_is_decoded(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(answer(gzip.compress(OK), b"Content-Encoding: gzip\r\n")))
    assert Http11Transport().request("GET", f"{srv.url}/x").content == OK


def test_no_body_statuses_and_head(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(b"HTTP/1.1 204 No Content\r\n\r\n"))
    t = Http11Transport()
    assert t.request("POST", f"{srv.url}/x").status == 204
    assert t.request("POST", f"{srv.url}/x").content == b""
    assert srv.connections == 1
    assert b"Content-Length: 0\r\n" in srv.requests[0][1]  # a bodiless POST still says so


def test_bare_lf_answer(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"))
    assert Http11Transport().request("GET", f"{srv.url}/x").content == b"ok"


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 20 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (_http11.MAX_HEADER_BYTES + 10), "too long"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * 101 + b"\r\n", "more than 100"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed response header"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
    ],
    ids=["not-http", "short-status", "negative-length", "conflicting-lengths", "bad-chunk", "huge-header",
         "many-headers", "no-colon", "101"],
)
def test_malformed_answers_are_transport_errors(raw: Callable[..., RawServer], payload: bytes, match: str) -> None:
    srv = raw(always(payload))
    with pytest.raises(DtmTransportError, match=match) as info:
        Http11Transport(timeout=2).request("GET", f"{srv.url}/x")
    assert not isinstance(info.value, (DtmConnectError, DtmTimeout))


def test_same_length_repeated_is_accepted(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"))
    assert Http11Transport().request("GET", f"{srv.url}/x").content == b"ok"


def test_both_framings_read_by_chunks_and_not_reused(raw: Callable[..., RawServer]) -> None:
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    srv = raw(always(both))
    t = Http11Transport()
    assert [t.request("GET", f"{srv.url}/x").content for _ in range(2)] == [b"ok", b"ok"]
    assert srv.connections == 2


# -- bad input is refused before anything is sent -------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{"Content-Length": "0"}, {"transfer-encoding": "chunked"}, {"Host": "evil"}, {"X-A": "1\r\nX-B: 2"},
     {"X A": "1"}, {"X-A": "\u0100"}, {"X-A": 1}],
)
def test_bad_headers_are_refused_before_sending(raw: Callable[..., RawServer], headers: Any) -> None:
    srv = raw(always(answer()))
    with pytest.raises(DtmInvalidInput):
        Http11Transport().request("POST", f"{srv.url}/x", body=b"{}", headers=headers)
    time.sleep(0.05)
    assert srv.connections == 0


@pytest.mark.parametrize("url", ["ftp://h/x", "http:///x", "http://h:99999/x", "http://[::1/x"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(DtmInvalidInput):
        Http11Transport().request("GET", url)


def test_latin1_header_value_is_sent(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(answer()))
    Http11Transport().request("GET", f"{srv.url}/x", headers={"X-Name": "caf\u00e9"})
    assert b"X-Name: caf\xe9\r\n" in srv.requests[0][1]


# -- TLS ------------------------------------------------------------------------------------------


def make_cert(d: Path, san: str) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make a test certificate")
    key, crt = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
         "-days", "2", "-subj", "/CN=dtmcli-test", "-addext", f"subjectAltName={san}"],
        check=True, capture_output=True, timeout=60,
    )
    return crt, key


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("tls"), "IP:127.0.0.1")


@pytest.fixture(scope="module")
def other_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("tls-other"), "DNS:elsewhere.invalid")


def server_context(cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert)
    return ctx


def test_tls_with_a_trusted_certificate(raw: Callable[..., RawServer], cert: tuple[Path, Path]) -> None:
    srv = raw(always(answer()), tls=server_context(cert))
    t = Http11Transport(ssl_context=ssl.create_default_context(cafile=str(cert[0])))
    for _ in range(3):
        assert t.request("POST", f"{srv.url}/submit", body=b'{"a":1}').content == OK
    assert srv.connections == 1  # keep-alive over TLS
    assert srv.requests[0][1].endswith(b'\r\n\r\n{"a":1}')
    t.close()


def test_tls_untrusted_certificate_is_refused(raw: Callable[..., RawServer], cert: tuple[Path, Path]) -> None:
    srv = raw(always(answer()), tls=server_context(cert))
    with pytest.raises(DtmTransportError, match="CERTIFICATE_VERIFY_FAILED") as info:
        Http11Transport().request("GET", f"{srv.url}/x")  # the default context: system CAs only
    assert not isinstance(info.value, DtmConnectError)
    assert srv.requests == []


def test_tls_host_name_is_checked(raw: Callable[..., RawServer], other_cert: tuple[Path, Path]) -> None:
    srv = raw(always(answer()), tls=server_context(other_cert))  # trusted, but for another name
    ctx = ssl.create_default_context(cafile=str(other_cert[0]))
    with pytest.raises(DtmTransportError, match=r"match|mismatch") as info:
        Http11Transport(ssl_context=ctx).request("GET", f"{srv.url}/x")
    assert not isinstance(info.value, DtmConnectError)
    assert srv.requests == []


def test_tls_idle_connection_closed_is_replaced(raw: Callable[..., RawServer], cert: tuple[Path, Path]) -> None:
    srv = raw(closes_after_first, tls=server_context(cert))
    t = Http11Transport(ssl_context=ssl.create_default_context(cafile=str(cert[0])))
    for _ in range(3):
        assert t.request("POST", f"{srv.url}/submit", body=b"{}").content == OK
        time.sleep(0.05)
    assert len(srv.requests) == 3


def test_tls_handshake_stall_times_out() -> None:
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)  # accepts (the kernel does) but never answers the ClientHello
        started = time.monotonic()
        with pytest.raises(DtmTimeout):
            Http11Transport(timeout=0.3).request("GET", f"https://127.0.0.1:{lsock.getsockname()[1]}/x")
        assert time.monotonic() - started < 1.0


# -- a proxy in the environment -------------------------------------------------------------------


def test_a_configured_proxy_is_used(raw: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """With a proxy in the environment the default transport is the requests one, through the proxy."""
    proxy = raw(always(answer(b'{"gid":"from-proxy"}')))
    monkeypatch.setenv("DTMCLI_TRANSPORT", "")
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = DtmClient("http://dtm.invalid:36789/api/dtmsvr")
    assert isinstance(client.transport, RequestsTransport)
    assert client.new_gid() == "from-proxy"
    assert proxy.requests[0][1].startswith(b"GET http://dtm.invalid:36789/api/dtmsvr/newGid HTTP/1.1\r\n")
    client.close()


# -- threads --------------------------------------------------------------------------------------


def test_threads_get_their_own_answers(raw: Callable[..., RawServer]) -> None:
    def echo(conn: socket.socket, index: int, request: bytes) -> bool:
        body = request.partition(b"\r\n\r\n")[2]
        time.sleep(0.001)
        conn.sendall(answer(body))
        return True

    srv = raw(echo)
    t = Http11Transport(pool_maxsize=4)
    wrong: list[Any] = []

    def worker(n: int) -> None:
        for i in range(50):
            body = json.dumps({"t": n, "i": i}).encode()
            got = t.request("POST", f"{srv.url}/x", body=body).content
            if got != body:
                wrong.append((body, got))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert wrong == []
    assert srv.connections <= 8 + 8  # at most one per thread at a time, plus those over the idle limit
    assert sum(len(v) for v in t._idle.values()) <= 4
    t.close()
    assert t._idle == {}


def test_bytes_past_the_answer_end_the_connection(raw: Callable[..., RawServer]) -> None:
    """A body longer than its Content-Length: the server's framing is out of step, the connection is dropped."""
    srv = raw(always(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"))
    t = Http11Transport()
    assert [t.request("GET", f"{srv.url}/x").content for _ in range(2)] == [b"ok", b"ok"]
    assert srv.connections == 2


def test_close_after_an_interim_answer_is_not_a_stale_connection(raw: Callable[..., RawServer]) -> None:
    """A 100 Continue came back: the server got the request, so even a GET is not sent again."""

    def script(conn: socket.socket, index: int, request: bytes) -> bool:
        if index == 0:
            conn.sendall(answer())
            return True
        conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        return False

    srv = raw(script)
    t = Http11Transport()
    t.request("GET", f"{srv.url}/x")
    with pytest.raises(DtmTransportError, match="in the middle of the response header"):
        t.request("GET", f"{srv.url}/x")
    time.sleep(0.05)
    assert len(srv.requests) == 2


def test_idle_connections_are_kept_for_a_bounded_number_of_hosts(raw: Callable[..., RawServer]) -> None:
    servers = [raw(always(answer())) for _ in range(_http11._MAX_HOSTS + 3)]
    t = Http11Transport()
    for srv in servers:
        t.request("GET", f"{srv.url}/x")
    assert len(t._idle) <= _http11._MAX_HOSTS
    assert sum(len(v) for v in t._idle.values()) <= _http11._MAX_HOSTS
    assert t.request("GET", f"{servers[0].url}/x").content == OK  # a forgotten host gets a new connection
    t.close()


def test_a_str_body_is_sent_as_utf8(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(answer()))
    Http11Transport().request("POST", f"{srv.url}/x", body="Zoë")  # type: ignore[arg-type]
    assert srv.requests[0][1].endswith(b"Content-Length: 4\r\n\r\nZo\xc3\xab")


# -- the embedded servers' faster request parsing (dtmcli.testing._httpserver) ---------------------

_header_line = st.one_of(
    st.builds(
        lambda n, v, e: n + b":" + v + e,
        st.sampled_from([b"Host", b"X-A", b"content-length", b"From", b"a b", b""]),
        st.binary(max_size=6).map(lambda b: b.replace(b"\n", b"")) | st.sampled_from([b" v", b"\tv ", b" a:b"]),
        st.sampled_from([b"\r\n", b"\n"]),
    ),
    st.sampled_from([b" folded\r\n", b"From x\r\n", b"no colon\r\n", b"X: \x85\r\n", b"X: a\rb\r\n", b"X: \x0c\r\n"]),
)


@settings(max_examples=3000, deadline=None)
@given(st.lists(_header_line, max_size=6), st.sampled_from([b"\r\n", b"\n", b""]))
def test_fast_header_parser_builds_what_the_email_parser_builds(lines: list[bytes], end: bytes) -> None:
    """Every header block gives the message http.client.parse_headers (what http.server uses) gives."""
    import http.client
    import io

    from dtmcli.testing._httpserver import _parse_header_lines, _read_header_lines

    raw = b"".join(lines) + end

    def norm(message: Any) -> Any:
        d = dict(vars(message))
        d["defects"] = [repr(x) for x in d["defects"]]
        return type(message), d

    want = norm(http.client.parse_headers(io.BytesIO(raw)))
    assert norm(_parse_header_lines(_read_header_lines(io.BytesIO(raw)), http.client.HTTPMessage)) == want


def test_server_answers_in_one_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Head and body of an answer leave in one send (two sends cost a syscall and a packet each)."""
    import socketserver

    from dtmcli.testing import BranchService

    writes: list[bytes] = []
    real = socketserver._SocketWriter.write  # type: ignore[attr-defined]

    def counting(self: Any, b: Any) -> int:
        writes.append(bytes(b))
        return int(real(self, b))

    monkeypatch.setattr(socketserver._SocketWriter, "write", counting)  # type: ignore[attr-defined]
    with BranchService() as svc:
        svc.route("/a", 200)
        t = Http11Transport()
        assert t.request("POST", svc.url("/a"), body=b"{}").status == 200
        assert t.request("GET", svc.url("/a")).status == 200
    assert len(writes) == 2 and all(w.endswith(b'{"dtm_result": "SUCCESS"}') for w in writes), writes


def test_coordinator_branch_calls(raw: Callable[..., RawServer]) -> None:
    """The embedded coordinator calls branches on this transport; urllib3 keeps the chunked empty POST
    (DTM's xa call) and headers that override framing, which this transport refuses."""
    from dtmcli.testing._branch_client import HttpBranchCaller

    srv = raw(always(answer()))
    caller = HttpBranchCaller()
    query = {"gid": "G 1", "op": "action"}
    assert caller.call("POST", f"{srv.url}/a", query, b"{}", {"Content-Type": "application/json"}, 5.0).status == 200
    assert caller.call("GET", f"{srv.url}/q", query, None, {}, 5.0).status == 200
    assert caller.call("POST", f"{srv.url}/a", query, b"{}", {"Host": "busi.example"}, 5.0).status == 200
    caller.close()
    heads = [r[1].split(b"\r\n\r\n")[0] for r in srv.requests]
    assert heads[0].startswith(b"POST /a?gid=G+1&op=action HTTP/1.1\r\n") and b"User-Agent: python-dtmcli" in heads[0]
    assert heads[1].startswith(b"GET /q?gid=G+1&op=action HTTP/1.1\r\n") and b"User-Agent: python-dtmcli" in heads[1]
    assert b"Host: busi.example" in heads[2] and b"python-urllib3" in heads[2]
