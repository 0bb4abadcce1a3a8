"""dtmcli: the Python client SDK for DTM, the distributed transaction manager.

The public surface is re-exported here; modules starting with ``_`` are private.
"""

from ._consts import DEFAULT_DTM
from ._models import Branch, Transaction, TransactionPage
from ._options import TransOptions
from ._retry import ExponentialBackoff, Retry
from ._transport import RequestsTransport, Transport
from .barrier import BranchBarrier
from .client import DtmClient, local_gid, new_gid
from .errors import (
    DtmDuplicated,
    DtmError,
    DtmFailure,
    DtmInProgress,
    DtmInvalidInput,
    DtmOngoing,
    DtmServerError,
    DtmTimeout,
    DtmTransportError,
)
from .msg import Msg
from .saga import Saga

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_DTM",
    "Branch",
    "BranchBarrier",
    "DtmClient",
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
    "Msg",
    "RequestsTransport",
    "Retry",
    "Saga",
    "Transaction",
    "TransactionPage",
    "TransOptions",
    "Transport",
    "local_gid",
    "new_gid",
]
