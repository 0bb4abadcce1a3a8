"""dtmcli for asyncio: the same API as :mod:`dtmcli`, with every call to DTM, to a branch and to
a database awaited.

>>> from dtmcli.asyncio import AsyncDtmClient, Saga, Msg, tcc_global_transaction, BranchBarrier
>>> await Saga(DTM, gid).add(f"{busi}/TransOut", f"{busi}/TransOutCom", {"amount": 30}).submit()

Both flavours run the same protocol decisions (:mod:`dtmcli._flow`, see docs/design.md); only the
I/O differs. Errors are the classes of :mod:`dtmcli.errors`, raised in the same situations.
"""

from ..branch import BranchInfo, current_branch_info
from ._transport import AiohttpTransport, AsyncHttp11Transport, AsyncTransport, HttpxTransport
from ._twophase import AsyncGlobalTransaction
from .barrier import BranchBarrier
from .client import AsyncDtmClient, AsyncDtmLike, as_async_client, local_gid, new_gid
from .msg import Msg
from .saga import Saga
from .tcc import Tcc, tcc_global_transaction
from .xa import Xa, register_xa_branch, xa_global_transaction, xa_handle_phase2, xa_local_transaction, xa_preflight

__all__ = [
    "AiohttpTransport",
    "AsyncHttp11Transport",
    "AsyncDtmClient",
    "AsyncDtmLike",
    "AsyncGlobalTransaction",
    "AsyncTransport",
    "BranchBarrier",
    "BranchInfo",
    "HttpxTransport",
    "Msg",
    "Saga",
    "Tcc",
    "Xa",
    "as_async_client",
    "current_branch_info",
    "local_gid",
    "new_gid",
    "register_xa_branch",
    "tcc_global_transaction",
    "xa_global_transaction",
    "xa_handle_phase2",
    "xa_local_transaction",
    "xa_preflight",
]
