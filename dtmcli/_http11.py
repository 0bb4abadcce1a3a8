"""A lean HTTP/1.1 transport on plain sockets: the default for DTM's small JSON calls.

Why: urllib3 spends most of a call in its own layers (URL parsing, pool lookup, header objects,
``email``-based header parsing, a wrapper per read for the total deadline), twice the CPU of a bare
``http.client`` request. This transport writes each request with one ``sendall`` and parses the
answer from the bytes it receives (usually one ``recv``), and keeps what :class:`Urllib3Transport`
guarantees:

* **pooling and thread safety**: idle keep-alive connections per (scheme, host, port) in a list;
  a call takes one (``list.pop`` is atomic) and gives it back when the answer was read completely
  and the server keeps the connection open; at most ``pool_maxsize`` idle ones are kept per host;
* **fork safety**: a forked child never uses (or closes) the connections it inherited;
* **TLS** through an ``ssl.SSLContext`` (default: ``ssl.create_default_context()``, which verifies
  the certificate and the host name);
* **a total deadline**: every connect, send and receive gets the time left of the call;
* **the same errors**: DtmConnectError (nothing sent), DtmConnectTimeout, DtmTimeout,
  DtmTransportError, raised for the same causes as the urllib3 transport;
* **the same request target**: the URL goes through urllib3's parser (percent-encoding, dot
  segments, no userinfo), cached per URL.

Proxies are not spoken here: :func:`~dtmcli._transport.default_transport` picks the requests
transport when a proxy is configured, and :class:`Urllib3Transport` takes ``proxy_url``.

**A stale keep-alive connection** (the server closed it while it was idle) is detected before use
with a zero-timeout poll and replaced. If a reused connection still fails, the request is sent again
on a new connection only when the server cannot have seen it: the first ``send`` of the request was
refused outright (not one byte left), or the method is safe (GET, HEAD, OPTIONS) and not one byte of
an answer came back. Once a byte of a POST (submit, prepare, ...) left, it is never resent: when the
rest cannot be written the server's early answer is read and returned (a 413, as urllib3 does), or
the failure is a DtmTransportError (never DtmConnectError) and the client's flow decides
(protocol.md §2). See :mod:`dtmcli._h11core` for this rule and the bounds on what a server sends.

The HTTP/1.1 itself (request bytes, response parsing, that resend rule) is sans-I/O in
:mod:`dtmcli._h11core`, shared with the asyncio twin :mod:`dtmcli.asyncio._http11`; this module is
its blocking-socket driver.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl
import threading
import time
from typing import Any, Mapping, Optional
from urllib.request import getproxies

from . import _h11core as h11
from ._h11core import CHECK, FRAMING_HEADERS, MAX_HEADER_BYTES, RECONNECT, SEND
from ._protocol import Response, redact_url
from .errors import DtmConnectError, DtmConnectTimeout, DtmInvalidInput, DtmTimeout, DtmTransportError

_MAX_HOSTS = h11.MAX_HOSTS  # the bound on hosts with idle connections (h11.IdleConnections)

__all__ = ["Http11Transport", "MAX_TIMEOUT", "check_timeout", "FRAMING_HEADERS", "MAX_HEADER_BYTES"]

logger = logging.getLogger("dtmcli")

MAX_TIMEOUT = 1e9
"""The longest timeout in seconds (about 31 years); sockets refuse much larger ones with OverflowError."""


def check_timeout(value: Any, what: str = "timeout") -> Optional[float]:
    """``value`` if it is a positive, finite number of seconds or ``None`` (no deadline), else DtmInvalidInput."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT:
        raise DtmInvalidInput(
            f"{what} must be a positive number of seconds up to 1e9, or None for no deadline, not {value!r}"
        )
    return value


# -- fork safety: as in _transport, a global pid set by an at-fork hook (a global read costs ~15 ns,
# os.getpid() is a syscall). A child drops the inherited connections unused and never closes them:
# closing a TLS socket may send close_notify on a connection the parent still uses.
_pid = os.getpid()
_renew_lock = threading.Lock()
_inherited: list[Any] = []


def _after_fork_in_child() -> None:
    global _pid, _renew_lock
    _pid = os.getpid()
    _renew_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def warn_if_proxy(what: str) -> None:
    """Log a WARNING when the environment configures a proxy, which the lean transports do not use
    (the default transports pick a proxy-capable one then: this is an explicit choice)."""
    names = sorted(k for k in getproxies() if k.lower() != "no")
    if names:
        logger.warning(
            "%s connects directly: the proxy configured in the environment (%s) is not used; "
            "unset DTMCLI_TRANSPORT / DTMCLI_ASYNC_TRANSPORT to get a transport that uses it",
            what, ", ".join(f"{n}_proxy" for n in names),
        )

class _Conn:
    """One keep-alive connection: its socket and a poller to see it was closed while idle."""

    __slots__ = ("poller", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)

    def stale(self) -> bool:
        """True when the idle connection has something to read: the server's FIN, a reset, or junk."""
        if self.poller.poll(0):
            return True
        pending = getattr(self.sock, "pending", None)  # TLS bytes already decrypted
        return bool(pending is not None and pending())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Http11Transport:
    """A thread-safe keep-alive HTTP/1.1 client on sockets (see the module docstring).

    ``timeout`` is a total deadline per request in seconds (``None``: none). ``pool_maxsize`` idle
    connections are kept per host. ``ssl_context`` is used for https (default: verified against
    the system's CAs). It speaks to servers directly: for a proxy use :class:`RequestsTransport`
    or :class:`Urllib3Transport` with ``proxy_url``.
    """

    def __init__(
        self,
        *,
        timeout: Optional[float] = 10.0,
        pool_maxsize: int = 32,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        if isinstance(pool_maxsize, bool) or not isinstance(pool_maxsize, int) or pool_maxsize < 1:
            raise DtmInvalidInput(f"pool_maxsize must be a positive int, not {pool_maxsize!r}")
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise DtmInvalidInput(f"ssl_context must be an ssl.SSLContext, not {type(ssl_context).__name__}")
        self.timeout = check_timeout(timeout)
        self.pool_maxsize = pool_maxsize
        self._ssl_context = ssl_context
        self._idle: h11.IdleConnections[_Conn] = h11.IdleConnections()
        self._writer = h11.RequestWriter()
        self._pid = _pid
        warn_if_proxy("Http11Transport")

    # -- connections -------------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _connect(self, t: h11.Target, at: Optional[float], method: str, url: str) -> _Conn:
        left = None if at is None else at - time.monotonic()
        if left is not None and left <= 0:
            raise DtmConnectTimeout(f"{method} {url}: connecting timed out: no time left")
        try:
            sock = socket.create_connection((t.host, t.port), timeout=left)
        except socket.timeout as exc:
            raise DtmConnectTimeout(f"{method} {url}: connecting timed out: {exc}") from exc
        except OSError as exc:  # refused, unreachable, DNS (gaierror)
            raise DtmConnectError(f"{method} {url}: cannot connect: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if t.tls:
                if at is not None:
                    sock.settimeout(max(at - time.monotonic(), 1e-3))
                sock = self._context().wrap_socket(sock, server_hostname=t.host)
        except socket.timeout as exc:
            sock.close()
            raise DtmTimeout(f"{method} {url} timed out: TLS handshake: {exc}") from exc
        except (OSError, ssl.CertificateError) as exc:  # ssl.SSLError is an OSError
            sock.close()
            raise DtmTransportError(f"{method} {url} failed: TLS: {exc}") from exc
        return _Conn(sock)

    def _give_back(self, key: tuple[str, str, int], conn: _Conn, pid: int) -> None:
        if pid == self._pid:
            self._idle.put(key, conn, self.pool_maxsize)
        else:
            conn.close()

    # -- the call ----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Optional[Mapping[str, str]] = None,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Response:
        """Send one request; connection problems become DtmTransportError / DtmTimeout."""
        if self._pid != _pid:
            self._after_fork()
        if timeout is None:
            timeout = self.timeout
        started = time.perf_counter()
        at = None if timeout is None else time.monotonic() + timeout
        t, payload, rest = self._writer.prepare(method, url, params, body, headers)
        try:
            status, content = self._exchange(t, payload, rest, method, url, at)
        except socket.timeout as exc:
            raise DtmTimeout(f"{method} {url} timed out: {exc}") from exc
        except OSError as exc:
            raise DtmTransportError(f"{method} {url} failed: {exc}") from exc
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s -> %d in %.1f ms (%d bytes)",
                method, redact_url(url), status, (time.perf_counter() - started) * 1000, len(content),
            )
        return Response(status, content)

    def _exchange(
        self, t: h11.Target, payload: bytes, rest: Optional[bytes], method: str, url: str, at: Optional[float]
    ) -> tuple[int, bytes]:
        """Drive :func:`~dtmcli._h11core.exchange` with blocking socket calls, each bounded by the deadline."""
        key = t.key
        pid = self._pid
        conn = self._idle.take(key)
        flow = h11.exchange(method, url, conn is not None)
        if conn is None:
            conn = self._connect(t, at, method, url)
        keep = False
        try:
            op = next(flow)
            while True:
                if op == RECONNECT:
                    conn.close()
                    conn = None
                    conn = self._connect(t, at, method, url)
                    op = flow.send(None)
                    continue
                sock = conn.sock
                try:
                    if at is not None:
                        left = at - time.monotonic()
                        if left <= 0:
                            raise socket.timeout("timed out (total deadline)")
                        sock.settimeout(left)
                    elif op == SEND:
                        sock.settimeout(None)
                    unsent = None
                    if op == SEND:
                        try:
                            sent = sock.send(payload)
                        except socket.timeout:
                            raise
                        except OSError as exc:  # refused outright: not one byte left
                            unsent = h11.Unsent(exc)
                        else:
                            if sent < len(payload):
                                sock.sendall(memoryview(payload)[sent:])
                            if rest is not None:
                                sock.sendall(rest)
                        data = None
                    elif op == CHECK:  # decoding: the deadline was checked above
                        data = None
                    else:
                        data = sock.recv(op)
                except OSError as exc:  # the flow decides (resend or not); timeouts come back out
                    op = flow.throw(exc)
                else:
                    op = flow.send(data) if unsent is None else flow.throw(unsent)
        except StopIteration as done:
            status, content, keep = done.value
            return status, content
        finally:
            if conn is not None:
                if keep:
                    self._give_back(key, conn, pid)
                else:
                    conn.close()

    # -- lifecycle ---------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: forget the inherited connections without closing them (the parent's)."""
        with _renew_lock:
            if self._pid != _pid:
                self._renew_pools()
                self._pid = _pid

    def _renew_pools(self) -> None:
        _inherited.append(self._idle)
        self._idle = h11.IdleConnections()

    def close(self) -> None:
        """Close every idle connection (in a forked child: drop the inherited ones unused)."""
        if self._pid != _pid:
            self._after_fork()
        idle, self._idle = self._idle, h11.IdleConnections()
        idle.close_all()
