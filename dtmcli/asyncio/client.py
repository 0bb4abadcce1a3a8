"""``AsyncDtmClient``: the asyncio twin of :class:`dtmcli.DtmClient` (same calls, awaited)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, AsyncIterator, ClassVar, Mapping, Optional, Sequence, Union

from .._consts import DEFAULT_DTM
from .._flow import arun
from .._models import Transaction, TransactionPage
from .._protocol import Response
from .._retry import Retry
from ..client import _TRANSPORT_TIMEOUT, DEFAULT_DOWN_FOR, ClientBase, local_gid, next_page_position, server_urls
from ..errors import DtmInvalidInput
from ._transport import AsyncTransport, default_async_transport

__all__ = ["AsyncDtmClient", "AsyncDtmLike", "as_async_client", "new_gid", "local_gid"]


class AsyncDtmClient(ClientBase):
    """A DTM server address with its own keep-alive pool, for asyncio code.

    Every method of :class:`~dtmcli.DtmClient` is here as a coroutine, with the same arguments,
    typed errors, retries of idempotent calls and total ``timeout`` per call (retries and backoff
    included). ``transport=`` plugs in an :class:`AsyncTransport` (for instance
    ``HttpxTransport(client=your_httpx_async_client)`` for your own TLS and proxy settings).
    ``AsyncDtmClient.for_url(url)`` is the shared client the builders use for a plain URL; it
    works from any event loop (the transport keeps one pool per loop). A list of URLs is a DTM
    cluster, with the failover rules of :class:`~dtmcli.DtmClient`.
    """

    _shared: ClassVar[OrderedDict[str, AsyncDtmClient]]

    def __init__(
        self,
        url: Union[str, Sequence[str], None] = None,
        *,
        timeout: Optional[float] = _TRANSPORT_TIMEOUT,
        transport: Optional[AsyncTransport] = None,
        retry: Optional[Retry] = None,
        down_for: float = DEFAULT_DOWN_FOR,
    ) -> None:
        self._configure(url, timeout, transport, retry, down_for)
        self.transport: AsyncTransport = transport if transport is not None else default_async_transport(self.timeout)

    @classmethod
    def for_url(cls, url: Union[str, Sequence[str]]) -> AsyncDtmClient:
        """The shared client for ``url`` (created on first use; see :meth:`dtmcli.DtmClient.for_url`)."""
        client: AsyncDtmClient = cls._for_url(url)
        return client

    @classmethod
    async def close_shared(cls, url: Union[str, Sequence[str], None] = None) -> None:
        """Close and forget the shared client of ``url`` (every shared client when ``None``)."""
        for client in cls._forget_shared(url):
            await client.aclose()

    async def __aenter__(self) -> AsyncDtmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.transport.aclose()

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Optional[Mapping[str, Any]] = None,
        params: Optional[Mapping[str, str]] = None,
        gid: Optional[str] = None,
        idempotent: bool = False,
    ) -> Response:
        """Call ``<url>/<path>`` on DTM; raise the typed error for anything but success."""
        return await arun(self._call_flow(method, path, body, params, gid, idempotent), self)

    async def post(self, path: str, body: Mapping[str, Any], *, idempotent: bool = False) -> Response:
        """POST a JSON body to DTM (``prepare``, ``submit``, ``abort``, ``registerBranch``, ...)."""
        return await arun(self._post_flow(path, body, idempotent), self)

    async def new_gid(self) -> str:
        """Ask DTM for a new gid (``GET newGid``)."""
        return await arun(self._new_gid_flow(), self)

    async def query(self, gid: str) -> Optional[Transaction]:
        """The stored transaction with its branches, or ``None`` when DTM does not know the gid."""
        return await arun(self._query_flow(gid), self)

    async def query_status(self, gid: str) -> Optional[str]:
        """Just the status of ``gid`` (``None`` when unknown)."""
        return await arun(self._query_status_flow(gid), self)

    async def all(
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
        flow = self._all_flow(position, limit, status, trans_type, create_time_start, create_time_end)
        return await arun(flow, self)

    async def iter_all(self, *, page_size: int = 100, **filters: Any) -> AsyncIterator[Transaction]:
        """Every transaction matching ``filters``, following ``next_position`` page by page."""
        position: Optional[str] = ""
        while position is not None:
            page = await self.all(position=position, limit=page_size, **filters)
            for trans in page.transactions:
                yield trans
            position = next_page_position(page)

    async def force_stop(self, gid: str) -> None:
        """Move a non-final transaction to ``failed`` without compensating (``POST forceStop``)."""
        await arun(self._admin_flow("forceStop", gid), self)

    async def reset_next_cron_time(self, gid: str) -> None:
        """Make DTM retry ``gid`` now (effective on SQL stores; boltdb ignores it)."""
        await arun(self._admin_flow("resetNextCronTime", gid), self)

    async def ping(self) -> bool:
        """True when the server answers ``/api/ping``."""
        return await arun(self._ping_flow(), self)

    async def version(self) -> str:
        """The server's version string, e.g. ``v1.19.0``."""
        return await arun(self._version_flow(), self)


AsyncDtmLike = Union[str, Sequence[str], AsyncDtmClient]


def as_async_client(dtm: AsyncDtmLike) -> AsyncDtmClient:
    """An AsyncDtmClient from a URL string (the shared one for that address) or a client."""
    if isinstance(dtm, AsyncDtmClient):
        return dtm
    if dtm is DEFAULT_DTM:  # no address given: DTMCLI_SERVER when set
        return AsyncDtmClient.for_url(server_urls(None))
    if isinstance(dtm, (str, list, tuple)):
        return AsyncDtmClient.for_url(dtm)
    hint = " (a sync DtmClient cannot be awaited; use AsyncDtmClient)" if isinstance(dtm, ClientBase) else ""
    raise DtmInvalidInput(f"dtm must be a URL or an AsyncDtmClient, not {type(dtm).__name__}{hint}")


async def new_gid(dtm: AsyncDtmLike = DEFAULT_DTM) -> str:
    """A new gid from DTM's ``newGid`` (one round trip)."""
    return await as_async_client(dtm).new_gid()
