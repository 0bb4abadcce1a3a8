"""The asyncio driver of the lean HTTP/1.1 core (:mod:`dtmcli._h11core`): a Protocol and a pool.

Each connection is an :class:`asyncio.Protocol` that feeds the received bytes straight into the
core's response parser (no stream reader in between); the request coroutine sleeps on one future
per exchange. The decisions (request bytes, parsing, keep-alive, the resend rule) are the core's,
shared with the blocking :class:`dtmcli._http11.Http11Transport`; this module only performs what
the core's :func:`~dtmcli._h11core.exchange` asks for:

* SEND: one ``transport.write`` (head and small body together; a large body in a second one). When
  the first write fails at once (reset, broken pipe: asyncio closes the transport before ``write``
  returns, and its one ``send`` call took nothing) the flow gets :class:`~dtmcli._h11core.Unsent`
  and resends only on a reused connection. When a later part fails (at once, or while asyncio
  writes the rest) bytes of the request have left: the flow reads the server's early answer, or
  fails with "may have been processed".
* receive: bytes are sent into the flow as they arrive; EOF as ``b""``; a reset thrown in. When
  asyncio drops a plain TCP connection on a write error it stops reading at once; what the server
  answered before its reset is then still read from the socket (an early 413) before the error.
* CHECK (decoding a large compressed body): nothing; the deadline is the caller's timer, so a
  decode can overrun it by at most the time to decode :data:`~dtmcli._h11core.MAX_DECODED` bytes.
* RECONNECT: the connection is dropped and a new one opened.

An idle connection is stale (not reused) when the server sent anything or closed it while it was
idle, or its socket is readable (a zero-timeout poll, as the sync transport does, for what arrived
since the loop last looked). A connection goes back to the pool only after an answer was read
completely and the server keeps it open; on any error or cancellation it is aborted.

The transport class (:class:`~dtmcli.asyncio._transport.AsyncHttp11Transport`) is in
:mod:`dtmcli.asyncio._transport`, on the per-loop template shared with the aiohttp and httpx ones.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import select
import ssl
from collections import deque
from typing import Any, Callable, Generator, Mapping, Optional, Union

from .. import _h11core as h11
from .._h11core import CHECK, RECONNECT
from .._http11 import warn_if_proxy
from ..errors import DtmConnectError, DtmInvalidInput, DtmTransportError

__all__ = ["Deadlines", "LoopPool", "send"]

_Flow = Generator[int, Any, tuple[int, bytes, bool]]
_Outcome = Union[int, tuple[int, bytes, bool]]  # RECONNECT, or the answer


class _Conn(asyncio.Protocol):
    """One connection: hands what it receives to the flow reading an answer on it."""

    __slots__ = ("early", "flow", "loop", "poller", "raw", "transport", "waiter")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.raw: Any = None  # the TCP transport (under TLS, the TLS one is ``transport``)
        self.poller: Any = None
        self.flow: Optional[_Flow] = None
        self.waiter: Optional[asyncio.Future[_Outcome]] = None
        self.early: Optional[list[tuple[bytes, Optional[BaseException]]]] = None  # events while idle

    # -- asyncio's callbacks --------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = self.raw = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.poller = select.poll()
            self.poller.register(sock.fileno(), select.POLLIN)

    def data_received(self, data: bytes) -> None:
        if self.flow is None:
            self._idle_event(data, None)
        else:
            self._resume(data, None)

    def eof_received(self) -> None:
        self.data_received(b"")  # and asyncio closes the transport

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.flow is None:
            self._idle_event(b"", exc)
        elif exc is None:
            self._resume(b"", None)
        else:
            self._drain()
            if self.flow is not None:
                self._resume(b"", exc)

    def _drain(self) -> None:
        """Read what is left in a plain TCP socket asyncio gave up on (a write error stops its reading):
        the answer a server sent before resetting the connection. The socket is still open here."""
        if self.raw is not self.transport or type(self.raw).__module__ != "asyncio.selector_events":
            return  # TLS (the bytes need decrypting), or a loop that may have closed the fd already
        sock = self.raw.get_extra_info("socket")
        fd = -1 if sock is None else sock.fileno()
        while fd >= 0 and self.flow is not None:
            try:
                data = os.read(fd, h11.RECV_SIZE)
            except OSError:  # nothing more (EAGAIN), or the reset itself
                return
            if not data:
                return
            self._resume(data, None)

    # -- the exchange ---------------------------------------------------------------------------

    def _idle_event(self, data: bytes, exc: Optional[BaseException]) -> None:
        if self.early is None:
            self.early = []
        self.early.append((data, exc))

    def _resume(self, data: bytes, exc: Optional[BaseException]) -> None:
        flow = self.flow
        assert flow is not None
        try:
            op = flow.send(data) if exc is None else flow.throw(exc)
            while op == CHECK:  # a large decode: the deadline is the caller's timer
                op = flow.send(None)
        except StopIteration as done:
            self._finish(done.value, None)
        except Exception as error:  # the parser's DtmTransportError, a reset mid-answer, ...
            self._finish(None, error)
        else:
            if op == RECONNECT:  # closed before an answer and safe to resend: the driver's move
                self._finish(op, None)

    def _finish(self, outcome: Optional[_Outcome], exc: Optional[BaseException]) -> None:
        self.flow = None
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():  # cancelled: the caller aborts this connection
            return
        if exc is None:
            waiter.set_result(outcome)  # type: ignore[arg-type]
        else:
            waiter.set_exception(exc)

    def receive(self, flow: _Flow) -> asyncio.Future[_Outcome]:
        """Feed ``flow`` (waiting for bytes) what arrives; the future gets its outcome."""
        self.flow = flow
        self.waiter = waiter = self.loop.create_future()
        early, self.early = self.early, None
        for data, exc in early or ():  # a fresh connection that got something before the request
            if self.flow is None:
                break
            self._resume(data, exc)
        return waiter

    # -- pool hooks -----------------------------------------------------------------------------

    def stale(self) -> bool:
        """True when the server sent something or closed the connection while it was idle."""
        if self.early is not None or self.raw.is_closing():
            return True
        return bool(self.poller is not None and self.poller.poll(0))

    def close(self) -> None:
        self.flow = None
        self.transport.close()

    def abort(self) -> None:
        self.flow = None
        self.transport.abort()
        if self.raw is not self.transport:
            self.raw.abort()


class _Deadline:
    """A pending deadline: ``cancel()`` clears its callback (the entry is dropped lazily)."""

    __slots__ = ("callback", "owner")

    def __init__(self, callback: Callable[[], None], owner: Deadlines) -> None:
        self.callback: Optional[Callable[[], None]] = callback
        self.owner = owner

    def cancel(self) -> None:
        if self.callback is not None:
            self.callback = None
            self.owner.live -= 1


class Deadlines:
    """The deadlines of one loop's requests on one loop timer (``loop.call_later`` per request costs
    a Python TimerHandle, compared in Python on every heap push: about a fifth of a request's CPU).

    Entries sit in a heap of (when, sequence, entry) tuples compared in C; the loop timer is armed
    for the earliest one. Cancelled entries are skipped when they come up, or swept out when they
    outnumber the live ones.
    """

    __slots__ = ("armed", "armed_at", "heap", "live", "loop", "seq")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[tuple[float, int, _Deadline]] = []
        self.armed: Optional[asyncio.TimerHandle] = None
        self.armed_at = float("inf")
        self.live = 0
        self.seq = 0

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Deadline:
        """Call ``callback`` after ``delay`` seconds unless the returned entry is cancelled first."""
        at = self.loop.time() + delay
        entry = _Deadline(callback, self)
        self.live += 1
        self.seq += 1
        heap = self.heap
        if len(heap) > 1024 and len(heap) > 2 * self.live:
            heap[:] = [item for item in heap if item[2].callback is not None]
            heapq.heapify(heap)
        heapq.heappush(heap, (at, self.seq, entry))
        if at < self.armed_at:
            self._arm(at)
        return entry

    def _arm(self, at: float) -> None:
        if self.armed is not None:
            self.armed.cancel()
        self.armed = self.loop.call_at(at, self._fire)
        self.armed_at = at

    def _fire(self) -> None:
        self.armed, self.armed_at = None, float("inf")
        heap = self.heap
        now = self.loop.time()
        while heap and (heap[0][2].callback is None or heap[0][0] <= now):
            entry = heapq.heappop(heap)[2]
            callback = entry.callback
            if callback is not None:
                entry.cancel()
                callback()
        if heap:
            self._arm(heap[0][0])


class LoopPool:
    """One event loop's connections: the idle ones, a bound on those in use, the deadlines."""

    __slots__ = ("busy", "closed", "deadlines", "idle", "maxsize", "waiters")

    def __init__(self, maxsize: int) -> None:
        self.idle: h11.IdleConnections[_Conn] = h11.IdleConnections()
        self.deadlines = Deadlines(asyncio.get_running_loop())
        self.maxsize = maxsize
        self.busy = 0  # connections in use (or being opened)
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.closed = False
        warn_if_proxy("AsyncHttp11Transport")

    async def acquire(self) -> None:
        """Wait for a free slot (a request in flight) when ``maxsize`` are taken."""
        if self.busy < self.maxsize and not self.waiters:
            self.busy += 1
            return
        waiter = self.deadlines.loop.create_future()
        self.waiters.append(waiter)
        try:
            await waiter  # release() hands its slot over
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed over, then cancelled: pass it on
                self.release()
            elif waiter in self.waiters:
                self.waiters.remove(waiter)
            raise

    def release(self) -> None:
        """Free a slot, or hand it to the next waiter."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.busy -= 1

    def close(self) -> None:
        """Close the idle connections; those in use are closed when their request ends."""
        self.closed = True
        self.idle.close_all()


async def _open(t: h11.Target, ssl_context: Optional[ssl.SSLContext], method: str, url: str) -> _Conn:
    loop = asyncio.get_running_loop()
    try:
        _, conn = await loop.create_connection(_Conn, t.host, t.port)
    except OSError as exc:  # refused, unreachable, DNS (gaierror)
        raise DtmConnectError(f"{method} {url}: cannot connect: {exc}") from exc
    if t.tls:
        if ssl_context is None:
            raise DtmInvalidInput("an https URL needs the transport's SSL context")
        try:
            conn.transport = await loop.start_tls(conn.raw, conn, ssl_context, server_hostname=t.host)
        except (OSError, ssl.CertificateError) as exc:  # ssl.SSLError is an OSError
            conn.raw.abort()
            raise DtmTransportError(f"{method} {url} failed: TLS: {exc}") from exc
        except BaseException:
            conn.raw.abort()
            raise
    return conn


async def send(
    pool: LoopPool,
    writer: h11.RequestWriter,
    ssl_context: Any,
    method: str,
    url: str,
    params: Optional[Mapping[str, str]],
    body: Optional[bytes],
    headers: Optional[Mapping[str, str]],
    attempt: Any,
) -> tuple[int, bytes]:
    """One exchange on ``pool``: status and body. ``attempt.may_be_sent`` is set before the first write;
    ``ssl_context`` is an SSLContext or a callable making one (called for https only)."""
    t, payload, rest = writer.prepare(method, url, params, body, headers)
    ctx = (ssl_context if isinstance(ssl_context, ssl.SSLContext) else ssl_context()) if t.tls else None
    key = t.key
    if pool.busy < pool.maxsize and not pool.waiters:  # a free slot (acquire()'s fast path, inline)
        pool.busy += 1
    else:
        await pool.acquire()
    conn: Optional[_Conn] = None
    keep = False
    try:
        conn = pool.idle.take(key)
        flow = h11.exchange(method, url, conn is not None)
        if conn is None:
            conn = await _open(t, ctx, method, url)
        op = next(flow)
        while True:
            if op == RECONNECT:
                conn.abort()
                conn = None
                conn = await _open(t, ctx, method, url)
                op = flow.send(None)
                continue
            attempt.may_be_sent = True  # SEND
            conn.transport.write(payload)
            if conn.raw.is_closing():  # the first write failed at once: not one byte left
                refused = ConnectionResetError("the connection was closed while the request was written")
                op = flow.throw(h11.Unsent(refused))
                continue
            if rest is not None:
                conn.transport.write(rest)
                if conn.raw.is_closing():  # part of it left: the flow reads an early answer, or fails
                    broken = ConnectionResetError("the connection was reset while the request body was written")
                    op = flow.throw(broken)
                else:
                    op = flow.send(None)
            else:
                op = flow.send(None)  # now waiting for the answer's first bytes
            if op == RECONNECT:
                continue
            outcome = await conn.receive(flow)
            if isinstance(outcome, int):
                op = outcome
                continue
            status, content, keep = outcome
            return status, content
    finally:
        if conn is not None:
            if keep and not pool.closed:
                conn.flow = None
                pool.idle.put(key, conn, pool.maxsize)
            elif keep:
                conn.close()
            else:
                conn.abort()  # half-read, failed or cancelled: never reused
        pool.release()
