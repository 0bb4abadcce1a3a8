"""``DtmClient``: one DTM server address, its connection pool, and the query/admin API."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, ClassVar, Iterator, Mapping, Optional, Union

import shortuuid

from ._consts import DEFAULT_DTM
from ._flow import Flow, Request, Sleep, run
from ._models import Transaction, TransactionPage
from ._protocol import Response, dtm_error, dumps, parse_json_object
from ._retry import NO_RETRY, Retry
from ._transport import Transport, check_timeout, default_transport
from ._validate import check_http_url, check_non_negative_int, check_received_gid
from .errors import DtmError, DtmInvalidInput, DtmServerError, DtmTimeout, DtmTransportError

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
    """Hide branch header values (they often carry credentials) from debug logs."""
    if "branch_headers" not in body:
        return body
    shown = dict(body)
    shown["branch_headers"] = {k: "***" for k in body["branch_headers"]}
    return shown


class ClientBase:
    """What the sync and async DTM clients share: the address, the deadline and retry policy, the
    shared-client cache, and every call as a flow (:mod:`dtmcli._flow`) the subclass drives."""

    # Least recently used first, one cache per subclass. Nested TCC/XA take the URL from a request's
    # query, so the cache is bounded; see for_url for what happens to an evicted client.
    _shared: ClassVar[OrderedDict[str, Any]]
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()
    _evicted_warned: ClassVar[bool] = False

    url: str
    timeout: Optional[float]
    retry: Retry

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._shared = OrderedDict()

    def _configure(self, url: str, timeout: Any, transport: Any, retry: Optional[Retry]) -> None:
        check_http_url(url, "DTM server URL")
        if timeout is _TRANSPORT_TIMEOUT:
            timeout = DEFAULT_TIMEOUT if transport is None else getattr(transport, "timeout", DEFAULT_TIMEOUT)
            try:
                check_timeout(timeout)
            except DtmInvalidInput:  # a custom transport's own notion (a tuple, a Timeout object)
                timeout = DEFAULT_TIMEOUT
        self.timeout = check_timeout(timeout)
        self.url = url.rstrip("/")
        self.retry = retry if retry is not None else DEFAULT_RETRY

    @classmethod
    def _for_url(cls, url: str) -> Any:
        key = url.rstrip("/")
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
    def _forget_shared(cls, url: Optional[str]) -> list[Any]:
        with ClientBase._shared_lock:
            keys = list(cls._shared) if url is None else [url.rstrip("/")]
            return [cls._shared.pop(k) for k in keys if k in cls._shared]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

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
        data = dumps(body) if body is not None else None
        url = f"{self.url}/{path}"
        if logger.isEnabledFor(logging.DEBUG):
            shown = dumps(_redact(body)).decode() if body is not None else ""
            logger.debug("dtm %s %s gid=%s params=%s body=%.*s", method, path, gid, params, _LOG_BODY, shown)

        budget = self.timeout
        deadline = None if budget is None else time.monotonic() + budget
        retry = self.retry if idempotent else NO_RETRY
        attempt = 0
        try:
            while True:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise DtmTimeout(f"{method} {url}: the {budget} s timeout ran out before a retry")
                try:
                    resp: Response = yield Request(method, url, params, data, None, left)
                    break
                except DtmTransportError:
                    delay = retry.next_delay(attempt, deadline, time.monotonic())
                    if delay is None:
                        raise
                    yield Sleep(delay, retry.sleep)
                    attempt += 1
        except DtmError as exc:
            if exc.gid is None:
                exc.gid = gid
            raise
        err = dtm_error(resp, path=path, gid=gid)
        if err is not None:
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("dtm %s %s gid=%s failed: %s", method, path, gid, err)
            raise err
        return resp

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
    """

    _shared: ClassVar[OrderedDict[str, DtmClient]]

    def __init__(
        self,
        url: str = DEFAULT_DTM,
        *,
        timeout: Optional[float] = _TRANSPORT_TIMEOUT,
        transport: Optional[Transport] = None,
        retry: Optional[Retry] = None,
    ) -> None:
        self._configure(url, timeout, transport, retry)
        self.transport: Transport = transport if transport is not None else default_transport(self.timeout)

    @classmethod
    def for_url(cls, url: str) -> DtmClient:
        """The shared client for ``url`` (created on first use).

        At most ``MAX_SHARED_CLIENTS`` addresses are kept; past that the least recently used client
        is evicted. An evicted client is not closed, only forgotten: a thread may be in the middle
        of a request with it, and closing would pull its pool away. Once nobody uses it any more it
        is freed, and urllib3 closes its pooled connections as the pools are collected.
        """
        client: DtmClient = cls._for_url(url)
        return client

    @classmethod
    def close_shared(cls, url: Optional[str] = None) -> None:
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


DtmLike = Union[str, DtmClient]


def as_client(dtm: DtmLike) -> DtmClient:
    """A DtmClient from a URL string (the shared one for that address) or a client."""
    if isinstance(dtm, DtmClient):
        return dtm
    if isinstance(dtm, str):
        check_http_url(dtm, "DTM server URL")
        return DtmClient.for_url(dtm)
    raise DtmInvalidInput(f"dtm must be a URL or a DtmClient, not {type(dtm).__name__}")


def new_gid(dtm: DtmLike = DEFAULT_DTM) -> str:
    """A new gid from DTM's ``newGid`` (one round trip)."""
    return as_client(dtm).new_gid()


def local_gid() -> str:
    """A new gid made locally (shortuuid, the same generator DTM uses); no round trip."""
    return str(shortuuid.uuid())
