"""The asyncio barrier's shielded steps: a cancellation is never lost nor waits without bound (review r2, m1, m2).

m2: a cancellation that arrives while a shielded step runs is re-raised even when the step then fails
with an ordinary exception (before: that exception escaped and the cancellation was lost).

m1: after a cancellation, the rollback of a database that stops answering (a network partition) used
to hold the cancelled call until TCP gave up. With an ``abort`` (the SQL stores pass one that closes
the driver connection), a shielded step gets ``CANCEL_GRACE`` seconds after the first cancellation
(from the start when it is the cleanup of a cancelled call); then the connection is closed (the
server rolls back, pools discard it) and the cancellation is raised. Without ``abort`` the wait stays
unbounded, as before (used for steps that must finish, such as local XA's).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any, Optional

import pytest
from conftest import _prepare, execute, mysql_connect, psycopg2_connect
from services import MYSQL, POSTGRES, require

from dtmcli import local_gid
from dtmcli.asyncio import _barrier_common
from dtmcli.asyncio._barrier_common import shielded
from dtmcli.asyncio.barrier import BranchBarrier
from dtmcli.barrier import BranchBarrier as SyncBarrier
from dtmcli.barrier import Decision


@pytest.fixture
def short_grace(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(_barrier_common, "CANCEL_GRACE", 0.3)
    return 0.3


# -- m2 ----------------------------------------------------------------------------------------------------------------

def test_a_cancellation_survives_a_failing_step() -> None:
    async def step() -> None:
        await asyncio.sleep(0.1)
        raise ValueError("begin failed")

    async def scenario() -> str:
        task = asyncio.ensure_future(shielded(step()))
        await asyncio.sleep(0.02)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        except ValueError:
            return "cancellation lost"
        return "returned"

    assert asyncio.run(scenario()) == "cancelled"


def test_without_a_cancellation_the_step_error_propagates() -> None:
    async def step() -> None:
        raise ValueError("begin failed")

    async def scenario() -> None:
        with pytest.raises(ValueError):
            await shielded(step())

    asyncio.run(scenario())


# -- m1: the bound ----------------------------------------------------------------------------------------------------

def _never_ending(started: Optional[asyncio.Event] = None) -> Any:
    async def step() -> None:
        if started is not None:
            started.set()
        await asyncio.Event().wait()  # a database that never answers

    return step()


def test_a_cancelled_call_aborts_a_step_that_outlives_the_grace(short_grace: float) -> None:
    async def scenario() -> tuple[bool, list[str], float]:
        aborted: list[str] = []
        started = asyncio.Event()
        task = asyncio.ensure_future(shielded(_never_ending(started), abort=lambda: aborted.append("closed")))
        await started.wait()
        t0 = time.monotonic()
        task.cancel()  # once: a request timeout
        done, _ = await asyncio.wait({task}, timeout=short_grace + 2)
        elapsed = time.monotonic() - t0
        if not done:
            task.cancel()
            await asyncio.wait({task}, timeout=1)
        return bool(done) and task.cancelled(), aborted, elapsed

    cancelled, aborted, elapsed = asyncio.run(scenario())
    assert cancelled and aborted == ["closed"]
    assert elapsed < short_grace + 1


def test_the_cleanup_of_a_cancelled_call_is_bounded_from_the_start(short_grace: float) -> None:
    """``cancelling=True``: no further cancellation needs to arrive (the call was cancelled once, before)."""

    async def scenario() -> tuple[bool, bool, list[str]]:
        aborted: list[str] = []
        release = asyncio.Event()  # the database answering again

        async def step() -> None:
            await release.wait()

        task = asyncio.ensure_future(shielded(step(), abort=lambda: aborted.append("closed"), cancelling=True))
        done, _ = await asyncio.wait({task}, timeout=short_grace + 2)
        release.set()  # lets a task still pending (the bug) end
        await asyncio.wait({task}, timeout=1)
        return bool(done), task.cancelled(), aborted

    assert asyncio.run(scenario()) == (True, True, ["closed"])


def test_without_abort_the_step_is_awaited_to_its_end(short_grace: float) -> None:
    async def scenario() -> list[str]:
        done: list[str] = []

        async def step() -> None:
            await asyncio.sleep(short_grace * 2)
            done.append("step finished")

        task = asyncio.ensure_future(shielded(step()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return done

    assert asyncio.run(scenario()) == ["step finished"]


# -- m1 on real databases: a TCP forwarder that freezes ---------------------------------------------------------------

class Freezer:
    """A TCP forwarder to ``(host, port)`` that holds every byte while frozen (a network partition)."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.frozen = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                while self.frozen.is_set():
                    time.sleep(0.02)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.frozen.clear()
        time.sleep(0.2)  # let the pumps deliver what they held
        self.listener.close()
        for s in self.sockets:
            try:  # shutdown, not only close: it wakes a pump blocked in recv and sends the FIN
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


async def _connect(driver: str, port: int) -> Any:
    if driver == "asyncpg":
        import asyncpg

        return await asyncpg.connect(host="127.0.0.1", port=port, user=POSTGRES["user"], database=POSTGRES["dbname"])
    if driver == "psycopg_async":
        import psycopg

        return await psycopg.AsyncConnection.connect(f"host=127.0.0.1 port={port} user={POSTGRES['user']} "
                                                     f"dbname={POSTGRES['dbname']}")
    import aiomysql

    return await aiomysql.connect(host="127.0.0.1", port=port, user=MYSQL["user"], password=MYSQL["password"],
                                  db=MYSQL["database"], charset="utf8mb4")


def _closed(driver: str, conn: Any) -> bool:
    if driver == "asyncpg":
        return bool(conn.is_closed())
    return bool(conn.closed)


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg_async", "aiomysql"])
def test_a_cancelled_call_on_an_unreachable_database_ends_within_the_grace(driver: str, short_grace: float) -> None:
    """Before: the task stayed pending until the database answered again (the repro: 5 s and counting)."""
    service = "mysql" if driver == "aiomysql" else "postgres"
    require(service)
    _prepare(service)
    freezer = Freezer(MYSQL["host"] if service == "mysql" else POSTGRES["host"], 3306 if service == "mysql" else 5432)
    gid = local_gid()

    async def scenario() -> tuple[bool, bool, float]:
        conn = await _connect(driver, freezer.port)
        await BranchBarrier("saga", local_gid(), "01", "action").call(conn, lambda tx: None)  # the table check
        in_busi = asyncio.Event()

        async def busi(tx: Any) -> None:
            in_busi.set()
            await asyncio.sleep(3600)  # awaiting another service

        task = asyncio.ensure_future(BranchBarrier("saga", gid, "01", "action").call(conn, busi))
        await in_busi.wait()
        freezer.frozen.set()  # the database becomes unreachable
        t0 = time.monotonic()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=short_grace + 2)
        elapsed = time.monotonic() - t0
        freezer.frozen.clear()  # heal, so that a task still pending (the bug) can end
        if not done:
            await asyncio.wait({task}, timeout=10)
        cancelled = task.done() and task.cancelled()
        closed = _closed(driver, conn)
        if not closed:
            result = conn.close()
            if asyncio.iscoroutine(result):
                await result
        return bool(done) and cancelled, closed, elapsed

    try:
        ended, closed, elapsed = asyncio.run(scenario())
    finally:
        freezer.close()
    assert ended and elapsed < short_grace + 1.5
    assert closed  # not handed back to a pool with its transaction open
    # The server rolled the cancelled call back (it saw the connection closed): DTM's redelivery runs
    # at once instead of waiting for the row lock of a transaction still open on the server.
    sync = mysql_connect() if service == "mysql" else psycopg2_connect()
    try:
        execute(sync, "set innodb_lock_wait_timeout = 5" if service == "mysql" else "set lock_timeout = '5s'")
        sync.commit()
        bb = SyncBarrier("saga", gid, "01", "action")
        bb.call(sync, lambda tx: None)
        assert bb.last_decision is Decision.RUN
    finally:
        sync.close()
