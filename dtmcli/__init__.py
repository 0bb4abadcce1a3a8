"""dtmcli: the Python client SDK for DTM, the distributed transaction manager.

The public surface is re-exported here; modules starting with ``_`` are private.
"""

from ._consts import DEFAULT_DTM
from ._models import Branch, Transaction, TransactionPage
from ._options import TransOptions
from ._retry import ExponentialBackoff, Retry
from ._transport import Http11Transport, RequestsTransport, Transport, Urllib3Transport
from ._twophase import BranchReply, GlobalTransaction
from .barrier import BranchBarrier
from .branch import BranchInfo, BranchRequestError, BranchResponse, current_branch_info, set_dtm_servers
from .client import DtmClient, local_gid, new_gid
from .errors import (
    BarrierConflict,
    BarrierDatabaseError,
    DtmAttributeError,
    DtmConnectError,
    DtmConnectTimeout,
    DtmDuplicated,
    DtmError,
    DtmFailure,
    DtmInProgress,
    DtmInvalidInput,
    DtmOngoing,
    DtmServerError,
    DtmTimeout,
    DtmTransportError,
    StepFailure,
    WorkflowConflict,
    WorkflowPhase2Error,
)
from .msg import Msg
from .saga import Saga
from .tcc import Tcc, tcc_global_transaction
from .xa import Xa, register_xa_branch, xa_global_transaction

__version__ = "0.1.0"

__all__ = [
    "BarrierConflict",
    "BarrierDatabaseError",
    "DEFAULT_DTM",
    "Branch",
    "BranchBarrier",
    "BranchInfo",
    "BranchReply",
    "BranchRequestError",
    "BranchResponse",
    "DtmAttributeError",
    "DtmClient",
    "DtmConnectError",
    "DtmConnectTimeout",
    "StepFailure",
    "WorkflowConflict",
    "WorkflowPhase2Error",
    "DtmDuplicated",
    "DtmError",
    "DtmFailure",
    "DtmInProgress",
    "DtmInvalidInput",
    "DtmOngoing",
    "DtmServerError",
    "DtmTimeout",
    "DtmTransportError",
    "ExponentialBackoff",
    "GlobalTransaction",
    "Msg",
    "Http11Transport",
    "RequestsTransport",
    "Retry",
    "Saga",
    "Tcc",
    "Transaction",
    "TransactionPage",
    "TransOptions",
    "Transport",
    "Urllib3Transport",
    "Xa",
    "current_branch_info",
    "local_gid",
    "new_gid",
    "register_xa_branch",
    "set_dtm_servers",
    "tcc_global_transaction",
    "xa_global_transaction",
]
