"""``DtmClient``: a DTM server address (or a cluster of them), its connection pool, and the query/admin API."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, ClassVar, Iterator, Mapping, Optional, Sequence, Union

import shortuuid

from . import _otel
from ._consts import DEFAULT_DTM
from ._dtm_servers import env_urls
from ._flow import Effect, Flow, Request, Sleep, run
from ._models import Transaction, TransactionPage
from ._protocol import Response, dtm_error, dumps, parse_json_object, redact_url
from ._retry import NO_RETRY, Retry
from ._transport import MAX_TIMEOUT, Transport, check_timeout, default_transport
from ._validate import check_http_url, check_non_negative_int, check_received_gid
from .errors import (
    DtmConnectError,
    DtmConnectTimeout,
    DtmError,
    DtmInvalidInput,
    DtmServerError,
    DtmTimeout,
    DtmTransportError,
)

__all__ = ["ClientBase", "DtmClient", "new_gid", "local_gid", "DtmLike", "next_page_position"]

logger = logging.getLogger("dtmcli")

_LOG_BODY = 512
DEFAULT_RETRY = Retry()
MAX_SHARED_CLIENTS = 64
DEFAULT_TIMEOUT = 10.0


class _TransportTimeout:
    def __repr__(self) -> str:
        return "<10.0, or the timeout of the transport given>"


_TRANSPORT_TIMEOUT: Any = _TransportTimeout()


def _redact(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """Hide branch header values (they often carry credentials) and the callback URL's token from debug logs."""
    query = body.get("query_prepared")
    if "branch_headers" not in body and not (isinstance(query, str) and "token=" in query):
        return body
    shown = dict(body)
    if "branch_headers" in body:
        shown["branch_headers"] = {k: "***" for k in body["branch_headers"]}
    if isinstance(query, str):
        shown["query_prepared"] = redact_url(query)
    return shown


DEFAULT_DOWN_FOR = 5.0
"""Seconds a server that refused a connection is passed over while another one is up."""


def server_urls(url: Union[str, Sequence[str], None]) -> tuple[str, ...]:
    """The DTM server URL(s) a client is given, checked, without trailing slashes and deduplicated.

    ``url`` is one URL, a comma-separated list or a sequence of URLs; ``None`` (and the default
    address :data:`DEFAULT_DTM` the builders use when given none) means ``DTMCLI_SERVER``, else
    the standard local address.
    """
    if url is None or url is DEFAULT_DTM:
        url = env_urls() or DEFAULT_DTM
    parts = url.split(",") if isinstance(url, str) else list(url)
    urls: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise DtmInvalidInput(f"a DTM server URL must be a str, not {type(part).__name__}")
        part = part.strip(" ") if isinstance(url, str) else part  # only spaces: "\x85".strip() would hide it
        check_http_url(part, "DTM server URL")
        part = part.rstrip("/")
        if part not in urls:
            urls.append(part)
    if not urls:
        raise DtmInvalidInput("no DTM server URL given")
    return tuple(urls)


class ServerPool:
    """The DTM servers of a cluster in preference order; one that refused a connection is set aside.

    Pure bookkeeping (the client's flows decide when to move on): :meth:`order` lists the servers
    to try now — those up, in the configured order, then those marked down, soonest back first (a
    server marked down is still tried when every server is down).
    """

    def __init__(self, urls: tuple[str, ...], down_for: float = DEFAULT_DOWN_FOR) -> None:
        self.urls = urls
        self.down_for = down_for
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()  # writers only: readers take a snapshot (dict copy is atomic)

    def order(self, now: float) -> tuple[str, ...]:
        """The servers to try, best first."""
        if not self._down_until:
            return self.urls
        down = dict(self._down_until)
        up = [u for u in self.urls if down.get(u, 0.0) <= now]
        later = sorted((u for u in self.urls if down.get(u, 0.0) > now), key=lambda u: down[u])
        return (*up, *later)

    def mark_down(self, url: str, now: float) -> None:
        """``url`` refused a connection or timed out: pass it over for ``down_for`` seconds."""
        with self._lock:
            was_up = self._down_until.get(url, 0.0) <= now
            self._down_until[url] = now + self.down_for
        if was_up:
            logger.warning("DTM server %s failed; using the others for %.0f s", url, self.down_for)

    def mark_up(self, url: str) -> None:
        """``url`` answered."""
        if self._down_until:
            with self._lock:
                self._down_until.pop(url, None)

    def down(self, now: float) -> tuple[str, ...]:
        """The servers set aside at ``now``."""
        return tuple(u for u, until in dict(self._down_until).items() if until > now)


class ClientBase:
    """What the sync and async DTM clients share: the address, the deadline and retry policy, the
    shared-client cache, and every call as a flow (:mod:`dtmcli._flow`) the subclass drives."""

    # Least recently used first, one cache per subclass. Nested TCC/XA take the URL from a request's
    # query, so the cache is bounded; see for_url for what happens to an evicted client.
    _shared: ClassVar[OrderedDict[str, Any]]
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()
    _evicted_warned: ClassVar[bool] = False

    urls: tuple[str, ...]
    servers: ServerPool
    timeout: Optional[float]
    retry: Retry

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._shared = OrderedDict()

    def _configure(
        self, url: Union[str, Sequence[str], None], timeout: Any, transport: Any, retry: Optional[Retry],
        down_for: float = DEFAULT_DOWN_FOR,
    ) -> None:
        self.urls = server_urls(url)
        if isinstance(down_for, bool) or not isinstance(down_for, (int, float)) or not 0 <= down_for <= MAX_TIMEOUT:
            raise DtmInvalidInput(f"down_for must be a number of seconds >= 0, not {down_for!r}")
        self.servers = ServerPool(self.urls, float(down_for))
        if timeout is _TRANSPORT_TIMEOUT:
            timeout = DEFAULT_TIMEOUT if transport is None else getattr(transport, "timeout", DEFAULT_TIMEOUT)
            try:
                check_timeout(timeout)
            except DtmInvalidInput:  # a custom transport's own notion (a tuple, a Timeout object)
                timeout = DEFAULT_TIMEOUT
        self.timeout = check_timeout(timeout)
        self.retry = retry if retry is not None else DEFAULT_RETRY

    @property
    def url(self) -> str:
        """The DTM server calls go to first: the only one, or the first of a cluster that is up."""
        if len(self.urls) == 1:
            return self.urls[0]
        return self.servers.order(time.monotonic())[0]

    @classmethod
    def _for_url(cls, url: Union[str, Sequence[str]]) -> Any:
        key = ",".join(server_urls(url))
        shared = cls._shared
        client = shared.get(key)
        if client is not None:
            try:
                shared.move_to_end(key)  # atomic under the GIL; the entry may just have been evicted
            except KeyError:
                pass
            return client
        with ClientBase._shared_lock:
            client = shared.get(key)
            if client is None:
                client = cls(url)  # type: ignore[call-arg]
                shared[key] = client
                if len(shared) > MAX_SHARED_CLIENTS:
                    old_key, _ = shared.popitem(last=False)
                    level = logging.DEBUG if cls._evicted_warned else logging.WARNING
                    cls._evicted_warned = True
                    logger.log(level, "more than %d DTM addresses in use; forgetting the least recently used (%s)",
                               MAX_SHARED_CLIENTS, old_key)
        return client

    @classmethod
    def _forget_shared(cls, url: Union[str, Sequence[str], None]) -> list[Any]:
        with ClientBase._shared_lock:
            keys = list(cls._shared) if url is None else [",".join(server_urls(url))]
            return [cls._shared.pop(k) for k in keys if k in cls._shared]

    def __repr__(self) -> str:
        shown = self.urls[0] if len(self.urls) == 1 else list(self.urls)
        return f"{type(self).__name__}({shown!r})"

    # -- flows -----------------------------------------------------------------------------

    def _call_flow(
        self,
        method: str,
        path: str,
        body: Optional[Mapping[str, Any]] = None,
        params: Optional[Mapping[str, str]] = None,
        gid: Optional[str] = None,
        idempotent: bool = False,
    ) -> Flow[Response]:
        data = self._encode_body(path, body)
        if logger.isEnabledFor(logging.DEBUG):
            shown = self._log_body(body) if body is not None else ""
            logger.debug("dtm %s %s gid=%s params=%s body=%.*s", method, path, gid, params, _LOG_BODY, shown)

        budget = self.timeout
        deadline = None if budget is None else time.monotonic() + budget
        retry = self.retry if idempotent else NO_RETRY
        servers = self.servers
        cluster = len(self.urls) > 1
        order = servers.order(time.monotonic()) if cluster else self.urls
        attempt = 0
        index = 0  # into order; a retry or a refused connection moves on to the next server
        span = _otel.start(f"dtm {path}", gid=gid, trans_type=body.get("trans_type") if body else None)
        refused: Optional[DtmConnectError] = None  # the last attempt's, if it was refused
        try:
            while True:
                base = order[index % len(order)]
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    message = f"{method} {path}: the {budget} s timeout ran out before a retry"
                    if refused is not None:  # nothing was sent: say so, the recover rules depend on it
                        raise DtmConnectTimeout(f"{message} (last attempt: {refused.message})") from refused
                    raise DtmTimeout(message)
                if cluster and idempotent and left is not None:
                    left /= len(order) - index % len(order)  # leave time for the servers not tried yet
                try:
                    resp: Response = yield self._dtm_effect(method, base, path, params, data, left)
                    break
                except DtmConnectError as exc:
                    refused = exc
                    if cluster:
                        servers.mark_down(base, time.monotonic())
                        if index + 1 < len(order):
                            # Nothing was sent: any call, submit included, may go to a server not tried yet.
                            index += 1
                            continue
                    delay = retry.next_delay(attempt, deadline, time.monotonic())
                    if delay is None:
                        raise
                except DtmTransportError:
                    # It may have arrived: only an idempotent call is repeated (on the next server).
                    refused = None
                    if cluster:
                        servers.mark_down(base, time.monotonic())  # later calls prefer the others
                        if idempotent and index + 1 < len(order):
                            index += 1  # a server not tried yet: at once, whatever the retry policy
                            continue
                    delay = retry.next_delay(attempt, deadline, time.monotonic())
                    if delay is None:
                        raise
                yield Sleep(delay, retry.sleep)
                attempt += 1
                index += 1
        except BaseException as exc:
            if isinstance(exc, DtmError) and exc.gid is None:
                exc.gid = gid
            _otel.finish(span, exc)
            raise
        if cluster:
            servers.mark_up(base)
        err = dtm_error(resp, path=path, gid=gid)
        _otel.finish(span, err, server=base if cluster else None)
        if err is not None:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("dtm %s %s gid=%s failed: %s", method, path, gid, err)
            raise err
        return resp

    # Hooks of _call_flow: the gRPC client (dtmcli.grpc) encodes a protobuf message and yields a gRPC call.
    can_query: bool = True
    """Whether ``_query_flow`` works (DTM's gRPC API has no query): the submit rules that settle an
    unclear answer with a query raise that answer instead when it does not."""

    def _encode_body(self, path: str, body: Optional[Mapping[str, Any]]) -> Any:
        return dumps(body) if body is not None else None

    def _log_body(self, body: Mapping[str, Any]) -> str:
        return dumps(_redact(body)).decode()

    def _dtm_effect(
        self, method: str, base: str, path: str, params: Optional[Mapping[str, str]], data: Any,
        timeout: Optional[float],
    ) -> Effect:
        return Request(method, f"{base}/{path}", params, data, None, timeout)

    def _post_flow(self, path: str, body: Mapping[str, Any], idempotent: bool = False) -> Flow[Response]:
        gid = body.get("gid")
        return self._call_flow("POST", path, body, None, gid if isinstance(gid, str) else None, idempotent)

    def _new_gid_flow(self) -> Flow[str]:
        resp = yield from self._call_flow("GET", "newGid", idempotent=True)
        gid = parse_json_object(resp, path="newGid").get("gid")
        if not isinstance(gid, str) or not gid:
            raise DtmServerError("newGid: answer has no gid", status=resp.status, body=resp.text)
        return gid

    def _query_flow(self, gid: str) -> Flow[Optional[Transaction]]:
        check_received_gid(gid)  # a query parameter, never SQL: any gid DTM could have stored
        resp = yield from self._call_flow("GET", "query", params={"gid": gid}, gid=gid, idempotent=True)
        body = parse_json_object(resp, path="query", gid=gid)
        trans = body.get("transaction")
        if not isinstance(trans, dict):
            return None
        return Transaction.from_json(trans, body.get("branches") or ())

    def _query_status_flow(self, gid: str) -> Flow[Optional[str]]:
        trans = yield from self._query_flow(gid)
        return trans.status if trans is not None else None

    def _all_flow(
        self,
        position: str,
        limit: int,
        status: str,
        trans_type: str,
        create_time_start: Optional[int],
        create_time_end: Optional[int],
    ) -> Flow[TransactionPage]:
        check_non_negative_int(limit, "limit")
        params = {"position": position, "limit": str(limit), "status": status, "transType": trans_type}
        if create_time_start is not None:
            params["createTimeStart"] = str(check_non_negative_int(create_time_start, "create_time_start"))
        if create_time_end is not None:
            params["createTimeEnd"] = str(check_non_negative_int(create_time_end, "create_time_end"))
        params = {k: v for k, v in params.items() if v}
        resp = yield from self._call_flow("GET", "all", params=params, idempotent=True)
        body = parse_json_object(resp, path="all")
        rows = body.get("transactions") or []
        return TransactionPage(
            transactions=tuple(Transaction.from_json(t) for t in rows if isinstance(t, dict)),
            next_position=str(body.get("next_position") or ""),
        )

    def _admin_flow(self, path: str, gid: str) -> Flow[None]:
        yield from self._post_flow(path, {"gid": check_received_gid(gid)})

    def _ping_flow(self) -> Flow[bool]:
        base = self.url.rsplit("/", 1)[0] if self.url.endswith("/dtmsvr") else self.url
        resp = yield Request("GET", f"{base}/ping", timeout=self.timeout)
        err = dtm_error(resp, path="ping")
        if err is not None:
            raise err
        return True

    def _version_flow(self) -> Flow[str]:
        resp = yield from self._call_flow("GET", "version", idempotent=True)
        return str(parse_json_object(resp, path="version").get("version", ""))


def next_page_position(page: TransactionPage) -> Optional[str]:
    """Where the page after ``page`` starts, or ``None`` when ``page`` was the last one."""
    if not page.next_position or not page.transactions:
        return None
    return page.next_position


class DtmClient(ClientBase):
    """A DTM server address with its own keep-alive pool; thread-safe.

    ``DtmClient.for_url(url)`` returns one shared client per address, which is what the builders
    use when given a plain URL string. Pass ``transport=`` to plug in your own HTTP layer.

    ``timeout`` (seconds) is a total deadline per call, retries and their backoff included. It
    defaults to 10, or to the ``timeout`` of the ``transport`` given. ``None`` sets no deadline: each
    attempt then gets the transport's own timeout, which for the transport the client builds is
    none at all. Clients are fork-safe: in a forked child the built-in transports open new
    connections instead of using the parent's.

    ``url`` may list several DTM servers sharing one store (a list, or comma-separated; with no
    ``url``, ``DTMCLI_SERVER`` is read, then the standard local address). Calls go to the first one
    up; a server that refuses a connection is passed over for ``down_for`` seconds. A refused call
    moves to the next server at once, whatever it is (nothing was sent). After a timeout or a reset
    only idempotent calls (prepare, query, newGid, ...) are repeated, on the next server; a submit
    is never sent twice (see ``submit(recover=True)``).
    """

    _shared: ClassVar[OrderedDict[str, DtmClient]]

    def __init__(
        self,
        url: Union[str, Sequence[str], None] = None,
        *,
        timeout: Optional[float] = _TRANSPORT_TIMEOUT,
        transport: Optional[Transport] = None,
        retry: Optional[Retry] = None,
        down_for: float = DEFAULT_DOWN_FOR,
    ) -> None:
        self._configure(url, timeout, transport, retry, down_for)
        self.transport: Transport = transport if transport is not None else default_transport(self.timeout)

    @classmethod
    def for_url(cls, url: Union[str, Sequence[str]]) -> DtmClient:
        """The shared client for ``url`` (created on first use; a list or comma-separated URLs for a cluster).

        At most ``MAX_SHARED_CLIENTS`` addresses are kept; past that the least recently used client
        is evicted. An evicted client is not closed, only forgotten: a thread may be in the middle
        of a request with it, and closing would pull its pool away. Once nobody uses it any more it
        is freed, and urllib3 closes its pooled connections as the pools are collected.
        """
        client: DtmClient = cls._for_url(url)
        return client

    @classmethod
    def close_shared(cls, url: Union[str, Sequence[str], None] = None) -> None:
        """Close and forget the shared client of ``url`` (every shared client when ``None``)."""
        for client in cls._forget_shared(url):
            client.close()

    def __enter__(self) -> DtmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self.transport.close()

    def call(
        self,
        method: str,
        path: str,
        *,
        body: Optional[Mapping[str, Any]] = None,
        params: Optional[Mapping[str, str]] = None,
        gid: Optional[str] = None,
        idempotent: bool = False,
    ) -> Response:
        """Call ``<url>/<path>`` on DTM; raise the typed error for anything but success.

        Only ``idempotent`` calls are retried on transport errors, all within one ``timeout``.
        """
        return run(self._call_flow(method, path, body, params, gid, idempotent), self)

    def post(self, path: str, body: Mapping[str, Any], *, idempotent: bool = False) -> Response:
        """POST a JSON body to DTM (``prepare``, ``submit``, ``abort``, ``registerBranch``, ...)."""
        return run(self._post_flow(path, body, idempotent), self)

    def new_gid(self) -> str:
        """Ask DTM for a new gid (``GET newGid``)."""
        return run(self._new_gid_flow(), self)

    def query(self, gid: str) -> Optional[Transaction]:
        """The stored transaction with its branches, or ``None`` when DTM does not know the gid."""
        return run(self._query_flow(gid), self)

    def query_status(self, gid: str) -> Optional[str]:
        """Just the status of ``gid`` (``None`` when unknown)."""
        return run(self._query_status_flow(gid), self)

    def all(
        self,
        *,
        position: str = "",
        limit: int = 100,
        status: str = "",
        trans_type: str = "",
        create_time_start: Optional[int] = None,
        create_time_end: Optional[int] = None,
    ) -> TransactionPage:
        """One page of transactions (``GET all``); times are epoch milliseconds."""
        return run(self._all_flow(position, limit, status, trans_type, create_time_start, create_time_end), self)

    def iter_all(self, *, page_size: int = 100, **filters: Any) -> Iterator[Transaction]:
        """Every transaction matching ``filters``, following ``next_position`` page by page."""
        position: Optional[str] = ""
        while position is not None:
            page = self.all(position=position, limit=page_size, **filters)
            yield from page.transactions
            position = next_page_position(page)

    def force_stop(self, gid: str) -> None:
        """Move a non-final transaction to ``failed`` without compensating (``POST forceStop``)."""
        run(self._admin_flow("forceStop", gid), self)

    def reset_next_cron_time(self, gid: str) -> None:
        """Make DTM retry ``gid`` now (effective on SQL stores; boltdb ignores it)."""
        run(self._admin_flow("resetNextCronTime", gid), self)

    def ping(self) -> bool:
        """True when the server answers ``/api/ping``."""
        return run(self._ping_flow(), self)

    def version(self) -> str:
        """The server's version string, e.g. ``v1.19.0``."""
        return run(self._version_flow(), self)


def _after_fork_in_child() -> None:
    # A lock held by a parent thread at fork time would stay locked forever in the child.
    ClientBase._shared_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


DtmLike = Union[str, Sequence[str], DtmClient]


def as_client(dtm: DtmLike) -> DtmClient:
    """A DtmClient from a URL string or a list of URLs (the shared client for them) or a client.

    The default address :data:`DEFAULT_DTM` (what builders use when given no ``dtm``) stands for
    ``DTMCLI_SERVER`` when that is set.
    """
    if isinstance(dtm, DtmClient):
        return dtm
    if dtm is DEFAULT_DTM:  # no address given: DTMCLI_SERVER when set
        return DtmClient.for_url(server_urls(None))
    if isinstance(dtm, (str, list, tuple)):
        return DtmClient.for_url(dtm)
    raise DtmInvalidInput(f"dtm must be a URL or a DtmClient, not {type(dtm).__name__}")


def new_gid(dtm: DtmLike = DEFAULT_DTM) -> str:
    """A new gid from DTM's ``newGid`` (one round trip)."""
    return as_client(dtm).new_gid()


def local_gid() -> str:
    """A new gid made locally (shortuuid, the same generator DTM uses); no round trip."""
    return str(shortuuid.uuid())
