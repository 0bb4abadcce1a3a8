"""The blocking gRPC builders: Saga, Msg, Tcc and Xa of :mod:`dtmcli` speaking DTM's gRPC API."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, TypeVar, overload

from .. import msg as _msg
from .. import saga as _saga
from .. import tcc as _tcc
from .. import xa as _xa
from .._barrier import xa as _barrier_xa
from .._barrier.core import DEFAULT_TABLE
from .._flow import run
from .._twophase import GlobalTransaction, global_transaction
from ..client import ClientBase
from ._core import GrpcMsgCore, GrpcSagaCore, GrpcTccCore, GrpcXaCore, Reply
from .client import DtmGrpcClient, DtmGrpcLike, as_grpc_client

if TYPE_CHECKING:
    from .server import GrpcBranchInfo

__all__ = [
    "Msg", "Saga", "Tcc", "Xa", "register_xa_branch", "tcc_global_transaction", "xa_global_transaction",
    "xa_handle_phase2", "xa_local_transaction",
]

R = TypeVar("R")


class _BlockingGrpc:
    """The builders below take a gRPC target or a :class:`DtmGrpcClient`."""

    @staticmethod
    def _as_client(dtm: Any) -> ClientBase:
        return as_grpc_client(dtm)


class Saga(_BlockingGrpc, GrpcSagaCore, _saga.Saga):
    """A saga over DTM's gRPC API (Go's ``dtmgrpc.NewSagaGrpc``).

    >>> Saga("localhost:36790", gid).add("busi:50589/busi.Busi/TransOut", "busi:50589/busi.Busi/TransOutRevert",
    ...                                  ReqGrpc(Amount=30)).submit()

    Same options, orders, lifecycle and submit outcomes as :class:`dtmcli.Saga`; ``dtm`` is a gRPC
    target or a :class:`DtmGrpcClient`. ``wait_result`` needs the client's ``http`` (DTM's gRPC API
    has no query to settle an unclear answer); without it the saga is refused before anything is sent.
    """

    client: DtmGrpcClient  # type: ignore[assignment]

    def __init__(self, dtm: DtmGrpcLike, gid: Optional[str] = None, **options: Any) -> None:
        target: Any = dtm  # a gRPC target or client, for _BlockingGrpc._as_client
        super().__init__(target, gid, **options)


class Msg(_BlockingGrpc, GrpcMsgCore, _msg.Msg):
    """A 2-phase message over DTM's gRPC API (Go's ``dtmgrpc.NewMsgGrpc``).

    ``add(url, message)``, ``prepare(query_prepared_url)``, ``submit()``, ``abort()`` and
    ``do_and_submit(query_prepared_url, busi_call)`` / ``do_and_submit_db`` decide as
    :class:`dtmcli.Msg` does; ``query_prepared`` is a gRPC method answering OK, Aborted (roll back)
    or FailedPrecondition (not yet). Concurrent messages are HTTP only.
    """

    client: DtmGrpcClient  # type: ignore[assignment]

    def __init__(self, dtm: DtmGrpcLike, gid: Optional[str] = None, **options: Any) -> None:
        target: Any = dtm  # a gRPC target or client, for _BlockingGrpc._as_client
        super().__init__(target, gid, **options)


class Tcc(_BlockingGrpc, GrpcTccCore, _tcc.Tcc):
    """A TCC over DTM's gRPC API (Go's ``dtmgrpc.TccGlobalTransaction`` / ``TccFromGrpc``).

    Usually driven by :func:`tcc_global_transaction`. ``Tcc.from_grpc(context)`` continues the
    global transaction inside a gRPC try handler (nested branches ``<branch_id>01``, ...).
    """

    client: DtmGrpcClient  # type: ignore[assignment]

    def __init__(self, dtm: DtmGrpcLike, gid: Optional[str] = None, **options: Any) -> None:
        target: Any = dtm  # a gRPC target or client, for _BlockingGrpc._as_client
        super().__init__(target, gid, **options)

    def call_branch(
        self, payload: Any, try_url: str, confirm_url: str, cancel_url: str, reply: Reply = None
    ) -> Any:
        """Register the branch (``BusiPayload`` = ``payload``, a protobuf message or bytes), then call its
        try with the ``dtm-*`` metadata; return the reply (``reply``: a message class or message to
        parse into, or ``None`` for the raw bytes).

        Aborted raises DtmFailure, FailedPrecondition DtmOngoing, other codes their typed error;
        any error after the registration makes the global transaction abort.
        """
        return self._drive(self._call_grpc_branch_flow(payload, try_url, confirm_url, cancel_url, reply))


class Xa(_BlockingGrpc, GrpcXaCore, _xa.Xa):
    """An XA global transaction over DTM's gRPC API (Go's ``dtmgrpc.XaGlobalTransaction``)."""

    client: DtmGrpcClient  # type: ignore[assignment]

    def __init__(self, dtm: DtmGrpcLike, gid: Optional[str] = None, **options: Any) -> None:
        target: Any = dtm  # a gRPC target or client, for _BlockingGrpc._as_client
        super().__init__(target, gid, **options)

    def call_branch(self, payload: Any, url: str, reply: Reply = None) -> Any:
        """Call the branch's action (``dtm-op`` action, ``dtm-phase2_url`` = ``url``); return its reply
        (see :meth:`Tcc.call_branch`). Any error makes the global transaction abort."""
        return self._drive(self._call_grpc_branch_flow(payload, url, reply))


@overload
def tcc_global_transaction(
    dtm: DtmGrpcLike, gid: Optional[str] = ..., callback: None = ..., **options: Any
) -> GlobalTransaction[Tcc]: ...


@overload
def tcc_global_transaction(dtm: DtmGrpcLike, gid: Optional[str], callback: Callable[[Tcc], R], **options: Any) -> R: ...


@overload
def tcc_global_transaction(
    dtm: DtmGrpcLike, gid: Optional[str] = ..., *, callback: Callable[[Tcc], R], **options: Any
) -> R: ...


def tcc_global_transaction(
    dtm: DtmGrpcLike, gid: Optional[str] = None, callback: Optional[Callable[[Tcc], Any]] = None, **options: Any
) -> Any:
    """A TCC global transaction over gRPC, in the three shapes of :func:`dtmcli.tcc_global_transaction`
    (``with``, decorator, ``callback``): prepare, the body, then submit, or abort with the error's
    text as ``rollback_reason`` (for a branch's gRPC error, Go's ``rpc error: code = ... desc = ...``)."""
    return global_transaction(GlobalTransaction, Tcc, "tcc_global_transaction", dtm, gid, callback, options)


@overload
def xa_global_transaction(
    dtm: DtmGrpcLike, gid: Optional[str] = ..., callback: None = ..., **options: Any
) -> GlobalTransaction[Xa]: ...


@overload
def xa_global_transaction(dtm: DtmGrpcLike, gid: Optional[str], callback: Callable[[Xa], R], **options: Any) -> R: ...


@overload
def xa_global_transaction(
    dtm: DtmGrpcLike, gid: Optional[str] = ..., *, callback: Callable[[Xa], R], **options: Any
) -> R: ...


def xa_global_transaction(
    dtm: DtmGrpcLike, gid: Optional[str] = None, callback: Optional[Callable[[Xa], Any]] = None, **options: Any
) -> Any:
    """An XA global transaction over gRPC (see :func:`tcc_global_transaction`). Unlike Go's, which sends
    only gid and trans_type, prepare carries the options (so ``timeout_to_fail`` and friends apply)."""
    return global_transaction(GlobalTransaction, Xa, "xa_global_transaction", dtm, gid, callback, options)


def register_xa_branch(context: Any, *, dtm: Optional[DtmGrpcLike] = None) -> None:
    """Branch side of an XA action served over gRPC: register the branch with DTM (``RegisterBranch``
    with ``Data{"url": dtm-phase2_url}``, as Go's ``XaLocalTransaction``), inside the local XA
    transaction, before ``XA PREPARE`` (protocol.md §9).

    ``context`` is the handler's servicer context (or its metadata, or a
    :class:`~dtmcli.grpc.GrpcBranchInfo`); ``dtm`` pins the DTM target instead of the trusted
    ``dtm-dtm``. Aborted (the global transaction is no longer prepared) raises DtmFailure: roll back.
    """
    info = _grpc_branch_info(context)
    body = _xa.xa_registration(info)
    client = as_grpc_client(dtm if dtm is not None else info.require_dtm())
    run(_xa.register_xa_branch_flow(client, body), client)


def _grpc_branch_info(context: Any) -> GrpcBranchInfo:
    """The GrpcBranchInfo of ``context`` (a servicer context, its metadata, or a GrpcBranchInfo)."""
    from .server import GrpcBranchInfo, branch_info_from_grpc

    return context if isinstance(context, GrpcBranchInfo) else branch_info_from_grpc(context)


def xa_local_transaction(
    context: Any,
    conn: Any,
    busi: Callable[[Any], R],
    *,
    dtm: Optional[DtmGrpcLike] = None,
    table: str = DEFAULT_TABLE,
    dialect: Optional[str] = None,
) -> R:
    """Run ``busi(conn)`` as the local XA transaction of an xa action served over gRPC and prepare it,
    registering the branch with DTM's gRPC API (``RegisterBranch``) in between.

    The gRPC form of :func:`dtmcli.barrier.xa_local_transaction`: the same steps, checks and errors.
    ``context`` is the handler's servicer context (or its metadata, or a
    :class:`~dtmcli.grpc.GrpcBranchInfo`); it must be an xa ``action`` call carrying
    ``dtm-phase2_url`` and a trusted ``dtm-dtm`` (:func:`~dtmcli.grpc.set_grpc_dtm_servers`), or
    pass ``dtm`` (a gRPC target or :class:`DtmGrpcClient`). ``conn`` is a factory of DB-API
    connections (preferred: on MariaDB phase 2 sees the prepared branch only once its connection is
    closed) or a dedicated connection without an open transaction.
    """
    return _barrier_xa._local_transaction(
        _grpc_branch_info(context), conn, busi, dtm=dtm, table=table, dialect=dialect, as_dtm=as_grpc_client
    )


def xa_handle_phase2(context: Any, conn: Any, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None) -> None:
    """Handle DTM's phase-2 gRPC call of an XA branch (the action's method again, with ``dtm-op``
    commit or rollback and an empty message): see :func:`dtmcli.barrier.xa_handle_phase2`.
    ``context`` and ``conn`` as for :func:`xa_local_transaction`."""
    _barrier_xa.xa_handle_phase2(_grpc_branch_info(context), conn, table=table, dialect=dialect)
