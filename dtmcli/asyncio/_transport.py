"""Async HTTP transports: the one place that does network I/O for the asyncio client.

The asyncio twin of :mod:`dtmcli._transport`, with the same contract: ``timeout`` is a total
deadline (connect, send and every read of the whole body), connection problems are typed
(:class:`DtmConnectError` only when nothing can have been sent, :class:`DtmTimeout`, else
:class:`DtmTransportError`), query parameters reach the wire exactly as the sync default transport
writes them, and no redirect is followed.

A connection pool belongs to the event loop that opened it, so a transport keeps one pool per
running loop: the same transport works across successive ``asyncio.run()`` calls, from several
threads each running its own loop, and in a forked child, which never touches the connections
it inherited. A pool is closed when ``asyncio.run()`` ends its loop, or by ``aclose()``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import time
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

from .. import _transport as _sync
from .._protocol import Response
from .._transport import _JSON_HEADERS, _log_exchange, check_timeout
from ..errors import DtmConnectError, DtmInvalidInput, DtmTimeout, DtmTransportError

if TYPE_CHECKING:
    import aiohttp
    import httpx

__all__ = ["AsyncTransport", "HttpxTransport", "AiohttpTransport", "default_async_transport"]

logger = logging.getLogger("dtmcli")

DEFAULT_POOL_SIZE = 100
"""Connections per pool (per event loop): both libraries' own default."""


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
# the encoded parameters, which urllib3 would leave untouched.


@functools.lru_cache(maxsize=1024)
def _normalised(url: str) -> str:
    return str(parse_url(url).url)


def request_target(url: str, params: Optional[Mapping[str, str]]) -> str:
    """The URL the sync default transport puts on the wire for ``url`` and ``params``."""
    if not params:
        return _normalised(url)
    query = urlencode(params)
    if "#" in url:  # the parameters land in the fragment, as they do in the sync transport
        return str(parse_url(f"{url}{'&' if '?' in url else '?'}{query}").url)
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


# -- one pool per running event loop, renewed after fork -------------------------------------------

C = TypeVar("C")


class _Pool(Generic[C]):
    __slots__ = ("client", "sentinel")

    def __init__(self, client: C) -> None:
        self.client = client
        self.sentinel: Optional[AsyncGenerator[None, None]] = None


class _PerLoop(Generic[C]):
    """Pools keyed by event loop, built on first use in each loop and each process.

    A pool is closed inside its own loop only: by ``aclose()`` there, or when ``asyncio.run()``
    shuts the loop down (``shutdown_asyncgens`` finalises an async generator started with the pool,
    whose ``finally`` closes it). Pools of loops closed otherwise are dropped unclosed: awaiting
    anything on a closed loop is impossible. After a fork, the inherited pools are dropped unclosed
    and kept referenced, as in :mod:`dtmcli._transport`: closing could write on the parent's sockets.
    """

    timeout: Optional[float]

    def __init__(self, client: Optional[C], close_client: bool) -> None:
        self._user_client = client
        self._close_user_client = close_client
        self._pools: dict[asyncio.AbstractEventLoop, _Pool[C]] = {}
        self._pid = _sync._pid

    def _new_client(self) -> C:
        raise NotImplementedError

    async def _close_client(self, client: C) -> None:
        raise NotImplementedError

    def _abandon_client(self, client: C) -> None:
        """Make sure dropping ``client`` unclosed neither warns nor touches its sockets."""

    def _client(self) -> C:
        if self._user_client is not None:
            return self._user_client
        if self._pid != _sync._pid:
            self._after_fork()
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            pool = self._add_pool(loop)
        return pool.client

    def _after_fork(self) -> None:
        with _sync._renew_lock:
            if self._pid != _sync._pid:
                for pool in self._pools.values():
                    self._abandon_client(pool.client)
                _sync._inherited.append(list(self._pools.values()))
                self._pools = {}
                self._pid = _sync._pid

    def _drop_closed_loops(self) -> None:
        for loop in [lp for lp in self._pools if lp.is_closed()]:
            # Its sentinel is never resumed: a closed loop finalises no async generator.
            self._abandon_client(self._pools.pop(loop).client)

    def _add_pool(self, loop: asyncio.AbstractEventLoop) -> _Pool[C]:
        with _sync._renew_lock:  # another thread's loop may be adding its pool right now
            self._drop_closed_loops()
            pool = self._pools.get(loop)
            if pool is None:
                pool = _Pool(self._new_client())
                pool.sentinel = self._close_at_loop_end(loop, pool)
                try:  # the first step registers it with the running loop (sys.set_asyncgen_hooks)
                    pool.sentinel.asend(None).send(None)
                except StopIteration:
                    pass
                self._pools[loop] = pool
            return pool

    async def _close_at_loop_end(self, loop: asyncio.AbstractEventLoop, pool: _Pool[C]) -> AsyncGenerator[None, None]:
        try:
            yield
        finally:  # run by asyncio.run()'s shutdown_asyncgens() or by aclose(), in this loop
            if self._pools.get(loop) is pool:
                self._pools.pop(loop, None)
            try:
                await self._close_client(pool.client)
            except Exception:  # best effort: the loop is shutting down
                logger.debug("closing an async HTTP pool failed", exc_info=True)

    async def aclose(self) -> None:
        """Close the pool of the running loop (and drop those of closed loops); a client you
        passed is closed only if you asked for it. The transport stays usable."""
        if self._user_client is not None:
            if self._close_user_client:
                await self._close_client(self._user_client)
            return
        if self._pid != _sync._pid:
            self._after_fork()
        loop = asyncio.get_running_loop()
        with _sync._renew_lock:
            self._drop_closed_loops()
            pool = self._pools.pop(loop, None)
        if pool is not None and pool.sentinel is not None:
            await pool.sentinel.aclose()  # runs its finally: closes the client in this loop


# -- httpx ------------------------------------------------------------------------------------------


class HttpxTransport(_PerLoop["httpx.AsyncClient"]):
    """A keep-alive pool on ``httpx.AsyncClient``, one per event loop.

    ``timeout`` is a total deadline per request in seconds (``None``: no deadline). ``ssl_context``
    replaces the default certificate check against the system's CAs (mTLS: load your certificate
    into it); ``proxy_url`` sends every request through that proxy; ``trust_env`` reads proxies and
    ``NO_PROXY`` from the environment (default: only when a proxy variable is set, like the sync
    default transport). No cookies are kept. For anything else pass your own ``client``: it is
    used as is, in whatever loop and process you call from (it must belong to that loop), and
    closed by ``aclose()`` only with ``close_client=True``. Measured 3.5-20x the CPU of
    :class:`AiohttpTransport` per request (bench/bench_async_transport.py).
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
        self._anyio = _import("anyio", "httpx")
        if isinstance(pool_maxsize, bool) or not isinstance(pool_maxsize, int) or pool_maxsize < 1:
            raise DtmInvalidInput(f"pool_maxsize must be a positive int, not {pool_maxsize!r}")
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

    async def _close_client(self, client: httpx.AsyncClient) -> None:
        await client.aclose()

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
        lib = self._httpx
        try:
            target = request_target(url, params)
            client = self._client()
            if timeout is None:
                r = await client.request(method, target, content=body, headers=headers, timeout=None,
                                         follow_redirects=False)
            else:
                # httpx only bounds each operation (a byte a second never trips them): a cancel scope
                # bounds the whole exchange. anyio is httpx's own dependency.
                scope = self._anyio.CancelScope(deadline=asyncio.get_running_loop().time() + timeout)
                with scope:
                    r = await client.request(method, target, content=body, headers=headers, timeout=None,
                                             follow_redirects=False)
                if scope.cancelled_caught:
                    raise TimeoutError("total deadline")
        except (TimeoutError, asyncio.TimeoutError, lib.TimeoutException) as exc:
            raise DtmTimeout(f"{method} {url} timed out after {timeout} s: {exc!r}") from exc
        except lib.ConnectError as exc:
            if _in_ssl_error(exc):
                raise DtmTransportError(f"{method} {url} failed: {exc}") from exc
            raise DtmConnectError(f"{method} {url}: cannot connect: {exc}") from exc
        except (lib.HTTPError, lib.InvalidURL, OSError, ValueError) as exc:
            raise DtmTransportError(f"{method} {url} failed: {exc!r}") from exc
        content = r.content
        if logger.isEnabledFor(logging.DEBUG):
            _log_exchange(method, url, r.status_code, started, content)
        return Response(r.status_code, content)


# -- aiohttp ----------------------------------------------------------------------------------------


class AiohttpTransport(_PerLoop["aiohttp.ClientSession"]):
    """A keep-alive pool on ``aiohttp.ClientSession``, one per event loop.

    ``timeout`` is a total deadline per request in seconds (``None``: no deadline). ``ssl_context``
    replaces the default certificate check (mTLS: load your certificate into it); ``proxy_url``
    sends every request through that proxy; ``trust_env`` reads proxies, ``NO_PROXY`` and
    ``.netrc`` from the environment (default: only when a proxy variable is set, like the sync
    default transport). No cookies are kept. For anything else pass your own ``session``: it is
    used as is, in whatever loop and process you call from (it must belong to that loop), and
    closed by ``aclose()`` only with ``close_session=True``.
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
        if isinstance(pool_maxsize, bool) or not isinstance(pool_maxsize, int) or pool_maxsize < 1:
            raise DtmInvalidInput(f"pool_maxsize must be a positive int, not {pool_maxsize!r}")
        self._pool_maxsize = pool_maxsize
        self._ssl: Any = True if ssl_context is None else ssl_context
        self._trust_env = _env_has_proxy() if trust_env is None else trust_env
        self._request_kwargs: dict[str, Any] = {"allow_redirects": False}
        if proxy_url is not None:
            self._request_kwargs["proxy"] = proxy_url
        self._no_deadline = lib.ClientTimeout()
        # total covers connect, send and reading the body; aiohttp rounds a total above ceil_threshold
        # (5 s by default) up to a whole second of the loop's clock: never here (aiohttp < 3.9 always does).
        self._ceil: dict[str, float] = {"ceil_threshold": _sync.MAX_TIMEOUT * 2}
        try:
            lib.ClientTimeout(total=1.0, **self._ceil)
        except TypeError:
            self._ceil = {}
        self._deadline_cache: tuple[float, Any] = (-1.0, None)
        super().__init__(session, close_session)

    def _new_client(self) -> aiohttp.ClientSession:
        lib = self._aiohttp
        connector = lib.TCPConnector(limit=self._pool_maxsize, ssl=self._ssl)
        session: aiohttp.ClientSession = lib.ClientSession(
            connector=connector, trust_env=self._trust_env, cookie_jar=lib.DummyCookieJar()
        )
        return session

    async def _close_client(self, client: aiohttp.ClientSession) -> None:
        await client.close()

    def _abandon_client(self, client: aiohttp.ClientSession) -> None:
        # Marked closed, its finalizers neither warn nor call transport.close() (which needs the loop,
        # or on TLS would send close_notify on a socket the parent still uses): the OS closes the fds.
        connector = client.connector
        if connector is not None and hasattr(connector, "_closed"):
            connector._closed = True

    def _client_timeout(self, timeout: Optional[float]) -> Any:
        if timeout is None:
            return self._no_deadline
        last, ct = self._deadline_cache
        if last != timeout:
            ct = self._aiohttp.ClientTimeout(total=timeout, **self._ceil)
            self._deadline_cache = (timeout, ct)
        return ct

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
        lib = self._aiohttp
        try:
            target = self._yarl.URL(request_target(url, params), encoded=True)
            session = self._client()
            async with session.request(
                method, target, data=body, headers=headers, timeout=self._client_timeout(timeout),
                # aiohttp would add Content-Type: application/octet-stream to a body sent without one
                skip_auto_headers=_NO_AUTO_CONTENT_TYPE if body is not None else None,
                **self._request_kwargs,
            ) as r:
                content = await r.read()
                status = r.status
        except (TimeoutError, asyncio.TimeoutError) as exc:  # aiohttp's ServerTimeoutError is one too
            raise DtmTimeout(f"{method} {url} timed out after {timeout} s: {exc!r}") from exc
        except lib.ClientSSLError as exc:
            raise DtmTransportError(f"{method} {url} failed: {exc}") from exc
        except lib.ClientConnectorError as exc:
            raise DtmConnectError(f"{method} {url}: cannot connect: {exc}") from exc
        except (lib.ClientError, OSError, ValueError) as exc:
            raise DtmTransportError(f"{method} {url} failed: {exc!r}") from exc
        if logger.isEnabledFor(logging.DEBUG):
            _log_exchange(method, url, status, started, content)
        return Response(status, content)


_NO_AUTO_CONTENT_TYPE = ("Content-Type",)


# -- the default ----------------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[..., AsyncTransport]] = {"httpx": HttpxTransport, "aiohttp": AiohttpTransport}
_PREFERENCE = ("aiohttp", "httpx")  # fastest first (bench/bench_async_transport.py)


def default_async_transport(timeout: Optional[float] = 10.0) -> AsyncTransport:
    """The transport an async client gets when none is given.

    ``DTMCLI_ASYNC_TRANSPORT=httpx`` or ``=aiohttp`` chooses explicitly. Otherwise the faster one
    that is installed, aiohttp (bench/bench_async_transport.py: 3.5x less CPU per request than httpx
    one at a time, 20x with 256 in flight); ImportError naming the extra when neither is.
    """
    choice = os.environ.get("DTMCLI_ASYNC_TRANSPORT", "").strip().lower()
    if choice and choice not in _FACTORIES:
        raise DtmInvalidInput(f"DTMCLI_ASYNC_TRANSPORT must be 'httpx' or 'aiohttp', not {choice!r}")
    for name in (choice,) if choice else _PREFERENCE:
        factory = _FACTORIES[name]
        try:
            return factory(timeout=timeout)
        except ImportError:
            if choice:
                raise
    raise ImportError(
        "dtmcli.asyncio needs an HTTP library: pip install 'dtmcli[asyncio]' (aiohttp) or 'dtmcli[httpx]'"
    )
