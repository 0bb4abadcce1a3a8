"""The shared-client cache (``DtmClient.for_url``) is a bounded LRU (issue 9.12).

Past ``MAX_SHARED_CLIENTS`` addresses the least recently used client is forgotten, not closed: a
thread may be mid-request with it. Nothing else holds it then, so it is freed and its pooled
connections are closed; a thread still using it finishes its request normally.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from web_servers import serve_http

from dtmcli import DtmClient
from dtmcli import client as client_module

BOUND = 3


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        if self.path.endswith("/slow"):
            self.server.slow_started.set()  # type: ignore[attr-defined]
            time.sleep(0.5)
        out = b'{"version":"v1.19.0"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _answer

    def finish(self) -> None:
        super().finish()
        with self.server.lock:  # type: ignore[attr-defined]
            self.server.closed += 1  # type: ignore[attr-defined]

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    with serve_http(_Handler, closed=0, lock=threading.Lock(), slow_started=threading.Event()) as srv:
        yield srv


@pytest.fixture(autouse=True, params=["requests", "urllib3"])
def small_cache(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DTMCLI_TRANSPORT", request.param)
    DtmClient.close_shared()
    monkeypatch.setattr(client_module, "MAX_SHARED_CLIENTS", BOUND)
    yield
    DtmClient.close_shared()


def _urls(server: ThreadingHTTPServer, n: int) -> list[str]:
    # distinct addresses that reach the same server: one path prefix each
    return [f"http://127.0.0.1:{server.server_address[1]}/dtm{i}/api/dtmsvr" for i in range(n)]


def _wait_closed(server: ThreadingHTTPServer, n: int) -> bool:
    for _ in range(100):
        if server.closed >= n:  # type: ignore[attr-defined]
            return True
        time.sleep(0.02)
    return False


def test_past_the_bound_clients_stay_shared(server: ThreadingHTTPServer) -> None:
    urls = _urls(server, BOUND + 2)
    for u in urls:
        DtmClient.for_url(u)
    assert len(DtmClient._shared) == BOUND
    # the newest address is shared like any other (it used to get a new unshared client per call)
    assert DtmClient.for_url(urls[-1]) is DtmClient.for_url(urls[-1])


def test_least_recently_used_is_evicted(server: ThreadingHTTPServer) -> None:
    a, b, c, d = _urls(server, 4)
    first = DtmClient.for_url(a)
    DtmClient.for_url(b)
    DtmClient.for_url(c)
    assert DtmClient.for_url(a) is first  # a is now the most recently used
    DtmClient.for_url(d)
    assert list(DtmClient._shared) == [c.rstrip("/"), a, d]
    assert DtmClient.for_url(a) is first


def test_evicted_client_is_freed_and_its_connection_closed(server: ThreadingHTTPServer) -> None:
    urls = _urls(server, BOUND + 1)
    oldest = DtmClient.for_url(urls[0])
    assert oldest.version() == "v1.19.0"  # one pooled keep-alive connection
    gone = weakref.ref(oldest)
    del oldest
    for u in urls[1:]:
        DtmClient.for_url(u)
    assert gone() is None, "an evicted, unused client must not linger"
    assert _wait_closed(server, 1), "the evicted client's keep-alive connection was never closed"


def test_evicted_client_in_use_finishes_its_request(server: ThreadingHTTPServer) -> None:
    urls = _urls(server, BOUND + 1)
    busy = DtmClient.for_url(urls[0])
    gone = weakref.ref(busy)
    result: list[object] = []

    def slow_call(client: DtmClient) -> None:
        try:
            result.append(client.call("GET", "slow").status)
        except Exception as exc:  # reported below
            result.append(exc)

    t = threading.Thread(target=slow_call, args=(busy,))
    t.start()
    assert server.slow_started.wait(5)  # type: ignore[attr-defined]
    for u in urls[1:]:
        DtmClient.for_url(u)  # evicts `busy` while its request is in flight
    assert urls[0] not in DtmClient._shared
    t.join()
    assert result == [200]
    del busy
    assert gone() is None
    assert _wait_closed(server, 1)


def test_a_hit_evicted_by_another_thread_meanwhile(
    server: ThreadingHTTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hit path takes no lock: another thread may evict the entry between lookup and reordering."""

    class EvictedRightAfterLookup(OrderedDict):  # type: ignore[type-arg]
        def get(self, key: Any, default: Any = None) -> Any:
            value = super().get(key, default)
            if value is not None:
                self.pop(key)  # what a concurrent eviction does in that window
            return value

    url = _urls(server, 1)[0]
    client = DtmClient.for_url(url)
    monkeypatch.setattr(DtmClient, "_shared", EvictedRightAfterLookup(DtmClient._shared))
    assert DtmClient.for_url(url) is client


def test_eviction_warns_once(server: ThreadingHTTPServer, caplog: pytest.LogCaptureFixture,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream of new addresses (they can come from requests) logs one warning, not one per call."""
    monkeypatch.setattr(DtmClient, "_evicted_warned", False)
    with caplog.at_level("DEBUG", logger="dtmcli"):
        for u in _urls(server, BOUND + 5):
            DtmClient.for_url(u)
    evictions = [r for r in caplog.records if "least recently used" in r.getMessage()]
    assert [r.levelname for r in evictions] == ["WARNING"] + ["DEBUG"] * 4
