"""Async HTTP transports: the one place that does network I/O for the asyncio client.

The asyncio twin of :mod:`dtmcli._transport`, with the same contract: ``timeout`` is a total
deadline (connect, send and every read of the whole body), connection problems are typed
(:class:`DtmConnectError` only when nothing can have been sent, :class:`DtmConnectTimeout` when the
deadline ran out before the request could go out, :class:`DtmTimeout` once it may have, else
:class:`DtmTransportError`), query parameters reach the wire exactly as the sync default transport
writes them, and no redirect is followed. As with the sync default, credentials in a URL
(``http://user:pw@host/``) are never sent; aiohttp drops an empty trailing ``?`` (``/x?`` goes out
as ``/x``, the same resource to any server).

Three transports: :class:`AsyncHttp11Transport` (the default: the sync default's sans-I/O HTTP/1.1
core, :mod:`dtmcli._h11core`, driven by an asyncio Protocol in :mod:`dtmcli.asyncio._http11`),
:class:`AiohttpTransport` (the default when a proxy is configured) and :class:`HttpxTransport`.

The deadline is this module's own, and a cancellation of the calling task always wins over it: the
caller gets ``CancelledError``, never a ``DtmTimeout``, even when both arrive in the same loop
iteration.

A connection pool belongs to the event loop that opened it, so a transport keeps one pool per
running loop: the same transport works across successive ``asyncio.run()`` calls, from several
threads each running its own loop, and in a forked child, which never touches the connections
it inherited. A pool is closed when ``asyncio.run()`` ends its loop, or by ``aclose()``; a
transport dropped without ``aclose()`` has its pools closed inside their own loops (those of closed
loops are dropped quietly).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import ssl
import sys
import time
import weakref
from collections.abc import Coroutine
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import (
    TYPE_CHECKING,
    Any,
    AsyncGenerator,
    Callable,
    Generic,
    Mapping,
    Optional,
    Protocol,
    TypeVar,
    runtime_checkable,
)
from urllib.parse import urlencode
from urllib.request import getproxies

from urllib3.util import parse_url

from .. import _h11core as h11
from .. import _transport as _sync
from .._protocol import Response
from .._transport import _JSON_HEADERS, _log_exchange, check_timeout
from ..errors import DtmConnectError, DtmConnectTimeout, DtmError, DtmInvalidInput, DtmTimeout, DtmTransportError
from . import _http11

if TYPE_CHECKING:
    import aiohttp
    import httpx

__all__ = ["AsyncTransport", "AsyncHttp11Transport", "HttpxTransport", "AiohttpTransport", "default_async_transport"]

logger = logging.getLogger("dtmcli")

DEFAULT_POOL_SIZE = 100
"""Connections per pool (per event loop): both libraries' own default."""

T = TypeVar("T")


@runtime_checkable
class AsyncTransport(Protocol):
    """What the asyncio client needs from HTTP: one awaitable request, and ``aclose()``.

    ``timeout`` is a total deadline for the request (connect, send, every read), not a per-read
    limit; ``None`` means the transport's own. An implementation that pools connections must not
    reuse them in another event loop or in a forked child.
    """

    async def request(
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

    async def aclose(self) -> None:
        """Release pooled connections."""
        ...


# -- the request target ---------------------------------------------------------------------------
# The sync default transport appends urlencode(params) to the URL and urllib3 normalises the result
# (percent-encodes what may not appear raw, removes dot segments). httpx and aiohttp each normalise
# differently (aiohttp unquotes %2F, %3F, %27 ... in the query), so the target is built here with
# urllib3's own parser and handed over as is. Normalised base URLs are cached: each call adds only
# the encoded parameters, which urllib3 would leave untouched. urllib3 ignores the URL's userinfo
# (requests would turn it into Basic auth): it is removed here, so neither library sends it.


def _without_userinfo(url: str) -> str:
    parsed = parse_url(url)
    if parsed.auth is not None:
        parsed = parsed._replace(auth=None)
    return str(parsed.url)


@functools.lru_cache(maxsize=1024)
def _normalised(url: str) -> str:
    return _without_userinfo(url)


def request_target(url: str, params: Optional[Mapping[str, str]]) -> str:
    """The URL the sync default transport puts on the wire for ``url`` and ``params`` (no userinfo)."""
    if not params:
        return _normalised(url)
    query = urlencode(params)
    if "#" in url:  # the parameters land in the fragment, as they do in the sync transport
        return _without_userinfo(f"{url}{'&' if '?' in url else '?'}{query}")
    return f"{_normalised(url)}{'&' if '?' in url else '?'}{query}"


def _env_has_proxy() -> bool:
    return any(k.lower() != "no" for k in getproxies())


def _import(name: str, extra: str) -> Any:
    try:
        return __import__(name)
    except ImportError as exc:
        raise ImportError(f"dtmcli.asyncio needs {name} for this transport: pip install 'dtmcli[{extra}]'") from exc


def _in_ssl_error(exc: BaseException) -> bool:
    """Whether a TLS failure is somewhere in the cause chain of ``exc``."""
    seen = 0
    cur: Optional[BaseException] = exc
    while cur is not None and seen < 16:
        if isinstance(cur, (ssl.SSLError, ssl.CertificateError)):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def _check_pool_size(pool_maxsize: Any) -> None:
    if isinstance(pool_maxsize, bool) or not isinstance(pool_maxsize, int) or pool_maxsize < 1:
        raise DtmInvalidInput(f"pool_maxsize must be a positive int, not {pool_maxsize!r}")


def _closed_client(what: str, option: str) -> DtmInvalidInput:
    return DtmInvalidInput(
        f"the {what} this transport was given is closed (by you, or by aclose() with {option}=True); pass an open one"
    )


# -- the total deadline -----------------------------------------------------------------------------
# Neither library's own deadline tells a caller's cancellation from its own: aiohttp's nested timer
# contexts each uncancel the task, so a cancel() in the iteration where the deadline fires is lost.
# On Python >= 3.11 the deadline cancels the calling task and counts cancellations as asyncio.timeout
# does; before 3.11 (no Task.cancelling) the request runs in a task of its own, which only the
# deadline cancels.


class _Expired(Exception):
    """The total deadline ran out (internal: the transport turns it into DtmTimeout/DtmConnectTimeout)."""


class _Attempt:
    """One request: whether it may have been sent yet (until then a deadline means "nothing sent")."""

    __slots__ = ("may_be_sent",)

    def __init__(self, may_be_sent: bool) -> None:
        self.may_be_sent = may_be_sent


# The attempt of the request running in this task, for the aiohttp connector (which sees no other
# per-request state of ours).
_current_attempt: contextvars.ContextVar[Optional[_Attempt]] = contextvars.ContextVar(
    "dtmcli_http_attempt", default=None
)

_OWN_TASK = sys.version_info < (3, 11)  # a module flag, so that tests can run either way


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" log


class Timer(Protocol):
    """A timer's handle: ``cancel()`` it before it fires and it never does."""

    def cancel(self) -> None:
        """Do not fire."""
        ...


CallLater = Callable[[float, Callable[[], None]], Timer]
"""Call a function after so many seconds (``loop.call_later``, or a transport's cheaper timers)."""


async def _within_own_task(work: Coroutine[Any, Any, T], timeout: float, call_later: Optional[CallLater] = None) -> T:
    loop = asyncio.get_running_loop()
    inner = loop.create_task(work)
    woken = loop.create_future()

    def wake(_: Any = None) -> None:
        if not woken.done():
            woken.set_result(None)

    handle = (call_later or loop.call_later)(timeout, wake)
    inner.add_done_callback(wake)
    try:
        await woken  # only the caller's cancellation interrupts this
    except BaseException:
        handle.cancel()
        inner.cancel()
        try:
            await asyncio.wait((inner,))  # its cleanup (connection released or closed)
        finally:
            inner.add_done_callback(_retrieve)
        raise
    handle.cancel()
    if not inner.done():  # the deadline
        inner.cancel()
        try:
            await asyncio.wait((inner,))
        finally:
            inner.add_done_callback(_retrieve)
        if inner.cancelled():
            raise _Expired()
        exc = inner.exception()
        if exc is not None:
            raise _Expired() from exc
    return inner.result()


if sys.version_info >= (3, 11):

    async def _within(work: Coroutine[Any, Any, T], timeout: float, call_later: Optional[CallLater] = None) -> T:
        """``await work``, or _Expired after ``timeout`` s; the caller's own cancellation wins."""
        task = asyncio.current_task()
        if _OWN_TASK or task is None:
            return await _within_own_task(work, timeout, call_later)
        base = task.cancelling()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        handle = (call_later or asyncio.get_running_loop().call_later)(timeout, expire)
        try:
            result = await work
        except BaseException as exc:
            if not expired:
                raise
            if task.uncancel() > base:  # the caller cancelled as well: that wins
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise asyncio.CancelledError() from exc
            raise _Expired() from (None if isinstance(exc, asyncio.CancelledError) else exc)
        finally:
            handle.cancel()
        if expired and task.uncancel() > base:  # the work swallowed our cancellation, not the caller's
            raise asyncio.CancelledError()
        return result

else:
    _within = _within_own_task


# -- one pool per running event loop, renewed after fork -------------------------------------------

C = TypeVar("C")


class _Pool(Generic[C]):
    __slots__ = ("abandoned", "client", "sentinel")

    def __init__(self, client: C) -> None:
        self.client = client
        self.sentinel: Optional[AsyncGenerator[None, None]] = None
        self.abandoned = False  # dropped unclosed: nothing may touch its connections


class _Pools(Generic[C]):
    """A transport's pools, kept apart from it: what its sentinels and its finalizer hold.

    Nothing here refers to the transport, so a transport nobody holds is freed at once, and its
    finalizer (not the libraries' ``__del__``, on whatever thread collects them) decides the fate
    of its pools. While the transport lives, the finalizer holds these pools: they are never
    garbage before it.
    """

    __slots__ = ("abandon", "by_loop", "close", "pid")

    def __init__(self, close: Callable[[C], Coroutine[Any, Any, None]], abandon: Callable[[C], None]) -> None:
        self.by_loop: dict[asyncio.AbstractEventLoop, _Pool[C]] = {}
        self.pid = _sync._pid
        self.close = close
        self.abandon = abandon


async def _close_at_loop_end(
    pools: _Pools[C], loop: asyncio.AbstractEventLoop, pool: _Pool[C]
) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:  # run by asyncio.run()'s shutdown_asyncgens(), by aclose(), or after the transport is dropped
        if pools.by_loop.get(loop) is pool:
            pools.by_loop.pop(loop, None)
        if not pool.abandoned:
            pool.abandoned = True
            try:
                await pools.close(pool.client)
            except Exception:  # best effort: the loop may be shutting down
                logger.debug("closing an async HTTP pool failed", exc_info=True)


_closing: set[asyncio.Task[None]] = set()  # strong references to pools being closed after their transport died


async def _finish(sentinel: AsyncGenerator[None, None]) -> None:
    try:
        await sentinel.aclose()  # its finally closes the pool
    except Exception:  # already being closed by shutdown_asyncgens()
        logger.debug("closing a dropped async HTTP pool failed", exc_info=True)


def _close_in_loop(loop: asyncio.AbstractEventLoop, sentinel: AsyncGenerator[None, None]) -> None:
    task = loop.create_task(_finish(sentinel))
    _closing.add(task)
    task.add_done_callback(_closing.discard)


def _release(pools: _Pools[Any]) -> None:
    """The finalizer of a transport dropped without aclose(): may run on any thread, from the GC.

    A pool is closed inside its own loop (scheduled thread-safely, as asyncio finalises async
    generators); one of a closed loop, or inherited from the parent process, is dropped without
    touching its sockets. Takes no lock: the GC may run this while this thread holds any.
    """
    by_loop, pools.by_loop = pools.by_loop, {}
    inherited = pools.pid != _sync._pid
    for loop, pool in by_loop.items():
        if not inherited and pool.sentinel is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(_close_in_loop, loop, pool.sentinel)
                continue
            except RuntimeError:  # closed in the meantime
                pass
        pool.abandoned = True
        pools.abandon(pool.client)
    if inherited:
        _sync._inherited.append(list(by_loop.values()))


class _PerLoop(Generic[C]):
    """Pools keyed by event loop, built on first use in each loop and each process.

    A pool is closed inside its own loop only: by ``aclose()`` there, when ``asyncio.run()``
    shuts the loop down (``shutdown_asyncgens`` finalises an async generator started with the pool,
    whose ``finally`` closes it), or soon after the transport is dropped. Pools of loops closed
    otherwise are dropped unclosed: awaiting anything on a closed loop is impossible. After a fork,
    the inherited pools are dropped unclosed and kept referenced, as in :mod:`dtmcli._transport`:
    closing could write on the parent's sockets.
    """

    timeout: Optional[float]

    def __init__(self, client: Optional[C], close_client: bool) -> None:
        self._user_client = client
        self._close_user_client = close_client
        self._pools: _Pools[C] = _Pools(type(self)._close_client, type(self)._abandon_client)
        weakref.finalize(self, _release, self._pools).atexit = False

    def _new_client(self) -> C:
        raise NotImplementedError

    @staticmethod
    async def _close_client(client: C) -> None:
        raise NotImplementedError

    @staticmethod
    def _abandon_client(client: C) -> None:
        """Make sure dropping ``client`` unclosed neither warns nor touches its sockets."""

    def _closed(self, client: C) -> Optional[DtmInvalidInput]:
        """The error for a (user's) client that is closed already, or ``None``."""
        raise NotImplementedError

    def _target(self, url: str, params: Optional[Mapping[str, str]]) -> Any:
        """The request target as the library takes it (encoded exactly as the sync transport does)."""
        raise NotImplementedError

    async def _send(
        self,
        client: C,
        method: str,
        target: Any,
        body: Optional[bytes],
        headers: Optional[Mapping[str, str]],
        attempt: _Attempt,
    ) -> tuple[int, bytes]:
        raise NotImplementedError

    def _mapped(self, method: str, url: str, timeout: Optional[float], exc: Exception) -> Optional[DtmError]:
        """The typed error for the library's ``exc``, or ``None`` to let it propagate."""
        raise NotImplementedError

    def _call_later(self, client: C) -> Optional[CallLater]:
        """The deadline's timer for requests on ``client`` (``None``: the loop's ``call_later``)."""
        return None

    async def request(
        self,
        method: str,
        url: str,
        *,
        params: Optional[Mapping[str, str]] = None,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Response:
        """Send one request; connection problems become DtmTransportError / DtmConnectError / DtmTimeout."""
        if headers is None and body is not None:
            headers = _JSON_HEADERS
        if timeout is None:
            timeout = self.timeout
        started = time.perf_counter()
        # The library reports when the request starts being written; a user's client may not, so
        # with one a deadline always means "may have been sent".
        attempt = _Attempt(may_be_sent=self._user_client is not None)
        client = self._client()
        closed = self._closed(client)
        if closed is not None:
            raise closed
        try:
            work = self._send(client, method, self._target(url, params), body, headers, attempt)
            status, content = await (work if timeout is None else _within(work, timeout, self._call_later(client)))
        except _Expired as exc:
            raise _deadline_error(method, url, timeout, attempt) from exc.__cause__
        except Exception as exc:
            mapped = self._mapped(method, url, timeout, exc)
            if mapped is None:
                raise
            raise mapped from exc
        if logger.isEnabledFor(logging.DEBUG):
            _log_exchange(method, url, status, started, content)
        return Response(status, content)

    def _client(self) -> C:
        if self._user_client is not None:
            return self._user_client
        pools = self._pools
        if pools.pid != _sync._pid:
            self._after_fork()
        loop = asyncio.get_running_loop()
        pool = pools.by_loop.get(loop)
        if pool is None:
            pool = self._add_pool(loop)
        return pool.client

    def _after_fork(self) -> None:
        pools = self._pools
        with _sync._renew_lock:
            if pools.pid != _sync._pid:
                for pool in pools.by_loop.values():
                    pool.abandoned = True
                    pools.abandon(pool.client)
                _sync._inherited.append(list(pools.by_loop.values()))
                pools.by_loop = {}
                pools.pid = _sync._pid

    def _drop_closed_loops(self) -> None:
        by_loop = self._pools.by_loop
        for loop in [lp for lp in by_loop if lp.is_closed()]:
            # Its sentinel is never resumed: a closed loop finalises no async generator.
            pool = by_loop.pop(loop)
            pool.abandoned = True
            self._pools.abandon(pool.client)

    def _add_pool(self, loop: asyncio.AbstractEventLoop) -> _Pool[C]:
        pools = self._pools
        with _sync._renew_lock:  # another thread's loop may be adding its pool right now
            self._drop_closed_loops()
            pool = pools.by_loop.get(loop)
            if pool is None:
                pool = _Pool(self._new_client())
                pool.sentinel = _close_at_loop_end(pools, loop, pool)
                try:  # the first step registers it with the running loop (sys.set_asyncgen_hooks)
                    pool.sentinel.asend(None).send(None)
                except StopIteration:
                    pass
                pools.by_loop[loop] = pool
            return pool

    async def aclose(self) -> None:
        """Close the pool of the running loop (and drop those of closed loops); a client you
        passed is closed only if you asked for it. The transport stays usable."""
        if self._user_client is not None:
            if self._close_user_client:
                await self._close_client(self._user_client)
            return
        if self._pools.pid != _sync._pid:
            self._after_fork()
        loop = asyncio.get_running_loop()
        with _sync._renew_lock:
            self._drop_closed_loops()
            pool = self._pools.by_loop.pop(loop, None)
        if pool is not None and pool.sentinel is not None:
            await pool.sentinel.aclose()  # runs its finally: closes the client in this loop


def _deadline_error(method: str, url: str, timeout: Optional[float], attempt: _Attempt) -> DtmTimeout:
    secs = timeout if timeout is None else round(timeout, 3)  # the client passes what is left of its budget
    if attempt.may_be_sent:
        return DtmTimeout(f"{method} {url} timed out after {secs} s")
    return DtmConnectTimeout(f"{method} {url}: no connection within the {secs} s timeout; nothing was sent")


# -- httpx ------------------------------------------------------------------------------------------


class HttpxTransport(_PerLoop["httpx.AsyncClient"]):
    """A keep-alive pool on ``httpx.AsyncClient``, one per event loop.

    ``timeout`` is a total deadline per request in seconds (``None``: no deadline). ``ssl_context``
    replaces the default certificate check against the system's CAs (mTLS: load your certificate
    into it); ``proxy_url`` sends every request through that proxy; ``trust_env`` reads proxies and
    ``NO_PROXY`` from the environment (default: only when a proxy variable is set, like the sync
    default transport). No cookies are kept. For anything else pass your own ``client``: it is
    used as is, in whatever loop and process you call from (it must belong to that loop), and
    closed by ``aclose()`` only with ``close_client=True``. A ``raise_for_status`` response hook of
    yours does not turn DTM's 409/425/5xx answers into errors. With your own client a deadline is
    always :class:`DtmTimeout` (its transport may not report when it starts sending). Measured
    3.5-20x the CPU of :class:`AiohttpTransport` per request (bench/bench_async_transport.py).
    """

    def __init__(
        self,
        client: Optional[httpx.AsyncClient] = None,
        *,
        timeout: Optional[float] = 10.0,
        pool_maxsize: int = DEFAULT_POOL_SIZE,
        proxy_url: Optional[str] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        trust_env: Optional[bool] = None,
        close_client: bool = False,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self._httpx = _import("httpx", "httpx")
        _check_pool_size(pool_maxsize)
        self._client_kwargs: dict[str, Any] = {
            "limits": self._httpx.Limits(max_connections=pool_maxsize, max_keepalive_connections=pool_maxsize),
            "trust_env": _env_has_proxy() if trust_env is None else trust_env,
            "follow_redirects": False,
            "cookies": CookieJar(DefaultCookiePolicy(allowed_domains=[])),  # keeps none, as urllib3
        }
        if proxy_url is not None:
            self._client_kwargs["proxy"] = proxy_url  # httpx >= 0.26
        self._ssl_context = ssl_context
        super().__init__(client, close_client)

    def _new_client(self) -> httpx.AsyncClient:
        if self._ssl_context is None:  # one per transport: loading the CAs takes milliseconds
            self._ssl_context = ssl.create_default_context()  # the system's CAs, as urllib3 and aiohttp
        client: httpx.AsyncClient = self._httpx.AsyncClient(verify=self._ssl_context, **self._client_kwargs)
        return client

    @staticmethod
    async def _close_client(client: httpx.AsyncClient) -> None:
        await client.aclose()

    def _closed(self, client: httpx.AsyncClient) -> Optional[DtmInvalidInput]:
        return _closed_client("httpx client", "close_client") if client.is_closed else None

    def _target(self, url: str, params: Optional[Mapping[str, str]]) -> Any:
        return request_target(url, params)

    def _mapped(self, method: str, url: str, timeout: Optional[float], exc: Exception) -> Optional[DtmError]:
        lib = self._httpx
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError, lib.TimeoutException)):
            return DtmTimeout(f"{method} {url} timed out after {timeout} s: {exc!r}")
        if isinstance(exc, lib.ConnectError):
            if _in_ssl_error(exc):
                return DtmTransportError(f"{method} {url} failed: {exc}")
            return DtmConnectError(f"{method} {url}: cannot connect: {exc}")
        if isinstance(exc, (lib.HTTPError, lib.InvalidURL, OSError, ValueError)):
            return DtmTransportError(f"{method} {url} failed: {exc!r}")
        return None

    async def _send(
        self,
        client: httpx.AsyncClient,
        method: str,
        target: str,
        body: Optional[bytes],
        headers: Optional[Mapping[str, str]],
        attempt: _Attempt,
    ) -> tuple[int, bytes]:
        async def trace(event: str, info: Mapping[str, Any]) -> None:
            # The first write of the request itself (a proxy's CONNECT is still connecting).
            if event.endswith(".send_request_headers.started"):
                request = info.get("request")
                if getattr(request, "method", None) != b"CONNECT":
                    attempt.may_be_sent = True

        try:
            r = await client.request(method, target, content=body, headers=headers, timeout=None,
                                     follow_redirects=False, extensions={"trace": trace})
        except self._httpx.HTTPStatusError as exc:  # a raise_for_status hook of the caller's client
            r = exc.response
            try:
                await r.aread()
            except self._httpx.StreamError:  # closed unread by httpx: only the status is known
                return r.status_code, b""
        return r.status_code, r.content


# -- aiohttp ----------------------------------------------------------------------------------------


@functools.cache
def _marking_connector(base: type) -> type:
    """``base`` (aiohttp's TCPConnector) noting in the running request's attempt when it has a connection.

    ``connect()`` covers waiting for a free slot, DNS, TCP, the proxy's CONNECT and TLS: until it
    returns, nothing of the request can have been sent.
    """

    class MarkingConnector(base):  # type: ignore[misc]
        async def connect(self, *args: Any, **kwargs: Any) -> Any:
            conn = await super().connect(*args, **kwargs)
            attempt = _current_attempt.get()
            if attempt is not None:
                attempt.may_be_sent = True
            return conn

    return MarkingConnector


class AiohttpTransport(_PerLoop["aiohttp.ClientSession"]):
    """A keep-alive pool on ``aiohttp.ClientSession``, one per event loop.

    ``timeout`` is a total deadline per request in seconds (``None``: no deadline). ``ssl_context``
    replaces the default certificate check (mTLS: load your certificate into it); ``proxy_url``
    sends every request through that proxy; ``trust_env`` reads proxies, ``NO_PROXY`` and
    ``.netrc`` from the environment (default: only when a proxy variable is set, like the sync
    default transport). No cookies are kept. For anything else pass your own ``session``: it is
    used as is, in whatever loop and process you call from (it must belong to that loop), and
    closed by ``aclose()`` only with ``close_session=True``. Its ``raise_for_status`` and timeouts
    are not used (DTM's 409/425/5xx are answers, not errors; the deadline is ``timeout``), and with
    it a deadline is :class:`DtmTimeout` (its connector does not report when the connection is made).
    """

    def __init__(
        self,
        session: Optional[aiohttp.ClientSession] = None,
        *,
        timeout: Optional[float] = 10.0,
        pool_maxsize: int = DEFAULT_POOL_SIZE,
        proxy_url: Optional[str] = None,
        ssl_context: Optional[ssl.SSLContext] = None,
        trust_env: Optional[bool] = None,
        close_session: bool = False,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self._aiohttp = lib = _import("aiohttp", "asyncio")
        self._yarl = _import("yarl", "asyncio")
        _check_pool_size(pool_maxsize)
        self._pool_maxsize = pool_maxsize
        self._ssl: Any = True if ssl_context is None else ssl_context
        self._trust_env = _env_has_proxy() if trust_env is None else trust_env
        # The deadline is this module's (_within): aiohttp's own is off, also a user session's.
        self._request_kwargs: dict[str, Any] = {
            "allow_redirects": False, "raise_for_status": False, "timeout": lib.ClientTimeout()
        }
        if proxy_url is not None:
            self._request_kwargs["proxy"] = proxy_url
        # aiohttp >= 3.10 raises it when its own connect timeout fires (not ours, unless it changes).
        self._connect_timeout_error: Any = getattr(lib, "ConnectionTimeoutError", ())
        super().__init__(session, close_session)

    def _new_client(self) -> aiohttp.ClientSession:
        lib = self._aiohttp
        connector = _marking_connector(lib.TCPConnector)(limit=self._pool_maxsize, ssl=self._ssl)
        session: aiohttp.ClientSession = lib.ClientSession(
            connector=connector, trust_env=self._trust_env, cookie_jar=lib.DummyCookieJar()
        )
        return session

    @staticmethod
    async def _close_client(client: aiohttp.ClientSession) -> None:
        await client.close()

    @staticmethod
    def _abandon_client(client: aiohttp.ClientSession) -> None:
        # Marked closed, its finalizers neither warn nor call transport.close() (which needs the loop,
        # or on TLS would send close_notify on a socket the parent still uses): the OS closes the fds.
        connector = client.connector
        if connector is not None and hasattr(connector, "_closed"):
            connector._closed = True

    def _closed(self, client: aiohttp.ClientSession) -> Optional[DtmInvalidInput]:
        return _closed_client("aiohttp session", "close_session") if client.closed else None

    def _target(self, url: str, params: Optional[Mapping[str, str]]) -> Any:
        return self._yarl.URL(request_target(url, params), encoded=True)

    def _mapped(self, method: str, url: str, timeout: Optional[float], exc: Exception) -> Optional[DtmError]:
        lib = self._aiohttp
        if isinstance(exc, self._connect_timeout_error):  # aiohttp's: raised only while connecting
            return DtmConnectTimeout(f"{method} {url}: connecting timed out: {exc!r}")
        if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):  # aiohttp's ServerTimeoutError is one too
            return DtmTimeout(f"{method} {url} timed out after {timeout} s: {exc!r}")
        if isinstance(exc, lib.ClientSSLError):
            return DtmTransportError(f"{method} {url} failed: {exc}")
        if isinstance(exc, lib.ClientConnectorError):
            return DtmConnectError(f"{method} {url}: cannot connect: {exc}")
        if isinstance(exc, (lib.ClientError, OSError, ValueError)):
            return DtmTransportError(f"{method} {url} failed: {exc!r}")
        return None

    async def _send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        target: Any,
        body: Optional[bytes],
        headers: Optional[Mapping[str, str]],
        attempt: _Attempt,
    ) -> tuple[int, bytes]:
        token = _current_attempt.set(attempt)
        try:
            async with session.request(
                method, target, data=body, headers=headers,
                # aiohttp would add Content-Type: application/octet-stream to a body sent without one
                skip_auto_headers=_NO_AUTO_CONTENT_TYPE if body is not None else None,
                **self._request_kwargs,
            ) as r:
                return r.status, await r.read()
        finally:
            _current_attempt.reset(token)


_NO_AUTO_CONTENT_TYPE = ("Content-Type",)


# -- the lean HTTP/1.1 transport ----------------------------------------------------------------------


class AsyncHttp11Transport(_PerLoop[_http11.LoopPool]):
    """Keep-alive HTTP/1.1 on asyncio's own sockets, one pool per event loop: the asyncio twin of the
    sync default :class:`~dtmcli._http11.Http11Transport`, on the same sans-I/O core
    (:mod:`dtmcli._h11core`: request bytes, response parsing, the never-resend-a-POST rule).

    ``timeout`` is a total deadline per request in seconds (``None``: none). At most
    ``pool_maxsize`` requests are in flight per event loop (others wait for a free connection,
    which counts as connecting); as many connections are kept idle per host. ``ssl_context`` is
    used for https (default: verified against the system's CAs). It speaks to servers directly:
    with a proxy configured, :func:`default_async_transport` picks aiohttp.
    """

    def __init__(
        self,
        *,
        timeout: Optional[float] = 10.0,
        pool_maxsize: int = DEFAULT_POOL_SIZE,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        self.timeout = check_timeout(timeout)
        _check_pool_size(pool_maxsize)
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise DtmInvalidInput(f"ssl_context must be an ssl.SSLContext, not {type(ssl_context).__name__}")
        self._pool_maxsize = pool_maxsize
        self._ssl_context = ssl_context
        self._writer = h11.RequestWriter()
        super().__init__(None, False)

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:  # one per transport: loading the CAs takes milliseconds
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _new_client(self) -> _http11.LoopPool:
        return _http11.LoopPool(self._pool_maxsize)

    @staticmethod
    async def _close_client(client: _http11.LoopPool) -> None:
        client.close()

    @staticmethod
    def _abandon_client(client: _http11.LoopPool) -> None:
        client.closed = True  # its sockets are left alone (a closed loop, or the parent's)

    def _closed(self, client: _http11.LoopPool) -> Optional[DtmInvalidInput]:
        return None

    def _target(self, url: str, params: Optional[Mapping[str, str]]) -> Any:
        return url, params  # the core builds (and caches) the request target

    def _mapped(self, method: str, url: str, timeout: Optional[float], exc: Exception) -> Optional[DtmError]:
        if isinstance(exc, OSError):  # a reset or TLS error mid-exchange
            return DtmTransportError(f"{method} {url} failed: {exc}")
        return None

    def _call_later(self, client: _http11.LoopPool) -> Optional[CallLater]:
        return client.deadlines.call_later  # one loop timer for all the pool's deadlines

    def _send(  # the core's coroutine itself, without a frame of its own
        self,
        client: _http11.LoopPool,
        method: str,
        target: Any,
        body: Optional[bytes],
        headers: Optional[Mapping[str, str]],
        attempt: _Attempt,
    ) -> Coroutine[Any, Any, tuple[int, bytes]]:
        url, params = target
        return _http11.send(client, self._writer, self._context, method, url, params, body, headers, attempt)


# -- the default ----------------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[..., AsyncTransport]] = {
    "http11": AsyncHttp11Transport, "httpx": HttpxTransport, "aiohttp": AiohttpTransport,
}
_PROXY_CAPABLE = ("aiohttp", "httpx")  # fastest first (bench/bench_async_transport.py)


def default_async_transport(timeout: Optional[float] = 10.0) -> AsyncTransport:
    """The transport an async client gets when none is given.

    ``DTMCLI_ASYNC_TRANSPORT=http11``, ``=aiohttp`` or ``=httpx`` chooses explicitly. Otherwise
    :class:`AsyncHttp11Transport` (bench/async_client.py: about half aiohttp's CPU per submit, twice
    its throughput), unless a proxy is configured in the environment, which it does not speak: then
    aiohttp, or httpx when aiohttp is not installed (ImportError naming the extra when neither is).
    """
    choice = os.environ.get("DTMCLI_ASYNC_TRANSPORT", "").strip().lower()
    if choice and choice not in _FACTORIES:
        raise DtmInvalidInput(f"DTMCLI_ASYNC_TRANSPORT must be 'http11', 'aiohttp' or 'httpx', not {choice!r}")
    if not choice and not _env_has_proxy():
        return AsyncHttp11Transport(timeout=timeout)
    for name in (choice,) if choice else _PROXY_CAPABLE:
        factory = _FACTORIES[name]
        try:
            return factory(timeout=timeout)
        except ImportError:
            if choice:
                raise
    raise ImportError(
        "dtmcli.asyncio needs an HTTP library to speak through a proxy: pip install 'dtmcli[asyncio]' (aiohttp) "
        "or 'dtmcli[httpx]'"
    )
