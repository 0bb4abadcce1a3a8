"""DTM over gRPC for asyncio code (``grpc.aio``; needs the ``grpc`` extra).

:class:`AsyncDtmGrpcClient` and the builders :class:`Saga`, :class:`Msg`, :class:`Tcc` /
:func:`tcc_global_transaction`, :class:`Xa` / :func:`xa_global_transaction` are those of
:mod:`dtmcli.grpc` with every call awaited: the same cores and flows, driven by the asyncio driver,
with the gRPC calls made on ``grpc.aio`` channels (one set per event loop). Branch side:
:func:`xa_local_transaction` and :func:`xa_handle_phase2` on asyncio connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from typing import Any, Awaitable, Callable, ClassVar, Optional, Sequence, TypeVar, Union, overload

import grpc
import grpc.aio
from google.protobuf.message import Message

from .._barrier.core import DEFAULT_TABLE
from .._flow import arun
from .._models import Transaction
from .._protocol import Response
from .._retry import Retry
from .._twophase import global_transaction
from ..client import DEFAULT_TIMEOUT, ClientBase
from ..errors import DtmConnectTimeout, DtmInvalidInput, DtmTransportError
from ..grpc._core import GrpcMsgCore, GrpcSagaCore, GrpcTccCore, GrpcXaCore, Reply
from ..grpc._io import BranchCall, ChannelsBase, connect_outcome, identity, serialize, translate_rpc_error
from ..grpc._proto import METHODS, method_path
from ..grpc._proto import dtmgimp_pb2 as pb
from ..grpc._wire import split_grpc_url, success_response
from ..grpc.client import GrpcClientCore
from . import msg as _msg
from . import saga as _saga
from . import tcc as _tcc
from . import xa as _xa
from ._twophase import AsyncGlobalTransaction
from .client import AsyncDtmClient

__all__ = [
    "AsyncDtmGrpcClient", "AsyncGrpcChannels", "Msg", "Saga", "Tcc", "Xa", "as_async_grpc_client",
    "tcc_global_transaction", "xa_global_transaction", "xa_handle_phase2", "xa_local_transaction",
]

R = TypeVar("R")

logger = logging.getLogger("dtmcli")


class _LoopChannels:
    """The ``grpc.aio`` channels of one event loop."""

    def __init__(self) -> None:
        self.dtm: Optional[grpc.aio.Channel] = None
        self.branches: dict[str, grpc.aio.Channel] = {}


def _aio_state(channel: grpc.aio.Channel, try_to_connect: bool) -> grpc.ChannelConnectivity:
    try:
        return channel.get_state(try_to_connect=try_to_connect)
    except Exception:  # grpc.aio.UsageError and the like: a closed channel
        return grpc.ChannelConnectivity.SHUTDOWN


async def aio_connect(
    channel: grpc.aio.Channel, timeout: Optional[float], where: str, target: str, gid: Optional[str] = None
) -> Optional[float]:
    """The asyncio twin of :func:`dtmcli.grpc._io.sync_connect`: wait until ``channel`` is READY within
    ``timeout`` (a READY channel costs one state read); return the time left for the call. No
    connection: DtmConnectError / DtmConnectTimeout, the call not made; a closed channel: DtmInvalidInput."""
    state = _aio_state(channel, True)
    if state is grpc.ChannelConnectivity.READY:
        return timeout
    start = time.monotonic()
    while True:
        err = connect_outcome(state, where, target, gid)
        if err is not None:
            raise err
        left = None if timeout is None else timeout - (time.monotonic() - start)
        if left is not None and left <= 0:
            raise DtmConnectTimeout(f"{where}: no connection to {target} within the {timeout} s timeout", gid=gid)
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), left)
        except asyncio.TimeoutError:
            continue  # the loop raises DtmConnectTimeout
        state = _aio_state(channel, True)
        if state is grpc.ChannelConnectivity.READY:
            return None if timeout is None else max(timeout - (time.monotonic() - start), 0.001)


def _not_cancelled_by_caller() -> bool:
    """Whether a CancelledError out of a grpc.aio call came from its channel closing rather than from a
    cancel of the running task (Python 3.11+ can tell; before, the CancelledError is left as it is)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is not None and cancelling() == 0


def _channel_closed(where: str, call: Optional[BranchCall] = None) -> DtmTransportError:
    ids: dict[str, Any] = {} if call is None else {"gid": call.gid, "branch_id": call.branch_id, "op": call.op}
    return DtmTransportError(f"{where}: the gRPC channel was closed during the call (it may have been sent)", **ids)


class AsyncGrpcChannels(ChannelsBase):
    """``grpc.aio`` channels to DTM and to branches; an aio channel belongs to the loop it was made
    in, so each event loop gets its own (a ``channel`` passed in is used as is, in its own loop; it
    must not retry by itself: see :func:`~dtmcli.grpc._io.channel_options`)."""

    def __init__(
        self,
        target: str,
        channel: Optional[grpc.aio.Channel] = None,
        *,
        credentials: Optional[grpc.ChannelCredentials] = None,
        branch_credentials: Optional[grpc.ChannelCredentials] = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(
            target, channel, credentials=credentials, branch_credentials=branch_credentials, options=options
        )
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopChannels] = weakref.WeakKeyDictionary()

    def _mine(self) -> _LoopChannels:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._check_open()
            chans = self._loops.get(loop)
            if chans is None:
                chans = self._loops[loop] = _LoopChannels()
        return chans

    def _open(self, target: str, credentials: Optional[grpc.ChannelCredentials]) -> grpc.aio.Channel:
        if credentials is not None:
            return grpc.aio.secure_channel(target, credentials, options=self._options)
        return grpc.aio.insecure_channel(target, options=self._options)

    async def call_dtm(self, method: str, message: Message, timeout: Optional[float]) -> Response:
        """Call ``dtmgimp.Dtm/<method>`` once the channel is READY; a failure raises its typed error."""
        where = f"dtm {method}"
        chans = self._mine()
        channel: grpc.aio.Channel = self._given
        if channel is None:
            if chans.dtm is None:
                chans.dtm = self._open(self.target, self._credentials)
            channel = chans.dtm
        left = await aio_connect(channel, timeout, where, self.target, getattr(message, "Gid", None) or None)
        call = channel.unary_unary(
            method_path(method), request_serializer=serialize, response_deserializer=METHODS[method][1].FromString
        )
        try:
            reply = await call(message, timeout=left)
        except asyncio.CancelledError:
            if _not_cancelled_by_caller():
                raise _channel_closed(where) from None
            raise
        except Exception as exc:
            raise translate_rpc_error(exc, where) from None
        return success_response(reply)

    async def call_branch(self, call: BranchCall) -> bytes:
        """Perform a :class:`~dtmcli.grpc._io.BranchCall` once the channel is READY; a failure raises its
        typed error."""
        target, method = split_grpc_url(call.url)
        chans = self._mine()
        channel = chans.branches.get(target)
        if channel is None:
            channel = chans.branches[target] = self._open(target, self._branch_credentials)
        left = await aio_connect(channel, call.timeout, call.url, target, call.gid)
        stub = channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
        try:
            reply: bytes = await stub(call.payload, timeout=left, metadata=call.metadata)
        except asyncio.CancelledError:
            if _not_cancelled_by_caller():
                raise _channel_closed(call.url, call) from None
            raise
        except Exception as exc:
            raise translate_rpc_error(exc, call.url, call) from None
        return reply

    async def aclose(self) -> None:
        """Close the channels this object opened in the running loop; forget those of other loops. A
        no-op for a shared client, whose channels other tasks may be using."""
        if self.shared:
            logger.debug("aclose() of the shared gRPC client of %s: kept open", self.target)
            return
        loop = asyncio.get_running_loop()
        with self._lock:
            self._closed = True
            mine = self._loops.pop(loop, None)
            self._loops.clear()
        if mine is not None:
            for channel in [*mine.branches.values(), *([mine.dtm] if mine.dtm is not None else [])]:
                await channel.close()


def _http_client(http: Any) -> Optional[AsyncDtmClient]:
    if http is None or isinstance(http, AsyncDtmClient):
        return http
    if isinstance(http, (str, list, tuple)):
        return AsyncDtmClient.for_url(http)
    raise DtmInvalidInput(f"http must be a DTM HTTP URL or an AsyncDtmClient, not {type(http).__name__}")


class AsyncDtmGrpcClient(GrpcClientCore):
    """The asyncio twin of :class:`dtmcli.grpc.DtmGrpcClient` (same arguments; ``channel`` is a
    ``grpc.aio.Channel``, ``http`` a URL or :class:`~dtmcli.asyncio.AsyncDtmClient`)."""

    _shared: ClassVar[Any]
    http: Optional[AsyncDtmClient]
    grpc_io: AsyncGrpcChannels

    def __init__(
        self,
        target: str,
        *,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        retry: Optional[Retry] = None,
        channel: Optional[grpc.aio.Channel] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        branch_credentials: Optional[grpc.ChannelCredentials] = None,
        options: Sequence[tuple[str, Any]] = (),
        http: Union[str, Sequence[str], AsyncDtmClient, None] = None,
    ) -> None:
        self._configure_grpc(target, timeout, retry, _http_client(http))
        self.grpc_io = AsyncGrpcChannels(
            self.target, channel, credentials=credentials, branch_credentials=branch_credentials, options=options
        )

    @classmethod
    def for_target(cls, target: str) -> AsyncDtmGrpcClient:
        """The shared client of ``target`` (created on first use)."""
        client: AsyncDtmGrpcClient = cls._for_target(target)
        return client

    async def __aenter__(self) -> AsyncDtmGrpcClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the channels the client opened (in the running loop); a closed client refuses further
        calls. A no-op for the shared client of a target (:meth:`for_target`): it lives for the process."""
        await self.grpc_io.aclose()

    async def new_gid(self) -> str:
        """A new gid from DTM (``NewGid``)."""
        return await arun(self._new_gid_flow(), self)

    async def prepare(self, body: Union[Any, pb.DtmRequest]) -> None:
        """``Prepare`` (see :meth:`dtmcli.grpc.DtmGrpcClient.prepare`)."""
        await arun(self._call_body("prepare", body), self)

    async def submit(self, body: Union[Any, pb.DtmRequest]) -> None:
        """``Submit``; never retried."""
        await arun(self._call_body("submit", body), self)

    async def abort(self, body: Union[Any, pb.DtmRequest]) -> None:
        """``Abort``."""
        await arun(self._call_body("abort", body), self)

    async def register_branch(self, body: Union[Any, pb.DtmBranchRequest]) -> None:
        """``RegisterBranch`` (see :meth:`dtmcli.grpc.DtmGrpcClient.register_branch`)."""
        await arun(self._call_body("registerBranch", body), self)

    async def query(self, gid: str) -> Optional[Transaction]:
        """The stored transaction, through the HTTP API given as ``http``; DtmInvalidInput without it."""
        return await arun(self._query_flow(gid), self)

    async def query_status(self, gid: str) -> Optional[str]:
        """Just the status of ``gid`` (see :meth:`query`)."""
        return await arun(self._query_status_flow(gid), self)

    @classmethod
    def close_shared(cls, target: Optional[str] = None) -> None:
        """Forget the shared client of ``target`` (every one when ``None``); its channels close when it
        is no longer used (an aio channel can only be closed in its own event loop)."""
        cls._forget_target(target)


def as_async_grpc_client(dtm: Any) -> AsyncDtmGrpcClient:
    """An AsyncDtmGrpcClient from a target string (the shared one of it) or a client."""
    if isinstance(dtm, AsyncDtmGrpcClient):
        return dtm
    if isinstance(dtm, str):
        return AsyncDtmGrpcClient.for_target(dtm)
    hint = " (a blocking or HTTP client cannot be awaited over gRPC)" if isinstance(dtm, ClientBase) else ""
    raise DtmInvalidInput(f"dtm must be a DTM gRPC target host:port or an AsyncDtmGrpcClient, not {dtm!r}{hint}")


AsyncDtmGrpcLike = Union[str, AsyncDtmGrpcClient]


class _AsyncGrpc:
    """The builders below take a gRPC target or an :class:`AsyncDtmGrpcClient`."""

    @staticmethod
    def _as_client(dtm: Any) -> ClientBase:
        return as_async_grpc_client(dtm)


class Saga(_AsyncGrpc, GrpcSagaCore, _saga.Saga):
    """A saga over DTM's gRPC API, for asyncio code (see :class:`dtmcli.grpc.Saga`)."""

    client: AsyncDtmGrpcClient  # type: ignore[assignment]

    def __init__(self, dtm: AsyncDtmGrpcLike, gid: Optional[str] = None, **options: Any) -> None:
        target: Any = dtm
        super().__init__(target, gid, **options)


class Msg(_AsyncGrpc, GrpcMsgCore, _msg.Msg):
    """A 2-phase message over DTM's gRPC API, for asyncio code (see :class:`dtmcli.grpc.Msg`)."""

    client: AsyncDtmGrpcClient  # type: ignore[assignment]

    def __init__(self, dtm: AsyncDtmGrpcLike, gid: Optional[str] = None, **options: Any) -> None:
        target: Any = dtm
        super().__init__(target, gid, **options)


class Tcc(_AsyncGrpc, GrpcTccCore, _tcc.Tcc):
    """A TCC over DTM's gRPC API, for asyncio code (see :class:`dtmcli.grpc.Tcc`)."""

    client: AsyncDtmGrpcClient  # type: ignore[assignment]

    def __init__(self, dtm: AsyncDtmGrpcLike, gid: Optional[str] = None, **options: Any) -> None:
        target: Any = dtm
        super().__init__(target, gid, **options)

    async def call_branch(
        self, payload: Any, try_url: str, confirm_url: str, cancel_url: str, reply: Reply = None
    ) -> Any:
        """Register the branch, then call its try; return the reply (see :meth:`dtmcli.grpc.Tcc.call_branch`)."""
        return await self._drive(self._call_grpc_branch_flow(payload, try_url, confirm_url, cancel_url, reply))


class Xa(_AsyncGrpc, GrpcXaCore, _xa.Xa):
    """An XA global transaction over DTM's gRPC API, for asyncio code (see :class:`dtmcli.grpc.Xa`)."""

    client: AsyncDtmGrpcClient  # type: ignore[assignment]

    def __init__(self, dtm: AsyncDtmGrpcLike, gid: Optional[str] = None, **options: Any) -> None:
        target: Any = dtm
        super().__init__(target, gid, **options)

    async def call_branch(self, payload: Any, url: str, reply: Reply = None) -> Any:
        """Call the branch's action; return its reply (see :meth:`dtmcli.grpc.Xa.call_branch`)."""
        return await self._drive(self._call_grpc_branch_flow(payload, url, reply))


@overload
def tcc_global_transaction(
    dtm: AsyncDtmGrpcLike, gid: Optional[str] = ..., callback: None = ..., **options: Any
) -> AsyncGlobalTransaction[Tcc]: ...


@overload
def tcc_global_transaction(
    dtm: AsyncDtmGrpcLike, gid: Optional[str], callback: Callable[[Tcc], Awaitable[R]], **options: Any
) -> Awaitable[R]: ...


def tcc_global_transaction(
    dtm: AsyncDtmGrpcLike, gid: Optional[str] = None, callback: Optional[Callable[[Tcc], Awaitable[Any]]] = None,
    **options: Any,
) -> Any:
    """A TCC global transaction over gRPC for asyncio code: ``async with``, decorator or ``callback``
    (see :func:`dtmcli.asyncio.tcc_global_transaction`)."""
    return global_transaction(AsyncGlobalTransaction, Tcc, "tcc_global_transaction", dtm, gid, callback, options)


@overload
def xa_global_transaction(
    dtm: AsyncDtmGrpcLike, gid: Optional[str] = ..., callback: None = ..., **options: Any
) -> AsyncGlobalTransaction[Xa]: ...


@overload
def xa_global_transaction(
    dtm: AsyncDtmGrpcLike, gid: Optional[str], callback: Callable[[Xa], Awaitable[R]], **options: Any
) -> Awaitable[R]: ...


def xa_global_transaction(
    dtm: AsyncDtmGrpcLike, gid: Optional[str] = None, callback: Optional[Callable[[Xa], Awaitable[Any]]] = None,
    **options: Any,
) -> Any:
    """An XA global transaction over gRPC for asyncio code (see :func:`tcc_global_transaction`)."""
    return global_transaction(AsyncGlobalTransaction, Xa, "xa_global_transaction", dtm, gid, callback, options)


async def xa_local_transaction(
    context: Any,
    conn: Any,
    busi: Callable[[Any], Awaitable[R]],
    *,
    dtm: Optional[AsyncDtmGrpcLike] = None,
    table: str = DEFAULT_TABLE,
    dialect: Optional[str] = None,
) -> R:
    """Run ``await busi(conn)`` as the local XA transaction of an xa action served by ``grpc.aio`` and
    prepare it, registering the branch with DTM's gRPC API in between: the asyncio form of
    :func:`dtmcli.grpc.xa_local_transaction` (``conn`` as for :func:`dtmcli.asyncio.xa_local_transaction`;
    ``dtm`` a gRPC target or :class:`AsyncDtmGrpcClient`)."""
    from ..grpc._builders import _grpc_branch_info

    return await _xa._local_transaction(
        _grpc_branch_info(context), conn, busi, dtm, table, dialect, as_async_grpc_client
    )


async def xa_handle_phase2(
    context: Any, conn: Any, *, table: str = DEFAULT_TABLE, dialect: Optional[str] = None
) -> None:
    """Handle DTM's phase-2 gRPC call of an XA branch, awaited (see :func:`dtmcli.grpc.xa_handle_phase2`;
    ``conn`` as for :func:`dtmcli.asyncio.xa_local_transaction`)."""
    from ..grpc._builders import _grpc_branch_info

    await _xa.xa_handle_phase2(_grpc_branch_info(context), conn, table=table, dialect=dialect)
