"""dtmcli for asyncio: the same API as :mod:`dtmcli`, with every call to DTM, to a branch and to
a database awaited.

>>> from dtmcli.asyncio import AsyncDtmClient, Saga, Msg, tcc_global_transaction, BranchBarrier
>>> await Saga(DTM, gid).add(f"{busi}/TransOut", f"{busi}/TransOutCom", {"amount": 30}).submit()

Both flavours run the same protocol decisions (:mod:`dtmcli._flow`); only the I/O differs.
"""

from __future__ import annotations

from typing import Any

from .client import AsyncDtmClient, AsyncDtmLike, as_async_client, local_gid, new_gid
from .msg import Msg
from .saga import Saga

__all__ = [
    "AsyncDtmClient",
    "AsyncDtmLike",
    "as_async_client",
    "local_gid",
    "new_gid",
    "Msg",
    "Saga",
]


def __getattr__(name: str) -> Any:  # pragma: no cover - filled in as the async modules land
    raise AttributeError(f"module 'dtmcli.asyncio' has no attribute {name!r}")
