"""HTTP transport: the one place that does network I/O for the sync client.

``Transport`` is the seam: builders and the client only call ``request()``, so another
implementation (a custom session, an asyncio twin, a test double) plugs in without touching them.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import socket
import threading
import time
import weakref
from typing import Any, Mapping, Optional, Protocol, runtime_checkable
from urllib.parse import urlencode
from urllib.request import getproxies

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NewConnectionError, ReadTimeoutError

from ._http11 import MAX_TIMEOUT, Http11Transport, check_timeout
from ._protocol import Response, redact_url
from .errors import DtmConnectError, DtmConnectTimeout, DtmInvalidInput, DtmTimeout, DtmTransportError

__all__ = [
    "Transport", "Http11Transport", "RequestsTransport", "Urllib3Transport", "default_transport", "check_timeout",
    "MAX_TIMEOUT",
]

logger = logging.getLogger("dtmcli")

_JSON_HEADERS = {"Content-Type": "application/json"}


# -- fork safety ---------------------------------------------------------------------------------
# A forked child must not use the keep-alive sockets it inherited: parent and children would read
# each other's answers. The at-fork hook records the child's pid (a global read costs ~15 ns on the
# hot path; os.getpid() is a ~180 ns syscall) and a fresh lock; each transport compares the pid it
# built its pools in and builds new ones on first use in a new process. Old pools are neither
# closed nor freed: their locks may be held by a parent thread that does not exist here (urllib3's
# finalizer of a collected pool takes its queue lock), and closing a socket must not send anything
# (TLS close_notify, shutdown) on a connection the parent still uses. They stay referenced from
# _inherited for the child's lifetime; their descriptors (a few per fork) leak in the child by design.
# The same finalizers also run when an inherited pool the child never used is collected, and at exit:
# the hook detaches them for every pool that exists at fork time (the OS closes the descriptors).

_pid = os.getpid()
_renew_lock = threading.Lock()
_inherited: list[Any] = []


def _detach_pool_finalizers() -> None:
    close_pool = getattr(urllib3.connectionpool, "_close_pool_connections", None)  # urllib3 2.x
    registry: Any = getattr(weakref.finalize, "_registry", {})  # CPython's weakref.py
    for finalizer in list(registry):
        info = finalizer.peek()
        if info is not None and info[1] is close_pool:
            finalizer.detach()  # neither when collected nor at exit: its lock may be a dead thread's


def _after_fork_in_child() -> None:
    global _pid, _renew_lock
    _pid = os.getpid()
    _renew_lock = threading.Lock()
    _detach_pool_finalizers()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _ForkSafe:
    """Pools built in one process; ``_pools_for_this_process()`` renews them after a fork."""

    _pid: int

    def _renew_pools(self) -> None:
        raise NotImplementedError

    def _pools_for_this_process(self) -> None:
        if self._pid != _pid:
            with _renew_lock:
                if self._pid != _pid:
                    self._renew_pools()
                    self._pid = _pid


# -- total deadline ------------------------------------------------------------------------------
# urllib3 and requests apply a read timeout to each socket read, so a server dripping a byte at a
# time keeps a call alive indefinitely. Connections made by this module read through a wrapper that
# sets the socket timeout to the time left before every read; the deadline is per thread and set
# only for the duration of one transport call, so the same connections behave as usual elsewhere.

_deadline = threading.local()


class _DeadlineReader(io.RawIOBase):
    """A socket's raw reader whose every read ends by the calling thread's deadline."""

    def __init__(self, raw: Any, sock: Any) -> None:
        super().__init__()
        self._raw = raw
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> Optional[int]:
        at = getattr(_deadline, "at", None)
        if at is not None:
            left = at - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out (total deadline)")
            self._sock.settimeout(left)
        n: Optional[int] = self._raw.readinto(b)
        return n

    def fileno(self) -> int:
        fd: int = self._raw.fileno()
        return fd

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _DeadlineSocket:
    """What ``http.client.HTTPResponse`` is given instead of the socket: it only calls ``makefile``."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_DeadlineReader(self._sock.makefile("rb", buffering=0), self._sock))


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(_DeadlineSocket(sock), *args, **kwargs)  # type: ignore[arg-type]


class _DeadlineHTTPConnection(HTTPConnection):
    response_class = _DeadlineResponse


class _DeadlineHTTPSConnection(HTTPSConnection):
    response_class = _DeadlineResponse


class _DeadlineHTTPPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


_DEADLINE_POOLS = {"http": _DeadlineHTTPPool, "https": _DeadlineHTTPSPool}


def _with_deadline(manager: Any) -> Any:
    """Make the pools a urllib3 PoolManager/ProxyManager creates from now on honour the deadline."""
    if manager.pool_classes_by_scheme is urllib3.poolmanager.pool_classes_by_scheme:  # not customised
        manager.pool_classes_by_scheme = _DEADLINE_POOLS
    return manager


class _DeadlineAdapter(HTTPAdapter):
    """requests' adapter with deadline-aware pools (also for proxies)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        _with_deadline(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        return _with_deadline(super().proxy_manager_for(proxy, **proxy_kwargs))


def _renew_adapter(adapter: HTTPAdapter) -> None:
    """Give a requests adapter fresh, empty pools without touching the old ones."""
    # The sizes HTTPAdapter.__init__ recorded (requests' own __setstate__ rebuilds pools from them).
    sizes: Any = adapter
    _inherited.append((adapter.poolmanager, adapter.proxy_manager))
    adapter.init_poolmanager(sizes._pool_connections, sizes._pool_maxsize, block=sizes._pool_block)
    adapter.proxy_manager = {}
    _with_deadline(adapter.poolmanager)


def _with_deadline_adapter(adapter: HTTPAdapter) -> None:
    """Deadline-aware pools for a plain ``HTTPAdapter`` of the user's session, proxies included.

    Proxy managers made earlier are covered too: requests reuses them through proxy_manager_for.
    SOCKS proxies are not: their pool classes are customised, so each read keeps requests' per-read
    timeout there.
    """
    if getattr(adapter, "_dtmcli_deadline", False):  # one wrapper per adapter, however many transports
        return
    for manager in (adapter.poolmanager, *adapter.proxy_manager.values()):
        if manager.pools and _with_deadline(manager).pool_classes_by_scheme is _DEADLINE_POOLS:
            manager.clear()  # a session used already: its pools hold plain connections
        _with_deadline(manager)
    adapter._dtmcli_deadline = True  # type: ignore[attr-defined]
    if isinstance(adapter, _DeadlineAdapter):
        return
    plain = adapter.proxy_manager_for

    def proxy_manager_for(proxy: str, **proxy_kwargs: Any) -> Any:
        return _with_deadline(plain(proxy, **proxy_kwargs))

    adapter.proxy_manager_for = proxy_manager_for  # type: ignore[method-assign]


def _log_exchange(method: str, url: str, status: int, started: float, content: bytes) -> None:
    logger.debug(
        "%s %s -> %d in %.1f ms (%d bytes)", method, redact_url(url), status, (time.perf_counter() - started) * 1000,
        len(content),
    )


@runtime_checkable
class Transport(Protocol):
    """What the client needs from HTTP: one blocking request, and close().

    ``timeout`` is a total deadline for the request (connect, send, every read), not a per-read
    limit; ``None`` means the transport's own. The client passes the time left of its call's
    budget. An implementation that pools connections must not reuse them in a forked child.
    """

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
        """Send one request and return its answer; raise DtmTransportError below HTTP."""
        ...

    def close(self) -> None:
        """Release pooled connections."""
        ...


class RequestsTransport(_ForkSafe):
    """A thread-safe, keep-alive connection pool on ``requests``.

    Pass your own ``session`` to reuse its TLS, proxy and auth settings. ``trust_env=False``
    skips per-request proxy/netrc lookups from the environment (noticeably faster). ``timeout`` is a
    total deadline per request in seconds (``None``: no deadline; through a SOCKS proxy each read is
    bounded instead). In a forked child the session's adapters get fresh pools (the
    inherited connections belong to the parent); pools of your own ``HTTPAdapter`` subclasses are
    renewed with their ``init_poolmanager``.
    """

    def __init__(
        self,
        session: Optional[requests.Session] = None,
        *,
        timeout: Optional[float] = 10.0,
        pool_maxsize: int = 32,
        trust_env: Optional[bool] = None,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            adapter = _DeadlineAdapter(pool_connections=8, pool_maxsize=pool_maxsize)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        else:
            for mounted in session.adapters.values():
                if isinstance(mounted, HTTPAdapter):
                    _with_deadline_adapter(mounted)
        if trust_env is not None:
            session.trust_env = trust_env
        self.session = session
        self._pid = _pid

    def _renew_pools(self) -> None:
        for adapter in self.session.adapters.values():
            if isinstance(adapter, HTTPAdapter):
                _renew_adapter(adapter)

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
        if headers is None:
            headers = _JSON_HEADERS if body is not None else None
        if self._pid != _pid:
            self._pools_for_this_process()
        if timeout is None:
            timeout = self.timeout
        started = time.perf_counter()
        _deadline.at = None if timeout is None else time.monotonic() + timeout
        try:
            r = self.session.request(
                method, url, params=params, data=body, headers=headers, timeout=timeout, allow_redirects=False
            )
            content = r.content
        except requests.ConnectTimeout as exc:
            raise DtmConnectTimeout(f"{method} {url}: connecting timed out: {exc}") from exc
        except requests.Timeout as exc:
            raise DtmTimeout(f"{method} {url} timed out: {exc}") from exc
        except requests.ConnectionError as exc:
            cause = exc.args[0] if exc.args else None
            if isinstance(cause, ReadTimeoutError):  # requests wraps a timeout while reading the body so
                raise DtmTimeout(f"{method} {url} timed out: {exc}") from exc
            if isinstance(getattr(cause, "reason", None), NewConnectionError):
                raise DtmConnectError(f"{method} {url}: cannot connect: {exc}") from exc
            raise DtmTransportError(f"{method} {url} failed: {exc}") from exc
        except requests.RequestException as exc:
            raise DtmTransportError(f"{method} {url} failed: {exc}") from exc
        finally:
            _deadline.at = None
        if logger.isEnabledFor(logging.DEBUG):
            _log_exchange(method, url, r.status_code, started, content)
        return Response(r.status_code, content)

    def close(self) -> None:
        """Close the pool (only a session this transport created)."""
        if self._pid != _pid:
            self._pools_for_this_process()
        if self._owns_session:
            self.session.close()


class Urllib3Transport(_ForkSafe):
    """A thread-safe keep-alive pool straight on urllib3 (what requests uses underneath).

    About twice as fast per call as ``requests`` for DTM's small JSON calls. ``timeout`` is a total
    deadline per request in seconds (``None``: no deadline). It does not read proxy
    settings from the environment; pass ``proxy_url`` or use :class:`RequestsTransport`
    (:func:`default_transport` picks that one when a proxy is configured).
    """

    def __init__(
        self,
        *,
        timeout: Optional[float] = 10.0,
        pool_maxsize: int = 32,
        proxy_url: Optional[str] = None,
        ssl_context: Optional[Any] = None,
    ) -> None:
        self.timeout = check_timeout(timeout)
        kwargs: dict[str, Any] = {"maxsize": pool_maxsize, "retries": False}
        if ssl_context is not None:
            kwargs["ssl_context"] = ssl_context
        self._proxy_url = proxy_url
        self._pool_kwargs = kwargs
        self.pool: Any = self._new_pool()
        self._pid = _pid

    def _new_pool(self) -> Any:
        if self._proxy_url:
            return _with_deadline(urllib3.ProxyManager(self._proxy_url, **self._pool_kwargs))
        return _with_deadline(urllib3.PoolManager(**self._pool_kwargs))

    def _renew_pools(self) -> None:
        _inherited.append(self.pool)
        self.pool = self._new_pool()

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
        if params:
            url = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
        if headers is None:
            headers = _JSON_HEADERS if body is not None else {}
        if self._pid != _pid:
            self._pools_for_this_process()
        if timeout is None:
            timeout = self.timeout
        started = time.perf_counter()
        errors = urllib3.exceptions
        _deadline.at = None if timeout is None else time.monotonic() + timeout
        try:
            r = self.pool.urlopen(
                method, url, body=body, headers=headers, timeout=timeout, retries=False, redirect=False
            )
        except errors.NewConnectionError as exc:
            # Checked first: urllib3 2.x makes it a subclass of ConnectTimeoutError.
            raise DtmConnectError(f"{method} {url}: cannot connect: {exc}") from exc
        except errors.ConnectTimeoutError as exc:
            raise DtmConnectTimeout(f"{method} {url}: connecting timed out: {exc}") from exc
        except errors.TimeoutError as exc:
            raise DtmTimeout(f"{method} {url} timed out: {exc}") from exc
        except (errors.HTTPError, OSError) as exc:
            raise DtmTransportError(f"{method} {url} failed: {exc}") from exc
        finally:
            _deadline.at = None
        content: bytes = r.data
        if logger.isEnabledFor(logging.DEBUG):
            _log_exchange(method, url, r.status, started, content)
        return Response(r.status, content)

    def close(self) -> None:
        """Close every pooled connection (in a forked child: drop the inherited ones unused)."""
        if self._pid != _pid:
            self._pools_for_this_process()
        self.pool.clear()


def default_transport(timeout: Optional[float] = 10.0) -> Transport:
    """The transport a DtmClient gets when none is given.

    ``DTMCLI_TRANSPORT=http11``, ``=urllib3`` or ``=requests`` chooses explicitly (tests that pin
    bodies with the ``responses`` library need ``requests``). Otherwise :class:`Http11Transport`
    (the lean one), unless a proxy is configured in the environment: then requests, which honours
    proxy variables and ``NO_PROXY``.
    """
    choice = os.environ.get("DTMCLI_TRANSPORT", "").strip().lower()
    if choice not in ("", "http11", "requests", "urllib3"):
        raise DtmInvalidInput(f"DTMCLI_TRANSPORT must be 'http11', 'urllib3' or 'requests', not {choice!r}")
    if choice == "requests" or (not choice and any(k.lower() != "no" for k in getproxies())):
        return RequestsTransport(timeout=timeout)
    if choice == "urllib3":
        return Urllib3Transport(timeout=timeout)
    return Http11Transport(timeout=timeout)
