"""The gRPC effects the shared flows yield, and the blocking channels that perform them.

A flow of :mod:`dtmcli._flow` asks for a call to DTM with :class:`DtmCall` and for a call to a branch
with :class:`BranchCall`. The driver's ``io`` (a gRPC client) performs them through its ``grpc_io``:
:class:`GrpcChannels` with blocking calls, the asyncio twin in :mod:`dtmcli.asyncio.grpc` awaiting
``grpc.aio``. Both read answers with the same pure rules (:mod:`dtmcli.grpc._wire`).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence

import grpc
from google.protobuf.message import Message

from .._flow import Effect
from .._protocol import Response
from ..errors import DtmError, DtmInvalidInput
from ._proto import METHODS, method_path
from ._wire import never_connected, rpc_error, split_grpc_url, success_response

__all__ = [
    "BranchCall", "ChannelsBase", "DtmCall", "GrpcChannels", "channel_options", "identity", "serialize",
    "sync_channel_ready", "translate_rpc_error",
]

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


_READY = grpc.ChannelConnectivity.READY.value[0]


def sync_channel_ready(channel: Any) -> Optional[bool]:
    """Whether a blocking channel is connected right now (``None``: cannot tell, e.g. an intercepted channel)."""
    check = getattr(getattr(channel, "_channel", None), "check_connectivity_state", None)
    if check is None:
        return None
    try:
        return bool(check(False) == _READY)
    except Exception:  # a closed channel, an unexpected grpcio: unsure
        return None


def translate_rpc_error(
    exc: BaseException,
    where: str,
    call: Optional[BranchCall] = None,
    channel_ready: Callable[[], Optional[bool]] = lambda: None,
) -> DtmError:
    """The typed error for an exception of a grpc call.

    A ``grpc.RpcError`` is read by :func:`~dtmcli.grpc._wire.rpc_error`; an UNAVAILABLE counts as
    "nothing sent" only when grpc core says it could not connect and ``channel_ready()`` confirms the
    channel is not connected. Anything else grpcio raises instead of sending (a closed channel, metadata
    it refuses) is DtmInvalidInput: nothing was sent.
    """
    gid = call.gid if call is not None else None
    if isinstance(exc, grpc.RpcError):
        code = getattr(exc, "code", None)
        details = getattr(exc, "details", None)
        status = code() if callable(code) else None
        code_name = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
        text = (details() if callable(details) else None) or ""
        not_sent = code_name == "UNAVAILABLE" and never_connected(text, channel_ready())
        if call is None:
            return rpc_error(code_name, text, where=where, not_sent=not_sent)
        return rpc_error(code_name, text, where=where, gid=gid, branch_id=call.branch_id, op=call.op, bare=True,
                         not_sent=not_sent)
    if isinstance(exc, (ValueError, TypeError)):  # a closed channel, metadata grpcio refuses: not sent
        return DtmInvalidInput(f"{where}: {type(exc).__name__}: {exc}", gid=gid)
    raise exc


class ChannelsBase:
    """What the blocking and asyncio channel sets share: target, credentials, options, closing.

    A client :meth:`closed <close>` refuses further calls, except a shared one (``reopen``, see
    ``for_target``): its channels are opened again on next use, as the HTTP clients' pools are.
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
        self.reopen = False

    def _check_open(self) -> None:
        if self._closed:
            if not self.reopen:
                raise DtmInvalidInput(f"the gRPC client of {self.target} is closed")
            self._closed = False


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
        """Call ``dtmgimp.Dtm/<method>``; a failure raises its typed error."""
        call, channel = self._dtm_call(method)
        try:
            reply = call(message, timeout=timeout)
        except Exception as exc:
            raise translate_rpc_error(exc, f"dtm {method}", None, lambda: sync_channel_ready(channel)) from None
        return success_response(reply)

    def call_branch(self, call: BranchCall) -> bytes:
        """Perform a :class:`BranchCall`; a failure raises its typed error."""
        target, method = split_grpc_url(call.url)
        channel = self._branch_channel(target)
        stub = channel.unary_unary(method, request_serializer=identity, response_deserializer=identity)
        try:
            reply: bytes = stub(call.payload, timeout=call.timeout, metadata=call.metadata)
        except Exception as exc:
            raise translate_rpc_error(exc, call.url, call, lambda: sync_channel_ready(channel)) from None
        return reply

    def close(self) -> None:
        """Close the channels this object opened (a channel passed in stays open)."""
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
