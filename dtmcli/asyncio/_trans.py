"""The asyncio driver of the transaction core: each call to DTM is awaited on an AsyncDtmClient."""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

from .._consts import DEFAULT_DTM
from .._flow import Flow, arun
from .._trans import TransCore
from ..client import ClientBase
from .client import AsyncDtmClient, AsyncDtmLike, as_async_client

__all__ = ["AsyncTransBase"]

V = TypeVar("V")


class AsyncTransBase(TransCore):
    """:class:`~dtmcli._trans.TransCore` driven by awaiting an :class:`AsyncDtmClient`.

    Same lifecycle and rules as the sync classes. Calls are not queued behind each other: a
    prepare/submit/abort started while another one on the same object is in flight is refused
    with DtmInvalidInput (the state moves before anything is sent).
    """

    client: AsyncDtmClient

    def __init__(self, dtm: AsyncDtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)

    @staticmethod
    def _as_client(dtm: Any) -> ClientBase:
        return as_async_client(dtm)

    async def _run(self, op: str, send: Callable[[], Flow[None]], check: Optional[Callable[[], None]] = None) -> None:
        await arun(self._run_flow(op, send, check), self.client)

    async def _drive(self, flow: Flow[V]) -> V:
        return await arun(flow, self.client)
