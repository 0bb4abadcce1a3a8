"""The gRPC effects the shared flows yield, and the blocking channels that perform them.

A flow of :mod:`dtmcli._flow` asks for a call to DTM with :class:`DtmCall` and for a call to a branch
with :class:`BranchCall`. The driver's ``io`` (a gRPC client) performs them through its ``grpc_io``:
:class:`GrpcChannels` with blocking calls, the asyncio twin in :mod:`dtmcli.asyncio.grpc` awaiting
``grpc.aio``. Both read answers with the same pure rules (:mod:`dtmcli.grpc._wire`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

import grpc
from google.protobuf.message import Message

from .._flow import Effect
from .._protocol import Response
from ..errors import DtmConnectError, DtmConnectTimeout, DtmError, DtmInvalidInput, DtmTransportError
from ._proto import METHODS, method_path
from ._wire import rpc_error, split_grpc_url, success_response

__all__ = [
    "BranchCall", "ChannelsBase", "DtmCall", "GrpcChannels", "channel_options", "connect_outcome", "identity",
    "serialize", "sync_channel_state", "sync_connect", "translate_rpc_error",
]

logger = logging.getLogger("dtmcli")

Metadata = tuple[tuple[str, str], ...]


def serialize(message: Message) -> bytes:
    """Deterministic protobuf bytes of a request (its map entries sorted), so equal requests are equal
    on the wire; payloads inside it (``BinPayloads``) are the bytes the caller's messages gave."""
    return message.SerializeToString(deterministic=True)


def identity(data: bytes) -> bytes:
    """Bytes as they are (the (de)serialiser of raw-bytes calls)."""
    return data


class DtmCall(Effect):
    """One call of ``dtmgimp.Dtm`` (``method`` e.g. ``Submit``); returns the Response the flows read."""

    __slots__ = ("message", "method", "timeout")

    def __init__(self, method: str, message: Message, timeout: Optional[float]) -> None:
        self.method, self.message, self.timeout = method, message, timeout

    def run(self, io: Any) -> Response:
        return io.grpc_io.call_dtm(self.method, self.message, self.timeout)  # type: ignore[no-any-return]

    async def arun(self, io: Any) -> Response:
        return await io.grpc_io.call_dtm(self.method, self.message, self.timeout)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"DtmCall({self.method})"


class BranchCall(Effect):
    """A call the client makes to a gRPC branch (TCC try, XA action, msg query_prepared): the payload
    bytes as they are, with ``metadata``; returns the reply bytes or raises the typed error."""

    __slots__ = ("branch_id", "gid", "metadata", "op", "payload", "timeout", "url")

    def __init__(
        self, url: str, payload: bytes, metadata: Metadata, timeout: Optional[float], gid: str, branch_id: str, op: str
    ) -> None:
        self.url, self.payload, self.metadata, self.timeout = url, payload, metadata, timeout
        self.gid, self.branch_id, self.op = gid, branch_id, op

    def run(self, io: Any) -> bytes:
        return io.grpc_io.call_branch(self)  # type: ignore[no-any-return]

    async def arun(self, io: Any) -> bytes:
        return await io.grpc_io.call_branch(self)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"BranchCall({self.url} {self.op} branch_id={self.branch_id})"


def channel_options(options: Sequence[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """``options`` for a channel the SDK opens, with grpc-core's own retries off.

    A retry policy (``grpc.service_config``'s ``retryPolicy``, often a company-wide default) would make
    grpc-core resend a Submit below dtmcli's never-resubmit rule, so ``("grpc.enable_retries", 0)``
    is always added last (it wins) and asking for retries is refused.
    """
    out = tuple(options)
    for item in out:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise DtmInvalidInput(f"gRPC channel options are (name, value) pairs, not {item!r}")
        if item[0] == "grpc.enable_retries" and item[1]:
            raise DtmInvalidInput(
                "grpc.enable_retries cannot be on for a DTM client: grpc-core would resend a Submit, which DTM "
                "does not treat idempotently (dtmcli retries only what is safe to retry)"
            )
    return (*out, ("grpc.enable_retries", 0))


_STATES = {c.value[0]: c for c in grpc.ChannelConnectivity}


def sync_channel_state(channel: Any) -> Optional[grpc.ChannelConnectivity]:
    """The connectivity of a blocking channel right now, read cheaply without subscribing (also through
    ``grpc.intercept_channel`` wrappers); ``SHUTDOWN`` when closed, ``None`` when it cannot be read."""
    core = channel
    for _ in range(4):  # grpc.intercept_channel(...) wraps a grpc._channel.Channel wrapping the cygrpc one
        core = getattr(core, "_channel", None)
        check = getattr(core, "check_connectivity_state", None)
        if check is not None:
            try:
                return _STATES.get(check(False))
            except ValueError:  # grpcio: "Cannot invoke RPC: Channel closed!"
                return grpc.ChannelConnectivity.SHUTDOWN
            except Exception:  # an unexpected grpcio
                return None
    return None


def connect_outcome(
    state: Optional[grpc.ChannelConnectivity], where: str, target: str, gid: Optional[str] = None
) -> Optional[DtmError]:
    """What a channel's state means before a call is made: ``None`` to make the call (READY) or to
    keep waiting (IDLE, CONNECTING); the error otherwise, raised before anything is sent: a closed
    channel is DtmInvalidInput, a failed connection (TRANSIENT_FAILURE: what grpc's fail-fast calls
    would fail with at once) DtmConnectError."""
    if state is grpc.ChannelConnectivity.SHUTDOWN:
        return DtmInvalidInput(f"{where}: the gRPC channel to {target} is closed", gid=gid)
    if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
        return DtmConnectError(f"{where}: could not connect to {target} (channel in TRANSIENT_FAILURE)", gid=gid)
    return None


def _connect_timeout(where: str, target: str, timeout: Optional[float], gid: Optional[str]) -> DtmConnectTimeout:
    return DtmConnectTimeout(f"{where}: no connection to {target} within the {timeout} s timeout", gid=gid)


def sync_connect(
    channel: Any, timeout: Optional[float], where: str, target: str, gid: Optional[str] = None
) -> Optional[float]:
    """Wait until ``channel`` is READY, within ``timeout``; return the time left for the call.

    Called before every call, so that "nothing was sent" is a fact about the channel, never read from
    an error's text: when no connection can be made, the call is not made (DtmConnectError, or
    DtmConnectTimeout when ``timeout`` runs out first); once it is made, every failure may have
    reached the peer. A READY channel costs one cheap state read. A channel whose state cannot be read
    nor watched is called at once (its failures count as "maybe sent").
    """
    state = sync_channel_state(channel)
    if state is grpc.ChannelConnectivity.READY:
        return timeout
    err = connect_outcome(state, where, target, gid)
    if err is not None:
        raise err
    start = time.monotonic()
    changed = threading.Condition()
    seen: list[grpc.ChannelConnectivity] = []

    def on_change(new: grpc.ChannelConnectivity) -> None:
        with changed:
            seen.append(new)
            changed.notify()

    try:
        channel.subscribe(on_change, try_to_connect=True)
    except Exception:  # not a grpcio channel: cannot watch it
        return timeout
    try:
        with changed:
            while True:
                while seen:
                    state = seen.pop(0)
                    if state is grpc.ChannelConnectivity.READY:
                        return None if timeout is None else max(timeout - (time.monotonic() - start), 0.001)
                    err = connect_outcome(state, where, target, gid)
                    if err is not None:
                        raise err
                left = None if timeout is None else timeout - (time.monotonic() - start)
                if left is not None and left <= 0:
                    raise _connect_timeout(where, target, timeout, gid)
                changed.wait(left)
    finally:
        channel.unsubscribe(on_change)


def translate_rpc_error(exc: BaseException, where: str, call: Optional[BranchCall] = None) -> DtmError:
    """The typed error for an exception of a call that was made (handed to grpc).

    A ``grpc.RpcError`` is read by :func:`~dtmcli.grpc._wire.rpc_error`. Anything else (an interceptor
    of a channel you passed in failing after the call went out, a channel closed meanwhile) may have
    come after sending: DtmTransportError ("maybe sent"). "Nothing sent" is decided before the call
    (:func:`sync_connect`), never here.
    """
    gid = call.gid if call is not None else None
    if isinstance(exc, grpc.RpcError):
        code = getattr(exc, "code", None)
        details = getattr(exc, "details", None)
        status = code() if callable(code) else None
        code_name = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
        text = (details() if callable(details) else None) or ""
        if call is None:
            return rpc_error(code_name, text, where=where)
        return rpc_error(code_name, text, where=where, gid=gid, branch_id=call.branch_id, op=call.op, bare=True)
    ids: dict[str, Any] = {} if call is None else {"branch_id": call.branch_id, "op": call.op}
    return DtmTransportError(
        f"{where}: {type(exc).__name__}: {exc} (raised once the call was made: it may have been sent)", gid=gid, **ids
    )


class ChannelsBase:
    """What the blocking and asyncio channel sets share: target, credentials, options, closing.

    A client :meth:`closed <close>` refuses further calls. The channels of a shared client (``shared``,
    see ``for_target``) live as long as the process: other threads and tasks may have calls in flight
    on them, so its ``close()`` is a no-op and only ``close_shared()`` (at shutdown) closes them.
    """

    def __init__(
        self,
        target: str,
        channel: Any,
        *,
        credentials: Optional[grpc.ChannelCredentials] = None,
        branch_credentials: Optional[grpc.ChannelCredentials] = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self._given = channel
        self._credentials, self._branch_credentials = credentials, branch_credentials
        self._options = channel_options(options)
        self._lock = threading.Lock()
        self._closed = False
        self.shared = False

    def _check_open(self) -> None:
        if self._closed:
            raise DtmInvalidInput(f"the gRPC client of {self.target} is closed")


class GrpcChannels(ChannelsBase):
    """Blocking gRPC channels: one to DTM (given, or opened on first use) and one per branch address.

    ``credentials`` secure the channel to DTM (``grpc.ssl_channel_credentials()``), ``branch_credentials``
    those to branches; both are plaintext when ``None``. ``options`` are grpc channel options (grpc-core
    retries always off, see :func:`channel_options`). A ``channel`` passed in is used as is: it must not
    retry by itself either.
    """

    def __init__(
        self,
        target: str,
        channel: Optional[grpc.Channel] = None,
        *,
        credentials: Optional[grpc.ChannelCredentials] = None,
        branch_credentials: Optional[grpc.ChannelCredentials] = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        super().__init__(
            target, channel, credentials=credentials, branch_credentials=branch_credentials, options=options
        )
        self._dtm: Optional[grpc.Channel] = channel
        self._branches: dict[str, grpc.Channel] = {}
        self._calls: dict[str, Callable[..., Any]] = {}

    def _open(self, target: str, credentials: Optional[grpc.ChannelCredentials]) -> grpc.Channel:
        if credentials is not None:
            return grpc.secure_channel(target, credentials, options=self._options)
        return grpc.insecure_channel(target, options=self._options)

    def _dtm_call(self, method: str) -> tuple[Callable[..., Any], grpc.Channel]:
        with self._lock:
            self._check_open()
            if self._dtm is None:
                self._dtm = self._open(self.target, self._credentials)
            call = self._calls.get(method)
            if call is None:
                reply = METHODS[method][1]
                call = self._calls[method] = self._dtm.unary_unary(
                    method_path(method), request_serializer=serialize, response_deserializer=reply.FromString
                )
            return call, self._dtm

    def _branch_channel(self, target: str) -> grpc.Channel:
        with self._lock:
            self._check_open()
            channel = self._branches.get(target)
            if channel is None:
                channel = self._branches[target] = self._open(target, self._branch_credentials)
            return channel

    def call_dtm(self, method: str, message: Message, timeout: Optional[float]) -> Response:
        """Call ``dtmgimp.Dtm/<method>`` once the channel is READY; a failure raises its typed error."""
        where = f"dtm {method}"
        call, channel = self._dtm_call(method)
        left = sync_connect(channel, timeout, where, self.target, getattr(message, "Gid", None) or None)
        try:
            reply = call(message, timeout=left)
        except Exception as exc:
            raise translate_rpc_error(exc, where) from None
        return success_response(reply)

    def call_branch(self, call: BranchCall) -> bytes:
        """Perform a :class:`BranchCall` once the channel is READY; a failure raises its typed error."""
        target, method = split_grpc_url(call.url)
        channel = self._branch_channel(target)
        stub = channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
        left = sync_connect(channel, call.timeout, call.url, target, call.gid)
        try:
            reply: bytes = stub(call.payload, timeout=left, metadata=call.metadata)
        except Exception as exc:
            raise translate_rpc_error(exc, call.url, call) from None
        return reply

    def close(self) -> None:
        """Close the channels this object opened (a channel passed in stays open); a no-op for a shared
        client, whose channels other threads may be using (:meth:`shutdown` closes them)."""
        if self.shared:
            logger.debug("close() of the shared gRPC client of %s: kept open (close_shared() closes it)", self.target)
            return
        self.shutdown()

    def shutdown(self) -> None:
        """Close the channels this object opened, shared or not: calls in flight on them fail."""
        with self._lock:
            self._closed = True
            channels = list(self._branches.values())
            if self._given is None and self._dtm is not None:
                channels.append(self._dtm)
            self._branches.clear()
            self._calls.clear()
            self._dtm = self._given
        for channel in channels:
            channel.close()
