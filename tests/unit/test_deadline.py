"""``timeout`` is a total deadline per request (issue 9.10), for both transports.

A raw-socket server drips its answer one byte at a time, each byte well within the timeout: a
per-read timeout never fires, a total deadline does.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import pytest
import requests
import urllib3

from dtmcli import DtmClient, DtmConnectError, DtmInvalidInput, DtmTimeout, ExponentialBackoff, Retry
from dtmcli._transport import RequestsTransport, Transport, Urllib3Transport

TIMEOUT = 1.0
DRIP = 0.1  # seconds between bytes: far below TIMEOUT
BODY = b'{"transaction":null,"branches":[]}'
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
HEADER_LEN = ANSWER.index(b"\r\n\r\n") + 4
# The premise: the status line and the body each take several times TIMEOUT, each byte far less.
assert HEADER_LEN * DRIP > 4 * TIMEOUT and len(BODY) * DRIP > 3 * TIMEOUT and DRIP < TIMEOUT / 5

TRANSPORTS = [pytest.param(RequestsTransport, id="requests"), pytest.param(Urllib3Transport, id="urllib3")]


class DripServer:
    """Answers each request with ANSWER: ``fast`` bytes at once, then the rest one byte per DRIP."""

    def __init__(self, fast: int) -> None:
        self.fast = fast
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:  # keep-alive: one answer per request (requests here carry no body)
                    data = b""
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(4096)
                        if not chunk:
                            return
                        data += chunk
                    conn.sendall(ANSWER[: self.fast])
                    for i in range(self.fast, len(ANSWER)):
                        if self.stop.wait(DRIP):
                            return
                        conn.sendall(ANSWER[i : i + 1])
            except OSError:
                return  # the client gave up and closed

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture(params=[pytest.param(0, id="drip-status-line"), pytest.param(HEADER_LEN, id="drip-body")])
def drip(request: pytest.FixtureRequest) -> Iterator[DripServer]:
    server = DripServer(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_total_deadline(drip: DripServer, factory: Callable[..., Transport]) -> None:
    transport = factory(timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(DtmTimeout):
        transport.request("GET", f"http://127.0.0.1:{drip.port}/api/dtmsvr/query?gid=G")
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT + 0.5, f"a {TIMEOUT}s timeout let the call run {elapsed:.1f}s"
    transport.close()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_per_call_timeout_argument_is_a_deadline_too(drip: DripServer, factory: Callable[..., Transport]) -> None:
    transport = factory(timeout=30.0)
    started = time.monotonic()
    with pytest.raises(DtmTimeout):
        transport.request("GET", f"http://127.0.0.1:{drip.port}/x", timeout=0.5)
    assert time.monotonic() - started < 1.0
    transport.close()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_client_query_times_out_typed(drip: DripServer, factory: Callable[..., Transport]) -> None:
    client = DtmClient(
        f"http://127.0.0.1:{drip.port}/api/dtmsvr", transport=factory(timeout=TIMEOUT), retry=Retry(retries=0)
    )
    started = time.monotonic()
    with pytest.raises(DtmTimeout) as info:
        client.query("G1")
    assert info.value.gid == "G1"
    assert time.monotonic() - started < TIMEOUT + 0.5
    client.close()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_a_fast_answer_after_a_timeout_still_works(factory: Callable[..., Transport]) -> None:
    """The deadline is per call: a timed-out call leaves nothing behind for the next one."""
    fast = DripServer(len(ANSWER))
    slow = DripServer(0)
    try:
        transport = factory(timeout=TIMEOUT)
        with pytest.raises(DtmTimeout):
            transport.request("GET", f"http://127.0.0.1:{slow.port}/x")
        for _ in range(3):
            assert transport.request("GET", f"http://127.0.0.1:{fast.port}/x").content == BODY
        transport.close()
    finally:
        fast.close()
        slow.close()


def test_own_session_gets_the_deadline(drip: DripServer) -> None:
    """A session passed in by the user is bounded as well (its plain HTTPAdapter pools)."""
    transport = RequestsTransport(requests.Session(), timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(DtmTimeout):
        transport.request("GET", f"http://127.0.0.1:{drip.port}/x")
    assert time.monotonic() - started < TIMEOUT + 0.5
    transport.session.close()


def test_own_session_used_before_gets_the_deadline() -> None:
    """Pools a session made before it was given to the transport hold plain connections: they are replaced."""
    server = DripServer(len(ANSWER))  # answers at once for the warm-up
    session = requests.Session()
    session.trust_env = False
    url = f"http://127.0.0.1:{server.port}/x"
    try:
        session.get(url, timeout=5)  # the application used its session first: a plain pool for this host
        server.fast = 0  # from now on it drips
        transport = RequestsTransport(session, timeout=TIMEOUT)
        started = time.monotonic()
        with pytest.raises(DtmTimeout):
            transport.request("GET", url)
        assert time.monotonic() - started < TIMEOUT + 0.5
    finally:
        server.close()
        session.close()


def test_one_wrapper_per_adapter_however_many_transports() -> None:
    session = requests.Session()
    adapter = session.get_adapter("http://x")
    RequestsTransport(session, timeout=TIMEOUT)
    wrapped = adapter.proxy_manager_for
    for _ in range(2000):
        RequestsTransport(session, timeout=TIMEOUT)
    assert adapter.proxy_manager_for is wrapped
    session.close()


def test_deadline_is_only_active_inside_a_call() -> None:
    """The user's own use of a session given to the transport keeps requests' per-read semantics."""
    drip = DripServer(HEADER_LEN)
    fast = DripServer(len(ANSWER))
    session = requests.Session()
    try:
        transport = RequestsTransport(session, timeout=TIMEOUT)
        transport.request("GET", f"http://127.0.0.1:{fast.port}/x")  # its deadline ends with the call
        started = time.monotonic()
        r: Any = session.get(f"http://127.0.0.1:{drip.port}/x", timeout=TIMEOUT)
        assert r.content == BODY and time.monotonic() - started > TIMEOUT
    finally:
        session.close()
        drip.close()
        fast.close()


def test_customised_pool_classes_are_left_alone() -> None:
    """A session whose pool manager uses its own pool classes keeps them."""
    session = requests.Session()
    adapter: Any = session.get_adapter("http://x")
    custom = {"http": urllib3.HTTPConnectionPool, "https": urllib3.HTTPSConnectionPool}
    adapter.poolmanager.pool_classes_by_scheme = custom
    RequestsTransport(session)
    assert adapter.poolmanager.pool_classes_by_scheme is custom
    plain = requests.Session()
    RequestsTransport(plain)
    assert plain.get_adapter("http://x").poolmanager.pool_classes_by_scheme is not (  # type: ignore[attr-defined]
        urllib3.poolmanager.pool_classes_by_scheme
    )


# -- one deadline per client call, retries included ------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_one_deadline_across_retries(drip: DripServer, factory: Callable[..., Transport]) -> None:
    """The default Retry repeats query/new_gid; all attempts share the client's one timeout."""
    client = DtmClient(f"http://127.0.0.1:{drip.port}/api/dtmsvr", timeout=TIMEOUT, transport=factory(timeout=30.0))
    for call in (lambda: client.query("G1"), client.new_gid):
        started = time.monotonic()
        with pytest.raises(DtmTimeout):
            call()
        elapsed = time.monotonic() - started
        assert elapsed < TIMEOUT + 0.5, f"a {TIMEOUT}s timeout let the call run {elapsed:.1f}s"
    client.close()


def test_default_client_one_deadline(drip: DripServer) -> None:
    client = DtmClient(f"http://127.0.0.1:{drip.port}/api/dtmsvr", timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(DtmTimeout):
        client.new_gid()
    assert time.monotonic() - started < TIMEOUT + 0.5
    client.close()


@pytest.mark.parametrize("own", [(3, 27), "fast", object(), None, 5.0])
def test_a_custom_transports_own_timeout_notion_is_not_an_error(own: Any) -> None:
    """A custom transport whose ``timeout`` is its own thing (a tuple, a Timeout object) or missing:
    the client keeps the default deadline; a valid number or None (no deadline) is taken as it is."""

    class Custom:
        def request(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("not called")

        def close(self) -> None:
            pass

    custom = Custom()
    if own != "missing":
        custom.timeout = own  # type: ignore[attr-defined]
    expected = own if own is None or isinstance(own, float) else 10.0
    assert DtmClient("http://127.0.0.1:1/api/dtmsvr", transport=custom).timeout == expected  # type: ignore[arg-type]


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_client_timeout_defaults_to_the_transports(factory: Callable[..., Transport]) -> None:
    """Without timeout=, a client keeps the timeout of the transport it is given (as before)."""
    drip = DripServer(0)
    try:
        client = DtmClient(f"http://127.0.0.1:{drip.port}/api/dtmsvr", transport=factory(timeout=TIMEOUT))
        assert client.timeout == TIMEOUT
        started = time.monotonic()
        with pytest.raises(DtmTimeout):
            client.query("G1")
        assert time.monotonic() - started < TIMEOUT + 0.5
        client.close()
    finally:
        drip.close()


def test_no_retry_once_the_budget_is_spent() -> None:
    """A retry whose backoff would end past the deadline is not made; the last real error is raised."""
    attempts = []
    transport = Urllib3Transport()
    real = transport.request

    def counting(*args: Any, **kwargs: Any) -> Any:
        attempts.append(kwargs["timeout"])
        return real(*args, **kwargs)

    transport.request = counting  # type: ignore[method-assign]
    retry = Retry(retries=10, backoff=ExponentialBackoff(0.4, 0.4))
    client = DtmClient(f"http://127.0.0.1:{_closed_port()}/api/dtmsvr", timeout=1.0, transport=transport, retry=retry)
    started = time.monotonic()
    with pytest.raises(DtmConnectError):
        client.new_gid()
    assert time.monotonic() - started < 1.0
    assert len(attempts) == 3  # at 0, 0.4 and 0.8 s; a fourth would start at 1.2 s
    assert attempts[0] <= 1.0 and attempts[1] <= 0.6 and attempts[2] <= 0.2  # each capped at the time left


def test_no_attempt_after_an_overlong_backoff() -> None:
    """A sleep that overshoots the deadline leaves no time: DtmTimeout, no attempt with a negative timeout."""
    retry = Retry(retries=2, backoff=ExponentialBackoff(0.05, 0.05), sleep=lambda _: time.sleep(TIMEOUT + 0.2))
    client = DtmClient(f"http://127.0.0.1:{_closed_port()}/api/dtmsvr", timeout=TIMEOUT, retry=retry)
    with pytest.raises(DtmTimeout, match="ran out before a retry"):
        client.new_gid()


# -- timeout=None and invalid timeouts --------------------------------------------------------------


@pytest.mark.parametrize("transport", ["requests", "urllib3"])
def test_timeout_none_means_no_deadline(transport: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from dtmcli.testing import DtmTestServer

    monkeypatch.setenv("DTMCLI_TRANSPORT", transport)
    with DtmTestServer() as dtm:
        client = DtmClient(dtm.url, timeout=None)
        assert client.timeout is None and client.transport.timeout is None  # type: ignore[attr-defined]
        assert client.new_gid() and client.query("G-none") is None and client.ping()
        client.close()
    for factory in (RequestsTransport, Urllib3Transport):
        assert factory(timeout=None).timeout is None


@pytest.mark.parametrize("bad", [True, False, 0, 0.0, -1, -0.5, float("nan"), float("inf"), 1e10, "5", [1]])
def test_bad_timeout_is_refused_at_construction(bad: Any) -> None:
    for build in (
        lambda: DtmClient("http://127.0.0.1:1/api/dtmsvr", timeout=bad),
        lambda: RequestsTransport(timeout=bad),
        lambda: Urllib3Transport(timeout=bad),
    ):
        with pytest.raises(DtmInvalidInput, match="timeout must be a positive number of seconds"):
            build()


# -- the user's own session through an HTTP proxy ---------------------------------------------------


@pytest.mark.parametrize("early", [False, True], ids=["proxy-manager-later", "proxy-manager-before"])
def test_own_session_through_a_proxy_gets_the_deadline(drip: DripServer, early: bool) -> None:
    """requests builds a proxy's pool manager with the plain adapter's proxy_manager_for: bounded too."""
    proxy = f"http://127.0.0.1:{drip.port}"
    session = requests.Session()
    session.trust_env = False
    session.proxies = {"http": proxy}
    if early:  # a proxy manager the session made before the transport was built
        session.get_adapter("http://x").proxy_manager_for(proxy)  # type: ignore[attr-defined]
    transport = RequestsTransport(session, timeout=TIMEOUT)
    started = time.monotonic()
    with pytest.raises(DtmTimeout):
        transport.request("GET", "http://dtm.invalid/api/dtmsvr/query?gid=G")
    elapsed = time.monotonic() - started
    assert elapsed < TIMEOUT + 0.5, f"a {TIMEOUT}s timeout let the call run {elapsed:.1f}s"
    session.close()
