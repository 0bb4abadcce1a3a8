"""Regression tests for the review of the lean HTTP/1.1 transports (/tmp/notes/review-transport.md).

Each test runs with the blocking ``Http11Transport`` and the asyncio ``AsyncHttp11Transport`` (one
sans-I/O core, :mod:`dtmcli._h11core`), against real local sockets:

* M1: a request larger than the socket buffers whose head a server acts on (answers, closes
  without reading the body) is never sent again when its method is not safe, and no failure after
  a byte of it left is DtmConnectError/DtmConnectTimeout (the SDK reads those as "nothing was sent"
  and may resubmit, even to another server);
* M2: such an early answer (the embedded coordinator's 413 for a body over 8 MiB) is read after
  the broken pipe / reset on send and returned, as urllib3 does, so the SDK raises DtmServerError;
* M3: a hostile Content-Length or chunk size commits no memory up front, ends in a typed error and
  keeps the deadline;
* minors: multi-member gzip, ``Transfer-Encoding: gzip, chunked``, a head ending in ``\\n\\r\\n``,
  a decompression bomb (bounded size and time), ``http11`` chosen while a proxy is configured.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import socket
import struct
import threading
import time
import tracemalloc
import types
import zlib
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
from tcp_listener import Listener

from dtmcli import DtmClient, DtmConnectError, DtmServerError, DtmTimeout, DtmTransportError, Msg, _http11
from dtmcli import _h11core as h11
from dtmcli._protocol import Response
from dtmcli._transport import Http11Transport, default_transport
from dtmcli.asyncio import AsyncDtmClient
from dtmcli.asyncio import Msg as AsyncMsg
from dtmcli.asyncio._transport import AsyncHttp11Transport, default_async_transport
from dtmcli.testing import DtmTestServer

OK = b'{"dtm_result":"SUCCESS"}'
BIG = 32 << 20  # far more than loopback's socket buffers: the send is still going when the server closes

KINDS = ["sync", "async"]


# -- one transport of either kind, a few calls in a row ------------------------------------------------


def calls(kind: str, *requests: tuple[str, str, Optional[bytes]], timeout: float = 10) -> list[Any]:
    """Run ``requests`` (method, url, body) one after another on one transport of ``kind``: each
    outcome is the Response or the exception raised."""
    if kind == "sync":
        t = Http11Transport(timeout=timeout)
        out: list[Any] = []
        for method, url, body in requests:
            try:
                out.append(t.request(method, url, body=body))
            except Exception as exc:
                out.append(exc)
        t.close()
        return out

    async def main() -> list[Any]:
        t = AsyncHttp11Transport(timeout=timeout)
        res: list[Any] = []
        for method, url, body in requests:
            try:
                res.append(await t.request(method, url, body=body))
            except Exception as exc:
                res.append(exc)
        await t.aclose()
        return res

    return asyncio.run(main())


def timed_call(kind: str, method: str, url: str, body: Optional[bytes], timeout: float) -> tuple[Any, float, int]:
    """One call on a fresh transport: outcome, seconds taken, peak bytes allocated (tracemalloc)."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        (outcome,) = calls(kind, (method, url, body), timeout=timeout)
        return outcome, time.monotonic() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# -- a server that acts on a request's head ------------------------------------------------------------


class HeadServer(Listener):
    """Answers GET at once (keep-alive). For anything else it calls ``on_head(server, conn, head)``
    as soon as the head arrived, without reading the body; the handler answers (or not) and closes."""

    def __init__(self, on_head: Callable[[HeadServer, socket.socket, bytes], None]) -> None:
        self.on_head = on_head
        self.acted: list[bytes] = []  # request lines acted on
        super().__init__()

    def serve(self, conn: socket.socket, number: int) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                if head.startswith(b"GET "):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    continue
                self.acted.append(head.split(b"\r\n", 1)[0])
                self.on_head(self, conn, head)
                return
        except OSError:
            return
        finally:
            conn.close()

    def stop_listening(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def rst_close(conn: socket.socket) -> None:
    """Close with the body unread, as a server does: the kernel answers the client's data with RST."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


EARLY = b"HTTP/1.1 200 OK\r\nContent-Length: 24\r\nConnection: close\r\n\r\n" + OK


def answer_early(server: HeadServer, conn: socket.socket, head: bytes) -> None:
    conn.sendall(EARLY)
    time.sleep(0.05)  # the answer is on its way before the RST
    rst_close(conn)


def drop_silently(server: HeadServer, conn: socket.socket, head: bytes) -> None:
    rst_close(conn)


def drop_and_go_away(server: HeadServer, conn: socket.socket, head: bytes) -> None:
    server.stop_listening()  # a restart, a failover: new connections are refused
    rst_close(conn)


@pytest.fixture
def head_server() -> Iterator[Callable[..., HeadServer]]:
    servers: list[HeadServer] = []

    def make(on_head: Callable[[HeadServer, socket.socket, bytes], None]) -> HeadServer:
        servers.append(HeadServer(on_head))
        return servers[-1]

    yield make
    for s in servers:
        s.stop_listening()


def not_connect_error(outcome: Any) -> None:
    """A failure after bytes of the request left: "may have been processed", never "nothing sent"."""
    assert isinstance(outcome, DtmTransportError), outcome
    assert not isinstance(outcome, DtmConnectError), f"{type(outcome).__name__}: {outcome}"


# -- M1: no resend of what a server may have acted on ----------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reused", [True, False], ids=["reused", "fresh"])
def test_m1_big_post_acted_on_by_its_head_is_never_resent(
    kind: str, reused: bool, head_server: Callable[..., HeadServer]
) -> None:
    """The server acts on the head of a 32 MiB POST, answers and closes: the POST reaches it once."""
    srv = head_server(answer_early)
    warm = [("GET", f"{srv.url}/warm", None)] if reused else []
    *_, outcome = calls(kind, *warm, ("POST", f"{srv.url}/confirm?gid=G1&branch_id=01", b"{" + b" " * BIG + b"}"))
    time.sleep(0.2)
    assert len(srv.acted) == 1, (srv.acted, outcome)
    if not isinstance(outcome, Response):
        not_connect_error(outcome)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reused", [True, False], ids=["reused", "fresh"])
def test_m1_big_post_dropped_after_its_head_is_not_resent(
    kind: str, reused: bool, head_server: Callable[..., HeadServer]
) -> None:
    """The server acts on the head and resets without answering: "may have been processed", once."""
    srv = head_server(drop_silently)
    warm = [("GET", f"{srv.url}/warm", None)] if reused else []
    *_, outcome = calls(kind, *warm, ("POST", f"{srv.url}/api/dtmsvr/submit", b"{" + b" " * BIG + b"}"))
    time.sleep(0.2)
    assert len(srv.acted) == 1, srv.acted
    not_connect_error(outcome)


@pytest.mark.parametrize("kind", KINDS)
def test_m1_failure_after_bytes_left_is_never_a_connect_error(
    kind: str, head_server: Callable[..., HeadServer]
) -> None:
    """The server acts on the head, resets and stops listening: a reconnect would be refused, which
    must not come out as DtmConnectError ("certainly not sent") for a POST the server acted on."""
    srv = head_server(drop_and_go_away)
    *_, outcome = calls(
        kind, ("GET", f"{srv.url}/warm", None), ("POST", f"{srv.url}/api/dtmsvr/submit", b"{" + b" " * BIG + b"}")
    )
    assert len(srv.acted) == 1, srv.acted
    not_connect_error(outcome)


@pytest.mark.parametrize("kind", KINDS)
def test_m1_submit_through_the_client_is_not_resent(kind: str, head_server: Callable[..., HeadServer]) -> None:
    """Through the SDK (a 9 MiB payload): the submit reaches the server once, whatever is raised."""
    srv = head_server(drop_silently)
    big = {"x": "y" * (BIG // 4)}

    if kind == "sync":
        client = DtmClient(f"{srv.url}/api/dtmsvr", transport=Http11Transport())
        client.transport.request("GET", f"{srv.url}/warm")
        with pytest.raises(DtmTransportError) as info:
            Msg(client, "G-sub").add(f"{srv.url}/busi", big).submit()
        client.close()
    else:

        async def main() -> Any:
            client = AsyncDtmClient(f"{srv.url}/api/dtmsvr", transport=AsyncHttp11Transport())
            await client.transport.request("GET", f"{srv.url}/warm")
            with pytest.raises(DtmTransportError) as caught:
                await AsyncMsg(client, "G-sub").add(f"{srv.url}/busi", big).submit()
            await client.aclose()
            return caught

        info = asyncio.run(main())
    time.sleep(0.2)
    assert [line.split(b" ")[1] for line in srv.acted] == [b"/api/dtmsvr/submit"]
    not_connect_error(info.value)


# -- M2: early answers are read --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reused", [True, False], ids=["reused", "fresh"])
def test_m2_early_answer_is_returned(kind: str, reused: bool, head_server: Callable[..., HeadServer]) -> None:
    srv = head_server(answer_early)
    warm = [("GET", f"{srv.url}/warm", None)] if reused else []
    *_, outcome = calls(kind, *warm, ("POST", f"{srv.url}/confirm", b"{" + b" " * BIG + b"}"))
    assert isinstance(outcome, Response), f"{type(outcome).__name__}: {outcome}"
    assert (outcome.status, outcome.content) == (200, OK)


@pytest.fixture(scope="module")
def coordinator() -> Iterator[DtmTestServer]:
    with DtmTestServer() as dtm:
        yield dtm


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reused", [True, False], ids=["reused", "fresh"])
def test_m2_the_coordinators_413_is_returned(kind: str, reused: bool, coordinator: DtmTestServer) -> None:
    """A body over the embedded coordinator's 8 MiB: it answers 413 and closes without reading it."""
    big = json.dumps({"gid": "g413", "trans_type": "saga", "steps": [], "payloads": ["x" * (12 << 20)]}).encode()
    warm = [("GET", f"{coordinator.url}/newGid", None)] if reused else []
    *_, outcome = calls(kind, *warm, ("POST", f"{coordinator.url}/submit", big))
    assert isinstance(outcome, Response), f"{type(outcome).__name__}: {outcome}"
    assert outcome.status == 413 and b"8388608" in outcome.content


@pytest.mark.parametrize("kind", KINDS)
def test_m2_oversized_prepare_is_a_server_error_sent_once(kind: str, coordinator: DtmTestServer) -> None:
    """Msg.prepare (idempotent, so retried on transport errors) with a 9 MiB payload: DtmServerError(413)
    after one attempt, not a transport error after several with the whole body each time."""
    payload = {"x": "y" * (9 << 20)}
    sent: list[str] = []

    if kind == "sync":
        client = DtmClient(coordinator.url, transport=Http11Transport(), timeout=10)
        real = client.transport.request

        def counting(method: str, url: str, **kw: Any) -> Any:
            sent.append(url)
            return real(method, url, **kw)

        client.transport.request = counting  # type: ignore[method-assign]
        gid = client.new_gid()
        with pytest.raises(DtmServerError) as info:
            Msg(client, gid).add("http://127.0.0.1:1/a", payload).prepare("http://127.0.0.1:1/qp")
        client.close()
    else:

        async def main() -> Any:
            client = AsyncDtmClient(coordinator.url, transport=AsyncHttp11Transport(), timeout=10)
            real = client.transport.request

            async def counting(method: str, url: str, **kw: Any) -> Any:
                sent.append(url)
                return await real(method, url, **kw)

            client.transport.request = counting  # type: ignore[method-assign]
            gid = await client.new_gid()
            with pytest.raises(DtmServerError) as caught:
                await AsyncMsg(client, gid).add("http://127.0.0.1:1/a", payload).prepare("http://127.0.0.1:1/qp")
            await client.aclose()
            return caught

        info = asyncio.run(main())
    assert info.value.status == 413
    assert len([u for u in sent if u.endswith("/prepare")]) == 1, sent


def test_m2_async_early_answer_read_after_asyncio_stopped_reading(
    head_server: Callable[..., HeadServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reset is already there when asyncio writes the body: its write fails at once and asyncio
    stops reading the socket; the answer the server sent before its reset is read all the same."""
    srv = head_server(answer_early)
    real_write = asyncio.selector_events._SelectorSocketTransport.write  # type: ignore[attr-defined]

    def late_write(self: Any, data: Any) -> None:
        if len(data) > 1 << 20:  # the body: let the server answer the head and reset first
            time.sleep(0.3)
        real_write(self, data)

    monkeypatch.setattr(asyncio.selector_events._SelectorSocketTransport, "write", late_write)  # type: ignore[attr-defined]
    (outcome,) = calls("async", ("POST", f"{srv.url}/confirm", b"{" + b" " * BIG + b"}"))
    assert isinstance(outcome, Response), f"{type(outcome).__name__}: {outcome}"
    assert (outcome.status, outcome.content) == (200, OK)
    assert len(srv.acted) == 1


# -- M3: hostile framing -----------------------------------------------------------------------------------


def _serve_once(payload: bytes, hold: float = 3.0) -> tuple[str, Callable[[], None]]:
    """A server that reads a request, writes ``payload`` and holds the connection ``hold`` seconds."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    def one(conn: socket.socket) -> None:
        try:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            conn.sendall(payload)
            time.sleep(hold)
        except OSError:
            pass
        finally:
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{sock.getsockname()[1]}", sock.close


@pytest.fixture
def serve_once() -> Iterator[Callable[..., str]]:
    stops: list[Callable[[], None]] = []

    def make(payload: bytes, hold: float = 3.0) -> str:
        url, stop = _serve_once(payload, hold)
        stops.append(stop)
        return url

    yield make
    for stop in stops:
        stop()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "head",
    [b"Content-Length: 2000000000\r\n\r\n{", b"Transfer-Encoding: chunked\r\n\r\n77359400\r\n{"],
    ids=["content-length", "chunk-size"],
)
def test_m3_huge_announced_length_commits_no_memory_and_keeps_the_deadline(
    kind: str, head: bytes, serve_once: Callable[..., str]
) -> None:
    """2 GB announced, one byte sent, then a stall: DtmTimeout on time, no 2 GB buffer."""
    url = serve_once(b"HTTP/1.1 200 OK\r\n" + head)
    outcome, took, peak = timed_call(kind, "POST", f"{url}/api/dtmsvr/submit", b"{}", timeout=0.5)
    assert isinstance(outcome, DtmTimeout), outcome
    assert took < 1.5
    assert peak < 64 << 20, f"{peak >> 20} MiB allocated"


@pytest.mark.parametrize("kind", KINDS)
def test_m3_a_40_digit_chunk_size_is_a_typed_error(kind: str, serve_once: Callable[..., str]) -> None:
    url = serve_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\nabc")
    outcome, took, peak = timed_call(kind, "POST", f"{url}/api/dtmsvr/submit", b"{}", timeout=2)
    assert isinstance(outcome, DtmTransportError) and not isinstance(outcome, DtmTimeout), outcome
    assert "chunk size" in str(outcome)
    assert took < 1 and peak < 64 << 20


# -- minors ----------------------------------------------------------------------------------------------


def _with_length(head: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + head + b"Content-Length: %d\r\n\r\n" % len(body) + body


@pytest.mark.parametrize("kind", KINDS)
def test_multi_member_gzip_is_decoded_whole(kind: str, serve_once: Callable[..., str]) -> None:
    url = serve_once(_with_length(b"Content-Encoding: gzip\r\n", gzip.compress(b"he") + gzip.compress(b"llo")))
    (outcome,) = calls(kind, ("GET", f"{url}/q", None), timeout=2)
    assert isinstance(outcome, Response) and outcome.content == b"hello", outcome


@pytest.mark.parametrize("kind", KINDS)
def test_gzip_with_trailing_junk_is_ignored_as_urllib3_does(kind: str, serve_once: Callable[..., str]) -> None:
    """Garbage after a complete gzip member is ignored, as urllib3 (and gzip -d) do; a truncated member is not."""
    url = serve_once(_with_length(b"Content-Encoding: gzip\r\n", gzip.compress(b"hello") + b"JUNK"))
    (outcome,) = calls(kind, ("GET", f"{url}/q", None), timeout=2)
    assert isinstance(outcome, Response) and outcome.content == b"hello", outcome
    url = serve_once(_with_length(b"Content-Encoding: gzip\r\n", gzip.compress(b"hello" * 100)[:-12]))
    (outcome,) = calls(kind, ("GET", f"{url}/q", None), timeout=2)
    assert isinstance(outcome, DtmTransportError) and not isinstance(outcome, DtmTimeout), outcome


@pytest.mark.parametrize("kind", KINDS)
def test_gzip_transfer_coding_is_decoded_or_refused(kind: str, serve_once: Callable[..., str]) -> None:
    """``Transfer-Encoding: gzip, chunked``: never the still-compressed bytes as the body."""
    gz = gzip.compress(b"hello")
    url = serve_once(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n" + b"%x\r\n" % len(gz) + gz + b"\r\n0\r\n\r\n"
    )
    (outcome,) = calls(kind, ("GET", f"{url}/q", None), timeout=2)
    if isinstance(outcome, Response):
        assert outcome.content == b"hello"
    else:
        assert isinstance(outcome, DtmTransportError) and not isinstance(outcome, DtmTimeout), outcome


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("payload", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok", b"ok"),  # an LF line, then a CRLF blank line
        (b"HTTP/1.1 200 OK\nContent-Length: 6\n\nab\r\n\r\n", b"ab\r\n\r\n"),  # bare LF head, CRLFCRLF in the body
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\nok", b"ok"),  # a CRLF line, then a bare LF blank line
    ],
    ids=["lf-crlf", "lf-head-crlf-body", "crlf-lf"],
)
def test_head_terminators_http_client_accepts(
    kind: str, payload: bytes, body: bytes, serve_once: Callable[..., str]
) -> None:
    url = serve_once(payload)
    started = time.monotonic()
    (outcome,) = calls(kind, ("GET", f"{url}/q", None), timeout=2)
    assert isinstance(outcome, Response) and outcome.content == body, outcome
    assert time.monotonic() - started < 1


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """256 MiB of zeros in about 256 KiB of gzip."""
    co = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    return b"".join(co.compress(chunk) for _ in range(256)) + co.flush()


@pytest.mark.parametrize("kind", KINDS)
def test_decompression_bomb_is_bounded(kind: str, bomb: bytes, serve_once: Callable[..., str]) -> None:
    url = serve_once(_with_length(b"Content-Encoding: gzip\r\n", bomb))
    outcome, took, peak = timed_call(kind, "GET", f"{url}/q", None, timeout=5)
    assert isinstance(outcome, DtmTransportError) and not isinstance(outcome, DtmTimeout), outcome
    assert "decoded" in str(outcome) or "too large" in str(outcome), outcome
    assert peak < 128 << 20, f"{peak >> 20} MiB allocated"
    assert took < 3


def test_a_large_decode_checks_the_deadline(serve_once: Callable[..., str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the size cap, decoding still gives the driver a look at the deadline between steps: with
    a clock advancing 0.1 s at each look, 32 MiB decoded with a 1 s timeout is a DtmTimeout."""
    co = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zipped = b"".join(co.compress(bytes(1 << 20)) for _ in range(32)) + co.flush()
    url = serve_once(_with_length(b"Content-Encoding: gzip\r\n", zipped))
    t = Http11Transport(timeout=1)
    clock = [time.monotonic()]

    def monotonic() -> float:
        clock[0] += 0.1
        return clock[0]

    monkeypatch.setattr(_http11, "time", types.SimpleNamespace(monotonic=monotonic, perf_counter=time.perf_counter))
    with pytest.raises(DtmTimeout):
        t.request("GET", f"{url}/q")
    monkeypatch.undo()
    t.close()


def test_the_core_yields_check_while_decoding() -> None:
    """The sans-I/O core: a large decode yields CHECK between steps (the asyncio driver's hook too)."""
    co = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zipped = b"".join(co.compress(bytes(1 << 20)) for _ in range(8)) + co.flush()
    flow = h11.read_response("GET")
    ops = [next(flow)]
    try:
        ops.append(flow.send(_with_length(b"Content-Encoding: gzip\r\n", zipped)))
        while True:
            ops.append(flow.send(None))  # type: ignore[arg-type]
    except StopIteration as done:
        status, body, keep = done.value
    assert (status, len(body), keep) == (200, 8 << 20, True)
    assert ops.count(h11.CHECK) >= 6


def _proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")


def test_http11_chosen_with_a_proxy_configured_warns(monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    """DTMCLI_TRANSPORT=http11 is honoured, but the ignored proxy is said (once) at WARNING."""
    _proxy_env(monkeypatch)
    monkeypatch.setenv("DTMCLI_TRANSPORT", "http11")
    with caplog.at_level(logging.WARNING, logger="dtmcli"):
        t = default_transport()
    assert isinstance(t, Http11Transport)
    assert any("proxy" in r.getMessage().lower() for r in caplog.records if r.levelno >= logging.WARNING)


def test_async_http11_chosen_with_a_proxy_configured_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: Any, serve_once: Callable[..., str]
) -> None:
    """The same for DTMCLI_ASYNC_TRANSPORT=http11 (said when an event loop first uses it)."""
    _proxy_env(monkeypatch)
    monkeypatch.setenv("DTMCLI_ASYNC_TRANSPORT", "http11")
    url = serve_once(_with_length(b"", b"ok"))

    async def main() -> Any:
        t = default_async_transport()
        assert isinstance(t, AsyncHttp11Transport)
        response = await t.request("GET", f"{url}/q")  # directly, not through proxy.invalid
        await t.aclose()
        return response

    with caplog.at_level(logging.WARNING, logger="dtmcli"):
        assert asyncio.run(main()).content == b"ok"
    assert any("proxy" in r.getMessage().lower() for r in caplog.records if r.levelno >= logging.WARNING)
