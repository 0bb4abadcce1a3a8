"""The asyncio Saga: the builder of :class:`dtmcli.Saga` with an awaited submit."""

from __future__ import annotations

from typing import Any, Optional

from .._consts import DEFAULT_DTM
from ..saga import SagaCore
from ._trans import AsyncTransBase
from .client import AsyncDtmLike

__all__ = ["Saga"]


class Saga(SagaCore, AsyncTransBase):
    """A saga global transaction for asyncio code.

    >>> await Saga(DTM, gid).add(f"{busi}/TransOut", f"{busi}/TransOutCom", {"amount": 30}).submit()

    Everything but :meth:`submit` is the sync :class:`dtmcli.Saga`'s (same checks, same body).
    """

    def __init__(self, dtm: AsyncDtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)

    async def submit(self, *, recover: bool = False) -> None:
        """Submit the saga (see :meth:`dtmcli.Saga.submit`: same outcomes, errors and ``recover``)."""
        await self._run("submit", lambda: self._submit_flow(recover))
