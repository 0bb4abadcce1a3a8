"""DTM over gRPC (needs the ``grpc`` extra: ``pip install 'dtmcli[grpc]'``).

Client side, as Go's ``dtmgrpc``: :class:`DtmGrpcClient` (``host:port`` of DTM's gRPC API, port
36790) and the builders :class:`Saga`, :class:`Msg`, :class:`Tcc` / :func:`tcc_global_transaction`
and :class:`Xa` / :func:`xa_global_transaction` (branch side: :func:`xa_local_transaction`,
:func:`xa_handle_phase2`, or :func:`register_xa_branch` inside your own XA statements).
Branch URLs are ``host:port/package.Service/Method`` and payloads protobuf messages (or their bytes)::

    from dtmcli.grpc import DtmGrpcClient, Saga

    dtm = DtmGrpcClient("localhost:36790")
    Saga(dtm, dtm.new_gid()).add(f"{busi}/busi.Busi/TransOut", f"{busi}/busi.Busi/TransOutRevert",
                                 ReqGrpc(Amount=30)).submit()

Every decision (lifecycle, never resubmitting, wait_result, TCC/XA abort on error, msg
do_and_submit) is the HTTP builders' own; only the wire differs. Errors are the same typed errors:
gRPC Aborted is :class:`~dtmcli.errors.DtmFailure`, FailedPrecondition
:class:`~dtmcli.errors.DtmOngoing`, Unavailable before connecting
:class:`~dtmcli.errors.DtmConnectError`, DeadlineExceeded :class:`~dtmcli.errors.DtmTimeout`.

Branch side (:mod:`dtmcli.grpc.server`): :class:`DtmServerInterceptor` /
:class:`AsyncDtmServerInterceptor`, :class:`GrpcBranchInfo`. The asyncio client and builders are in
:mod:`dtmcli.asyncio.grpc`.
"""

from ._builders import (
    Msg,
    Saga,
    Tcc,
    Xa,
    register_xa_branch,
    tcc_global_transaction,
    xa_global_transaction,
    xa_handle_phase2,
    xa_local_transaction,
)
from ._core import Reply
from .client import DtmGrpcClient, DtmGrpcLike, as_grpc_client
from .server import (
    AsyncDtmServerInterceptor,
    DtmServerInterceptor,
    GrpcBranchInfo,
    branch_info_from_grpc,
    set_grpc_dtm_servers,
)

__all__ = [
    "AsyncDtmServerInterceptor",
    "DtmGrpcClient",
    "DtmGrpcLike",
    "DtmServerInterceptor",
    "GrpcBranchInfo",
    "Msg",
    "Reply",
    "Saga",
    "Tcc",
    "Xa",
    "as_grpc_client",
    "branch_info_from_grpc",
    "register_xa_branch",
    "set_grpc_dtm_servers",
    "tcc_global_transaction",
    "xa_global_transaction",
    "xa_handle_phase2",
    "xa_local_transaction",
]
