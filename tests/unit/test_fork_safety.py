"""Fork safety (issue 9.1): a forked child never shares the parent's keep-alive sockets.

Real ``os.fork()`` against the embedded coordinator: the parent makes a call (one idle keep-alive
connection in its pool), forks children that each run many prepare/query calls of their own gids
at the same time, and every answer must belong to the child's own gid. Without fresh pools in
the child, the children write to and read from the one inherited socket and get each other's
answers.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest
from web_servers import serve_http

from dtmcli import DtmClient, Msg, local_gid
from dtmcli._transport import RequestsTransport, Transport, Urllib3Transport
from dtmcli.testing import DtmTestServer

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

CHILDREN = 4
CALLS = 40
TRANSPORTS = [pytest.param(RequestsTransport, id="requests"), pytest.param(Urllib3Transport, id="urllib3")]


@pytest.fixture(scope="module")
def coordinator() -> Iterator[DtmTestServer]:
    with DtmTestServer() as server:
        yield server


def _in_child(work: Callable[[], dict[str, Any]], wfd: int) -> None:
    """Run ``work`` in a forked child, write its JSON report to ``wfd`` and exit without pytest teardown."""
    code = 1
    try:
        report = work()
        code = 0 if report.get("ok") else 2
    except BaseException as exc:  # everything must reach the parent
        report = {"ok": False, "error": repr(exc)}
    try:
        os.write(wfd, (json.dumps(report) + "\n").encode())
    finally:
        os._exit(code)


def _fork_children(n: int, work: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    """Fork ``n`` children running ``work``; their reports and exit codes."""
    sys.stdout.flush()
    sys.stderr.flush()
    gate_r, gate_w = os.pipe()  # children start together, so they overlap on the inherited socket

    def gated() -> dict[str, Any]:
        os.read(gate_r, 1)
        return work()

    kids = []
    for _ in range(n):
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            _in_child(gated, wfd)
        os.close(wfd)
        kids.append((pid, rfd))
    os.write(gate_w, b"x" * n)
    os.close(gate_r)
    os.close(gate_w)
    reports = []
    for pid, rfd in kids:
        with os.fdopen(rfd, "rb") as r:
            raw = r.read()
        _, status = os.waitpid(pid, 0)
        report = json.loads(raw) if raw.strip() else {"ok": False, "error": "no report"}
        report["exit"] = os.waitstatus_to_exitcode(status)
        reports.append(report)
    return reports


def _own_gids_only(client: DtmClient, qp: str) -> dict[str, Any]:
    """Prepare and query CALLS gids of this process; count answers that belong to another gid."""
    wrong = errors = 0
    first_error = ""
    for _ in range(CALLS):
        gid = local_gid()
        try:
            Msg(client, gid).add(f"{qp}/TransIn", {"gid": gid}).prepare(qp)
            trans = client.query(gid)
            if trans is None or trans.gid != gid or trans.status != "prepared":
                wrong += 1
        except Exception as exc:  # a crossed answer often shows up as a parse error
            errors += 1
            first_error = first_error or repr(exc)
    return {"ok": wrong == 0 and errors == 0, "wrong": wrong, "errors": errors, "first_error": first_error}


def _check(reports: list[dict[str, Any]]) -> None:
    bad = [r for r in reports if r["exit"] != 0 or not r.get("ok")]
    assert not bad, f"{len(bad)} of {len(reports)} children got foreign answers or errors: {bad}"


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_explicit_client_after_fork(coordinator: DtmTestServer, factory: Callable[..., Transport]) -> None:
    client = DtmClient(coordinator.url, transport=factory(timeout=3.0))
    qp = f"{coordinator.base_url}/busi"
    assert client.query(local_gid()) is None  # the parent now holds an idle keep-alive connection
    _check(_fork_children(CHILDREN, lambda: _own_gids_only(client, qp)))
    assert client.query(local_gid()) is None  # and the parent's pool still works
    client.close()


@pytest.mark.parametrize("transport", ["requests", "urllib3"])
def test_shared_client_after_fork(
    coordinator: DtmTestServer, transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DTMCLI_TRANSPORT", transport)
    DtmClient.close_shared(coordinator.url)
    try:
        qp = f"{coordinator.base_url}/busi"
        gid = local_gid()
        Msg(coordinator.url, gid).add(f"{qp}/TransIn", {}).prepare(qp)  # a plain URL: the shared client
        shared = DtmClient.for_url(coordinator.url)
        _check(_fork_children(CHILDREN, lambda: _own_gids_only(DtmClient.for_url(coordinator.url), qp)))
        assert DtmClient.for_url(coordinator.url) is shared
    finally:
        DtmClient.close_shared(coordinator.url)


# -- the child never disturbs the parent's connections ----------------------------------------


class _PeerRecorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.server.peers.append(self.client_address)  # type: ignore[attr-defined]
        out = b'{"transaction":null,"branches":[]}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def peer_server() -> Iterator[ThreadingHTTPServer]:
    with serve_http(_PeerRecorder, peers=[]) as srv:
        yield srv


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_child_drops_inherited_sockets_without_closing_the_parents(
    peer_server: ThreadingHTTPServer, factory: Callable[[], Transport]
) -> None:
    """The child's fresh pool uses its own connection; the parent's keep-alive connection survives."""
    client = DtmClient(f"http://127.0.0.1:{peer_server.server_address[1]}/api/dtmsvr", transport=factory())
    client.query("parent-1")

    def child() -> dict[str, Any]:
        client.query("child-1")
        client.close()  # closing the child's client and collecting the dropped pool sends nothing
        gc.collect()
        return {"ok": True}

    _check(_fork_children(2, child))
    client.query("parent-2")
    peers = peer_server.peers  # type: ignore[attr-defined]
    assert len(peers) == 4
    assert peers[0] == peers[3], "the parent's keep-alive connection was closed by a child"
    assert peers[1] != peers[0] and peers[2] != peers[0], "a child reused the parent's socket"
    client.close()


# -- locks held by a parent thread at fork time are not inherited locked -------------------------


def _child_finishes(work: Callable[[], dict[str, Any]], seconds: float = 5.0) -> dict[str, Any]:
    """Fork one child running ``work``; kill it if it has not finished in ``seconds`` (a deadlock)."""
    sys.stdout.flush()
    sys.stderr.flush()
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _in_child(work, wfd)
    os.close(wfd)
    for _ in range(int(seconds / 0.05)):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            with os.fdopen(rfd, "rb") as r:
                report: dict[str, Any] = json.loads(r.read() or b'{"ok": false}')
            report["exit"] = os.waitstatus_to_exitcode(status)
            return report
        threading.Event().wait(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(rfd)
    return {"ok": False, "error": "child hung (deadlock)", "exit": -9}


def _child_finishes_while_held(lock: Any, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Fork a child running ``work`` while another parent thread holds ``lock`` (it is inside a pool)."""
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    try:
        return _child_finishes(work)
    finally:
        release.set()
        t.join()


def test_shared_lock_held_at_fork(coordinator: DtmTestServer) -> None:
    """Another parent thread inside for_url at fork time must not leave the child's lock taken."""
    url = f"{coordinator.url}/fork-{local_gid()}"
    with DtmClient._shared_lock:  # as if a parent thread were creating a shared client right now
        report = _child_finishes(lambda: {"ok": DtmClient.for_url(url).url == url})
    DtmClient.close_shared(url)
    assert report["ok"] and report["exit"] == 0, report


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_renew_lock_held_at_fork(coordinator: DtmTestServer, factory: Callable[[], Transport]) -> None:
    """Another parent thread renewing its pools at fork time must not block the child's renewal."""
    from dtmcli import _transport

    client = DtmClient(coordinator.url, transport=factory())
    client.query(local_gid())
    with _transport._renew_lock:
        report = _child_finishes(lambda: {"ok": client.query(local_gid()) is None})
    assert report["ok"] and report["exit"] == 0, report
    client.close()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_child_threads_renew_the_pool_once(coordinator: DtmTestServer, factory: Callable[[], Transport]) -> None:
    """Threads of a child racing to their first call share one fresh pool (no pool built and lost)."""

    transport = factory()
    client = DtmClient(coordinator.url, transport=transport)
    client.query(local_gid())

    def child() -> dict[str, Any]:
        sys.setswitchinterval(1e-6)
        renewals = []
        renew = transport._renew_pools  # type: ignore[attr-defined]

        def counting_renew() -> None:
            renewals.append(1)
            threading.Event().wait(0.01)  # widen the window for the other threads
            renew()

        transport._renew_pools = counting_renew  # type: ignore[attr-defined]
        start = threading.Barrier(8)

        def first_call() -> None:
            start.wait()
            client.query(local_gid())

        threads = [threading.Thread(target=first_call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"ok": len(renewals) == 1, "renewals": len(renewals)}

    report = _child_finishes(child)
    assert report["ok"] and report["exit"] == 0, report
    client.close()


def _close_then_ok(client: DtmClient) -> dict[str, Any]:
    client.close()
    return {"ok": True}


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_close_in_child_leaves_inherited_pools_alone(
    coordinator: DtmTestServer, factory: Callable[[], Transport]
) -> None:
    """close() in a child drops the inherited pools instead of clearing them: their locks may be held."""
    transport = factory()
    client = DtmClient(coordinator.url, transport=transport)
    client.query(local_gid())
    manager: Any = getattr(transport, "pool", None)
    if manager is None:
        manager = transport.session.get_adapter(coordinator.url).poolmanager  # type: ignore[attr-defined]
    report = _child_finishes_while_held(manager.pools.lock, lambda: _close_then_ok(client))
    assert report["ok"] and report["exit"] == 0, report
    client.close()


# -- a pool's queue lock held by a parent thread at fork time --------------------------------------


def _pool_of(transport: Transport, url: str) -> Any:
    """The urllib3 connection pool ``transport`` uses for ``url``."""
    manager: Any = getattr(transport, "pool", None)
    if manager is None:
        manager = transport.session.get_adapter(url).poolmanager  # type: ignore[attr-defined]
    return manager.connection_from_url(url)


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_pool_queue_lock_held_at_fork(coordinator: DtmTestServer, factory: Callable[[], Transport]) -> None:
    """The inherited pools are never freed in the child: urllib3's finalizer would wait on their queue lock."""
    transport = factory()
    client = DtmClient(coordinator.url, transport=transport)
    client.query(local_gid())
    mutex = _pool_of(transport, coordinator.url).pool.mutex
    report = _child_finishes_while_held(mutex, lambda: {"ok": client.query(local_gid()) is None and gc.collect() >= 0})
    assert report["ok"] and report["exit"] == 0, report
    client.close()


@pytest.mark.parametrize("factory", TRANSPORTS)
def test_child_drops_an_unused_inherited_client(coordinator: DtmTestServer, factory: Callable[[], Transport]) -> None:
    """A client the child never uses (replaced, evicted, per request) is collected there without running
    urllib3's finalizer, which would wait on a queue lock held by a parent thread that does not exist."""
    clients = [DtmClient(coordinator.url, transport=factory())]  # the only reference: the child drops it
    clients[0].query(local_gid())
    mutex = _pool_of(clients[0].transport, coordinator.url).pool.mutex

    def child() -> dict[str, Any]:
        clients.clear()
        gc.collect()
        return {"ok": DtmClient(coordinator.url, transport=factory()).query(local_gid()) is None}

    report = _child_finishes_while_held(mutex, child)
    assert report["ok"] and report["exit"] == 0, report


_EXIT_SCRIPT = """
import os, sys, threading
from dtmcli import DtmClient
from dtmcli._transport import RequestsTransport, Urllib3Transport
from dtmcli.testing import DtmTestServer

factory, use = {"requests": RequestsTransport, "urllib3": Urllib3Transport}[sys.argv[1]], sys.argv[2]
dtm = DtmTestServer().__enter__()
client = DtmClient(dtm.url, transport=factory())
client.new_gid()
manager = getattr(client.transport, "pool", None) or client.transport.session.get_adapter(dtm.url).poolmanager
mutex = manager.connection_from_url(dtm.url).pool.mutex
held, release = threading.Event(), threading.Event()

def hold():
    with mutex:
        held.set()
        release.wait()

threading.Thread(target=hold, daemon=True).start()
held.wait()
pid = os.fork()
if pid == 0:
    if use == "call":
        client.new_gid()
    sys.exit(0)  # a normal interpreter exit: atexit and weakref finalizers run
release.set()
for _ in range(200):
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    threading.Event().wait(0.05)
os.kill(pid, 9)
os.waitpid(pid, 0)
sys.exit("the forked child hung at exit")
"""


@pytest.mark.parametrize("use", ["call", "idle"])
@pytest.mark.parametrize("transport", ["requests", "urllib3"])
def test_child_exits_with_a_pool_queue_lock_held_at_fork(transport: str, use: str) -> None:
    """A child exiting normally must not run the inherited pools' finalizers (they would wait on the lock)."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, transport, use], timeout=60, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
