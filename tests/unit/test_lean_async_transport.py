"""The asyncio lean HTTP/1.1 transport (``AsyncHttp11Transport``) against real sockets.

First every transport-generic test of the aiohttp/httpx suite (test_async_transport.py), run with
this transport: wire bytes, request targets, typed failures, deadlines before and after sending,
cancellation against the deadline, TLS, per-loop pools, dropped transports, threads, fork. Then
what only a hand-written client can get wrong, with the scriptable raw server of the sync lean
transport's tests: stale keep-alive connections (a POST is never sent twice), stalls, resets,
chunked / read-to-close / gzip / interim answers, malformed framing, TLS with a certificate made by
the openssl CLI, cancellation mid-read, and many requests in flight from one loop.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import inspect
import json
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import test_async_transport as suite
import test_lean_transport as lean
from test_lean_transport import OK, RawServer, always, answer, closes_after_first, read_then_close, reset

from dtmcli import DtmConnectError, DtmInvalidInput, DtmTimeout, DtmTransportError
from dtmcli.asyncio import AsyncDtmClient, Msg
from dtmcli.asyncio import _http11 as async_http11
from dtmcli.asyncio._transport import (
    AiohttpTransport,
    AsyncHttp11Transport,
    AsyncTransport,
    HttpxTransport,
    default_async_transport,
)

# Fixtures of the reused suites, under their own names so pytest finds them here.
server = suite.server
unreachable = suite.unreachable
tls_cert = suite.tls_cert
tls_server = suite.tls_server
raw = lean.raw
cert = lean.cert
other_cert = lean.other_cert

run = asyncio.run


# -- the aiohttp/httpx suite, with this transport ----------------------------------------------------


def _with_this_transport(test: Callable[..., Any]) -> Callable[..., Any]:
    """``test`` with ``factory=AsyncHttp11Transport``: its other parameters, fixtures and marks kept."""
    sig = inspect.signature(test)

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return test(*args, factory=AsyncHttp11Transport, **kwargs)

    del wrapper.__wrapped__  # type: ignore[attr-defined]
    wrapper.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in sig.parameters.items() if name != "factory"]
    )
    wrapper.pytestmark = [  # type: ignore[attr-defined]
        m for m in getattr(test, "pytestmark", []) if not (m.name == "parametrize" and m.args[0] == "factory")
    ]
    return wrapper


GENERIC = [
    "test_status_body_and_headers_round_trip",
    "test_request_target_is_the_sync_transports",
    "test_credentials_in_the_url_are_never_sent",
    "test_redirects_are_not_followed_and_cookies_not_kept",
    "test_refused_port_is_a_connect_error",
    "test_unknown_host_is_a_connect_error",
    "test_silent_server_times_out_within_the_deadline",
    "test_dripping_server_hits_the_total_deadline",
    "test_deadline_while_connecting_is_a_connect_timeout",
    "test_deadline_during_the_tls_handshake_is_a_connect_timeout",
    "test_deadline_on_a_reused_connection_is_not_a_connect_timeout",
    "test_deadline_waiting_for_a_free_connection_is_a_connect_timeout",
    "test_a_cancel_in_the_iteration_the_deadline_fires_wins",
    "test_the_callers_timeouts_and_cancellation_are_left_alone",
    "test_reset_mid_answer_is_a_transport_error",
    "test_tls",
    "test_successive_asyncio_runs_each_get_a_pool_closed_with_their_loop",
    "test_pool_of_a_loop_closed_without_asyncio_run_is_dropped_quietly",
    "test_a_transport_dropped_without_aclose_closes_its_pool_in_its_loop",
    "test_threads_with_their_own_loops_share_a_transport",
    "test_cancelled_request_leaves_no_half_read_connection",
    "test_forked_child_never_uses_the_parents_sockets",
]
# Not here: proxies (this transport has none: the default picks aiohttp when one is configured) and
# the caller's own aiohttp/httpx client.
for _name in GENERIC:
    globals()[_name] = _with_this_transport(getattr(suite, _name))


def test_implements_the_protocol() -> None:
    assert isinstance(AsyncHttp11Transport(), AsyncTransport)


def test_the_async_suite_has_no_generic_test_left_out() -> None:
    """A transport-generic test added to the aiohttp/httpx suite must be run here too (or named below)."""
    not_generic = {"test_deadline_at_the_proxy", "test_deadline_with_the_users_client_may_have_been_sent",
                   "test_proxy", "test_closed_user_client_is_invalid_input"}
    generic = {name for name, f in vars(suite).items() if name.startswith("test_") and callable(f)
               and "factory" in inspect.signature(f).parameters}
    assert generic - not_generic == set(GENERIC)


@pytest.mark.parametrize("bad", [True, 0, -1, float("nan"), 1e10, "5"])
def test_bad_arguments_are_refused_at_construction(bad: Any) -> None:
    with pytest.raises(DtmInvalidInput, match="timeout"):
        AsyncHttp11Transport(timeout=bad)
    with pytest.raises(DtmInvalidInput, match="pool_maxsize"):
        AsyncHttp11Transport(pool_maxsize=bad if bad != 1e10 else 1.5)  # type: ignore[arg-type]
    with pytest.raises(DtmInvalidInput, match="ssl_context"):
        AsyncHttp11Transport(ssl_context=object())  # type: ignore[arg-type]


# -- the default -------------------------------------------------------------------------------------


def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv(var.upper(), raising=False)


def test_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_proxy(monkeypatch)
    for name, cls in (("http11", AsyncHttp11Transport), ("aiohttp", AiohttpTransport), ("httpx", HttpxTransport)):
        monkeypatch.setenv("DTMCLI_ASYNC_TRANSPORT", name)
        t = default_async_transport(3.0)
        assert isinstance(t, cls) and t.timeout == 3.0  # type: ignore[attr-defined]


def test_a_configured_proxy_is_used(raw: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """With a proxy in the environment the default is aiohttp, through the proxy (this one has none)."""
    proxy = raw(always(answer(b'{"gid":"from-proxy"}')))
    _no_proxy(monkeypatch)
    monkeypatch.delenv("DTMCLI_ASYNC_TRANSPORT", raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)

    async def main() -> str:
        client = AsyncDtmClient("http://dtm.invalid:36789/api/dtmsvr")
        assert isinstance(client.transport, AiohttpTransport)
        gid = await client.new_gid()
        await client.aclose()
        return gid

    assert run(main()) == "from-proxy"
    assert proxy.requests[0][1].startswith(b"GET http://dtm.invalid:36789/api/dtmsvr/newGid HTTP/1.1\r\n")


# -- keep-alive and stale connections ------------------------------------------------------------------


async def _calls(t: AsyncHttp11Transport, *calls: tuple[str, str], body: Any = b"{}", pause: float = 0) -> list[Any]:
    out = []
    for method, url in calls:
        out.append(await t.request(method, url, body=body if method == "POST" else None))
        await asyncio.sleep(pause)
    await t.aclose()
    return out


def test_keep_alive_reuses_one_connection(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(answer()))
    got = run(_calls(AsyncHttp11Transport(), *[("POST", f"{srv.url}/submit")] * 5))
    assert [r.content for r in got] == [OK] * 5
    assert srv.connections == 1 and len(srv.requests) == 5
    assert srv.requests[0][1].endswith(b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")


def test_connection_close_and_http10_are_honoured(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(answer(extra=b"Connection: close\r\n")))
    old = raw(always(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    run(_calls(AsyncHttp11Transport(), *[("GET", f"{srv.url}/x")] * 3, *[("GET", f"{old.url}/x")] * 2))
    assert srv.connections == 3 and old.connections == 2


def test_idle_connection_closed_by_the_server_is_replaced(raw: Callable[..., RawServer]) -> None:
    srv = raw(closes_after_first)
    got = run(_calls(AsyncHttp11Transport(), *[("POST", f"{srv.url}/submit")] * 3, pause=0.05))
    assert [r.content for r in got] == [OK] * 3
    assert srv.connections == 3 and len(srv.requests) == 3


def test_post_sent_whole_on_a_reused_connection_is_never_resent(raw: Callable[..., RawServer]) -> None:
    """The server read the second POST, then closed (FIN or RST): it may have processed it."""
    for how in (lambda conn: conn.shutdown(socket.SHUT_RDWR), reset):
        srv = raw(read_then_close(how))

        async def main(url: str) -> None:
            t = AsyncHttp11Transport()
            await t.request("POST", f"{url}/submit", body=b"{}")
            with pytest.raises(DtmTransportError) as info:
                await t.request("POST", f"{url}/submit", body=b"{}")
            assert not isinstance(info.value, (DtmConnectError, DtmTimeout))
            await t.aclose()

        run(main(srv.url))
        time.sleep(0.1)
        assert len(srv.requests) == 2 and srv.connections == 1  # not sent a second time


def test_get_closed_before_any_answer_byte_is_resent_once(raw: Callable[..., RawServer]) -> None:
    srv = raw(read_then_close(lambda conn: conn.shutdown(socket.SHUT_RDWR)))
    got = run(_calls(AsyncHttp11Transport(), ("GET", f"{srv.url}/q"), ("GET", f"{srv.url}/q")))
    assert got[1].content == OK
    assert len(srv.requests) == 3 and srv.connections == 2


def test_close_on_a_fresh_connection_is_not_resent(raw: Callable[..., RawServer]) -> None:
    srv = raw(lambda conn, index, request: False)  # reads the request, closes without answering

    async def main() -> None:
        t = AsyncHttp11Transport()
        for method in ("GET", "POST"):
            with pytest.raises(DtmTransportError) as info:
                await t.request(method, f"{srv.url}/x")
            assert not isinstance(info.value, DtmConnectError)

    run(main())
    time.sleep(0.1)
    assert len(srv.requests) == 2


def test_race_closed_before_the_write_resends(raw: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch) -> None:
    """The server reset the idle connection and the stale check missed it: the write cannot go out
    (asyncio closed the transport), so the POST goes once on a new connection."""
    srv = raw(lambda conn, index, request: (conn.sendall(answer()), reset(conn))[0] is not None)

    async def main() -> None:
        t = AsyncHttp11Transport()
        await t.request("POST", f"{srv.url}/submit", body=b"{}")
        await asyncio.sleep(0.1)  # the RST has arrived
        monkeypatch.setattr(async_http11._Conn, "stale", lambda self: False)  # as if the check came too early
        assert (await t.request("POST", f"{srv.url}/submit", body=b"{}")).content == OK
        await t.aclose()

    run(main())
    assert len(srv.requests) == 2 and srv.connections == 2


def test_write_failing_at_once_on_a_reused_connection_resends(
    raw: Callable[..., RawServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncio's write meets ECONNRESET and closes the transport before returning: the request did not
    leave whole, so it goes on a new connection (on a fresh connection the error is raised)."""
    srv = raw(always(answer()))

    def failing_write(self: Any, data: bytes) -> None:
        self._fatal_error(ConnectionResetError("reset by peer"), "Fatal write error")

    async def main() -> None:
        t = AsyncHttp11Transport()
        await t.request("POST", f"{srv.url}/submit", body=b"{}")
        pool = next(iter(t._pools.by_loop.values())).client
        conn = next(iter(pool.idle.values()))[0]
        monkeypatch.setattr(type(conn.raw), "write", failing_write)
        with pytest.raises(DtmTransportError, match="closed while the request was written"):
            await t.request("POST", f"{srv.url}/submit", body=b"{}")  # reused, then the new one fails too
        monkeypatch.undo()
        assert (await t.request("POST", f"{srv.url}/submit", body=b"{}")).content == OK
        await t.aclose()

    run(main())
    assert len(srv.requests) == 2 and srv.connections == 3  # nothing went out on the two failed writes


def test_submit_through_the_client_is_not_resent_on_a_dropped_connection(raw: Callable[..., RawServer]) -> None:
    srv = raw(read_then_close(lambda conn: conn.shutdown(socket.SHUT_RDWR)))

    async def main() -> None:
        client = AsyncDtmClient(f"{srv.url}/api/dtmsvr", transport=AsyncHttp11Transport())
        await Msg(client, "G-prep").add(f"{srv.url}/busi", {}).prepare(f"{srv.url}/qp")
        with pytest.raises(DtmTransportError):
            await Msg(client, "G-sub").add(f"{srv.url}/busi", {}).submit()
        await client.aclose()

    run(main())
    time.sleep(0.1)
    assert [r[1].split(b" ")[1] for r in srv.requests] == [b"/api/dtmsvr/prepare", b"/api/dtmsvr/submit"]


def test_junk_on_an_idle_connection_makes_it_stale(raw: Callable[..., RawServer]) -> None:
    """Bytes after a complete answer arriving later: the connection is out of step and not reused."""

    def script(conn: socket.socket, index: int, request: bytes) -> bool:
        conn.sendall(answer())
        time.sleep(0.02)
        conn.sendall(b"JUNK")
        return True

    srv = raw(script)
    got = run(_calls(AsyncHttp11Transport(), *[("GET", f"{srv.url}/x")] * 2, pause=0.1))
    assert [r.content for r in got] == [OK, OK] and srv.connections == 2


# -- stalls, resets, bodies ------------------------------------------------------------------------------


def test_stalled_server_times_out_within_the_deadline(raw: Callable[..., RawServer]) -> None:
    srv = raw(lambda conn, index, request: time.sleep(5) is not None)
    started = time.monotonic()
    with pytest.raises(DtmTimeout) as info:
        run(AsyncHttp11Transport(timeout=0.3).request("POST", f"{srv.url}/x", body=b"{}"))
    assert time.monotonic() - started < 1.0
    assert not isinstance(info.value, DtmConnectError)


def test_a_server_that_never_reads_a_big_request_times_out() -> None:
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        started = time.monotonic()
        with pytest.raises(DtmTimeout):
            run(AsyncHttp11Transport(timeout=0.5).request(
                "POST", f"http://127.0.0.1:{lsock.getsockname()[1]}/x", body=b"x" * (64 << 20)))
        assert time.monotonic() - started < 1.5


def test_eof_mid_body(raw: Callable[..., RawServer]) -> None:
    srv = raw(lambda conn, index, request: conn.sendall(answer(b"x" * 1000)[:-10]) is not None and False)
    with pytest.raises(DtmTransportError, match="closed the connection after"):
        run(AsyncHttp11Transport().request("GET", f"{srv.url}/x"))


def test_huge_chunked_and_read_to_close_bodies(raw: Callable[..., RawServer]) -> None:
    big = os.urandom(1 << 20) * 24
    parts = [os.urandom(n) for n in (1, 4095, 70000, 1 << 20, 3)]
    chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\nX-Trailer: 1\r\n\r\n"
    big_srv = raw(always(answer(big)))
    chunk_srv = raw(always(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked))
    close_srv = raw(lambda conn, index, request: conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + big[:300000]) and False)
    got = run(_calls(AsyncHttp11Transport(), *[("GET", f"{big_srv.url}/b")] * 2, *[("GET", f"{chunk_srv.url}/c")] * 2,
                     *[("GET", f"{close_srv.url}/r")] * 2))
    assert [r.content for r in got] == [big, big, b"".join(parts), b"".join(parts), big[:300000], big[:300000]]
    assert big_srv.connections == 1 and chunk_srv.connections == 1 and close_srv.connections == 2


def test_interim_gzip_bodiless_and_bare_lf_answers(raw: Callable[..., RawServer]) -> None:
    interim = raw(always(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + answer()))
    zipped = raw(always(answer(gzip.compress(OK), b"Content-Encoding: gzip\r\n")))
    empty = raw(always(b"HTTP/1.1 204 No Content\r\n\r\n"))
    bare = raw(always(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"))
    got = run(_calls(AsyncHttp11Transport(), *[("POST", f"{interim.url}/x")] * 2, ("GET", f"{zipped.url}/x"),
                     *[("POST", f"{empty.url}/x")] * 2, ("GET", f"{bare.url}/x"), body=None))
    assert [(r.status, r.content) for r in got] == [(200, OK)] * 3 + [(204, b"")] * 2 + [(200, b"ok")]
    assert empty.connections == 1 and b"Content-Length: 0\r\n" in empty.requests[0][1]


@pytest.mark.parametrize(("payload", "match"), lean.test_malformed_answers_are_transport_errors.pytestmark[0].args[1])
def test_malformed_answers_are_transport_errors(raw: Callable[..., RawServer], payload: bytes, match: str) -> None:
    srv = raw(always(payload))
    with pytest.raises(DtmTransportError, match=match) as info:
        run(AsyncHttp11Transport(timeout=2).request("GET", f"{srv.url}/x"))
    assert not isinstance(info.value, (DtmConnectError, DtmTimeout))


def test_framing_out_of_step_is_not_reused(raw: Callable[..., RawServer]) -> None:
    both = raw(always(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"2\r\nok\r\n0\r\n\r\n"))
    extra = raw(always(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"))
    got = run(_calls(AsyncHttp11Transport(), *[("GET", f"{both.url}/x")] * 2, *[("GET", f"{extra.url}/x")] * 2))
    assert [r.content for r in got] == [b"ok"] * 4
    assert both.connections == 2 and extra.connections == 2


@pytest.mark.parametrize(
    "headers", [{"Content-Length": "0"}, {"Host": "evil"}, {"X-A": "1\r\nX-B: 2"}, {"X-A": "\u0100"}]
)
def test_bad_headers_and_urls_are_refused_before_sending(raw: Callable[..., RawServer], headers: Any) -> None:
    srv = raw(always(answer()))
    with pytest.raises(DtmInvalidInput):
        run(AsyncHttp11Transport().request("POST", f"{srv.url}/x", body=b"{}", headers=headers))
    with pytest.raises(DtmInvalidInput):
        run(AsyncHttp11Transport().request("GET", "ftp://h/x"))
    time.sleep(0.05)
    assert srv.connections == 0


# -- TLS ----------------------------------------------------------------------------------------------------


def test_tls_keep_alive_and_idle_close(raw: Callable[..., RawServer], cert: tuple[Path, Path]) -> None:
    ctx = ssl.create_default_context(cafile=str(cert[0]))
    srv = raw(always(answer()), tls=lean.server_context(cert))
    closing = raw(closes_after_first, tls=lean.server_context(cert))
    got = run(_calls(AsyncHttp11Transport(ssl_context=ctx), *[("POST", f"{srv.url}/s")] * 3, body=b'{"a":1}'))
    assert [r.content for r in got] == [OK] * 3 and srv.connections == 1
    assert srv.requests[0][1].endswith(b'\r\n\r\n{"a":1}')
    got = run(_calls(AsyncHttp11Transport(ssl_context=ctx), *[("POST", f"{closing.url}/s")] * 3, pause=0.05))
    assert [r.content for r in got] == [OK] * 3 and len(closing.requests) == 3


def test_tls_untrusted_or_wrong_name_is_refused(
    raw: Callable[..., RawServer], cert: tuple[Path, Path], other_cert: tuple[Path, Path]
) -> None:
    srv = raw(always(answer()), tls=lean.server_context(cert))
    wrong = raw(always(answer()), tls=lean.server_context(other_cert))
    with pytest.raises(DtmTransportError, match="CERTIFICATE_VERIFY_FAILED") as info:
        run(AsyncHttp11Transport(timeout=5).request("GET", f"{srv.url}/x"))
    assert not isinstance(info.value, DtmConnectError)
    ctx = ssl.create_default_context(cafile=str(other_cert[0]))
    with pytest.raises(DtmTransportError, match=r"match|mismatch") as info:
        run(AsyncHttp11Transport(timeout=5, ssl_context=ctx).request("GET", f"{wrong.url}/x"))
    assert not isinstance(info.value, DtmConnectError)
    assert srv.requests == [] and wrong.requests == []


# -- cancellation and many in flight -------------------------------------------------------------------------


def test_cancel_mid_read_aborts_the_connection(raw: Callable[..., RawServer]) -> None:
    """Cancelled with half an answer read: the connection is aborted, never pooled; the slot is free."""
    half = threading.Event()

    def script(conn: socket.socket, index: int, request: bytes) -> bool:
        if b"/slow" in request.split(b"\r\n")[0]:
            conn.sendall(answer(b"x" * 100)[:50])
            half.set()
            time.sleep(0.5)
            return False
        conn.sendall(answer())
        return True

    srv = raw(script)

    async def main() -> None:
        t = AsyncHttp11Transport(pool_maxsize=1)
        task = asyncio.ensure_future(t.request("GET", f"{srv.url}/slow"))
        while not half.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        pool = next(iter(t._pools.by_loop.values())).client
        assert sum(len(v) for v in pool.idle.values()) == 0
        assert (await t.request("GET", f"{srv.url}/next", timeout=1)).content == OK  # the one slot came back
        await t.aclose()

    run(main())
    assert srv.connections == 2


def test_many_in_flight_each_get_their_own_answer(raw: Callable[..., RawServer]) -> None:
    def echo(conn: socket.socket, index: int, request: bytes) -> bool:
        conn.sendall(answer(request.partition(b"\r\n\r\n")[2]))
        return True

    srv = raw(echo)

    async def main() -> list[tuple[bytes, bytes]]:
        t = AsyncHttp11Transport(pool_maxsize=16)

        async def one(i: int) -> tuple[bytes, bytes]:
            body = json.dumps({"i": i}).encode()
            return body, bytes((await t.request("POST", f"{srv.url}/x", body=body)).content)

        got = await asyncio.gather(*(one(i) for i in range(1024)))
        pool = next(iter(t._pools.by_loop.values())).client
        assert sum(len(v) for v in pool.idle.values()) <= 16
        await t.aclose()
        return got

    got = run(main())
    assert all(a == b for a, b in got) and len(got) == 1024
    assert srv.connections <= 16  # at most pool_maxsize at once, then reused


# -- the pool's deadlines and slots ------------------------------------------------------------------------


def _silent(conn: socket.socket, index: int, request: bytes) -> bool:
    time.sleep(3)
    return False


def test_a_shorter_deadline_after_longer_ones_fires_on_time(raw: Callable[..., RawServer]) -> None:
    """All deadlines of a loop share one loop timer: a shorter one re-arms it."""
    srv = raw(_silent)

    async def main() -> float:
        t = AsyncHttp11Transport(timeout=5)
        long = [asyncio.ensure_future(t.request("GET", f"{srv.url}/long")) for _ in range(3)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(DtmTimeout):
            await t.request("GET", f"{srv.url}/short", timeout=0.2)
        took = time.monotonic() - started
        for task in long:
            task.cancel()
        await asyncio.gather(*long, return_exceptions=True)
        await t.aclose()
        return took

    assert 0.15 < run(main()) < 0.6


def test_finished_deadlines_do_not_pile_up(raw: Callable[..., RawServer]) -> None:
    srv = raw(always(answer()))

    async def main() -> int:
        t = AsyncHttp11Transport(timeout=60)
        for _ in range(3000):
            await t.request("GET", f"{srv.url}/x")
        pool = next(iter(t._pools.by_loop.values())).client
        await t.aclose()
        return len(pool.deadlines.heap)

    assert run(main()) <= 2100


def test_a_cancelled_waiter_passes_its_slot_on(raw: Callable[..., RawServer]) -> None:
    """pool_maxsize=1: the slot freed by the busy request goes to the next live waiter, never lost."""

    def slow(conn: socket.socket, index: int, request: bytes) -> bool:
        time.sleep(0.2)
        conn.sendall(answer())
        return True

    srv = raw(slow)

    async def main() -> list[Any]:
        t = AsyncHttp11Transport(timeout=5, pool_maxsize=1)
        busy = asyncio.ensure_future(t.request("GET", f"{srv.url}/busy"))
        await asyncio.sleep(0.05)
        first = asyncio.ensure_future(t.request("GET", f"{srv.url}/first"))
        second = asyncio.ensure_future(t.request("GET", f"{srv.url}/second"))
        await asyncio.sleep(0.05)
        first.cancel()
        got = [(await busy).content, (await second).content]
        with pytest.raises(asyncio.CancelledError):
            await first
        pool = next(iter(t._pools.by_loop.values())).client
        got.append((pool.busy, len(pool.waiters)))
        await t.aclose()
        return got

    assert run(main()) == [OK, OK, (0, 0)]
    assert [r[1].split(b" ")[1] for r in srv.requests] == [b"/busy", b"/second"]


def test_a_slot_released_to_a_waiter_cancelled_meanwhile_goes_to_the_next() -> None:
    async def main() -> tuple[int, int]:
        pool = async_http11.LoopPool(1)
        await pool.acquire()
        first = asyncio.ensure_future(pool.acquire())
        second = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0.01)  # both wait
        first.cancel()
        pool.release()  # before the cancelled waiter ran: the slot must skip it
        await second
        with pytest.raises(asyncio.CancelledError):
            await first
        busy = pool.busy
        pool.release()
        return busy, pool.busy

    assert run(main()) == (1, 0)


def test_an_answer_sent_before_the_request_is_read_as_the_answer() -> None:
    """Bytes a fresh connection got before the request left are the answer's start (as the blocking
    transport reads them), not lost."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)

        def serve() -> None:
            conn, _ = lsock.accept()
            with conn:
                conn.sendall(answer(b"early"))
                time.sleep(0.3)

        th = threading.Thread(target=serve, daemon=True)
        th.start()

        async def main() -> bytes:
            t = AsyncHttp11Transport(timeout=2)
            loop = asyncio.get_running_loop()
            real = loop.create_connection

            async def slow_connection(*args: Any, **kwargs: Any) -> Any:
                made = await real(*args, **kwargs)
                await asyncio.sleep(0.1)  # the answer arrives before the request is written
                return made

            loop.create_connection = slow_connection  # type: ignore[method-assign]
            content = (await t.request("GET", f"http://127.0.0.1:{lsock.getsockname()[1]}/x")).content
            await t.aclose()
            return bytes(content)

        assert run(main()) == b"early"
        th.join()
