"""``DtmGrpcClient``: DTM's gRPC API (``dtmgimp.Dtm``, port 36790) behind the calls the shared flows make.

The flows of :mod:`dtmcli` (submit and its wait_result settlement, never-resubmit rules, retries of
idempotent calls within one deadline, TCC/XA/msg decisions) name DTM calls by their HTTP path and
body. This client turns each into its gRPC method and protobuf message (``DtmRequest`` with
``BinPayloads`` and ``Steps`` as JSON text, ``DtmBranchRequest``), and reads gRPC status codes as DTM
means them: Aborted is FAILURE, FailedPrecondition ONGOING (protocol.md §11).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from .._consts import ABORTING, FAILED, PREPARED, SUCCEED
from .._flow import Effect, Flow, run
from .._models import Transaction
from .._retry import Retry
from .._transport import check_timeout
from ..client import DEFAULT_RETRY, DEFAULT_TIMEOUT, ClientBase, DtmClient, ServerPool, _redact
from ..errors import DtmFailure, DtmInProgress, DtmInvalidInput, DtmOngoing, DtmServerError, DtmTimeout
from ._io import DtmCall, GrpcChannels
from ._proto import dtmgimp_pb2 as pb
from ._wire import DTM_METHODS, check_grpc_target, dtm_branch_request, dtm_request

__all__ = ["DtmGrpcClient", "GrpcClientCore", "as_grpc_client", "body_of"]

MAX_SHARED_CLIENTS = 64


def body_of(message: Union[pb.DtmRequest, pb.DtmBranchRequest]) -> dict[str, Any]:
    """The body mapping (protocol.md §1/§3 keys) of a DtmRequest or DtmBranchRequest, which the
    client turns back into the same message."""
    import json

    if isinstance(message, pb.DtmBranchRequest):
        body: dict[str, Any] = dict(message.Data)
        body.update(gid=message.Gid, trans_type=message.TransType, branch_id=message.BranchID)
        if message.Op:
            body["op"] = message.Op
        if message.BusiPayload:
            body["busi_payload"] = message.BusiPayload
        return body
    body = {"gid": message.Gid, "trans_type": message.TransType}
    opts = message.TransOptions
    for key, value in (
        ("wait_result", opts.WaitResult), ("timeout_to_fail", opts.TimeoutToFail),
        ("retry_interval", opts.RetryInterval), ("request_timeout", opts.RequestTimeout),
        ("retry_limit", opts.RetryLimit), ("branch_headers", dict(opts.BranchHeaders)),
        ("custom_data", message.CustomedData), ("payloads", list(message.BinPayloads)),
        ("query_prepared", message.QueryPrepared), ("req_extra", dict(message.ReqExtra)),
        ("rollback_reason", message.RollbackReason),
    ):
        if value:
            body[key] = value
    if message.Steps and message.Steps != "null":
        body["steps"] = json.loads(message.Steps)
    return body


class GrpcClientCore(ClientBase):
    """What the sync and asyncio gRPC clients share: the target, deadline and retry policy, the optional
    HTTP client for queries, and the encoding of the shared flows' calls as gRPC calls.

    DTM's gRPC API has no query. ``http`` (the same server's HTTP API) makes :meth:`query` work, and
    with it the rules that check an unclear submit with a query (``wait_result`` settlement,
    ``recover``); without it those rules raise the answer as it came.
    """

    _shared: ClassVar[OrderedDict[str, Any]]
    target: str
    http: Optional[ClientBase]
    grpc_io: Any
    transport: Any  # the HTTP client's transport, which performs the Request effects of a query

    def _configure_grpc(self, target: str, timeout: Optional[float], retry: Optional[Retry], http: Any) -> None:
        self.target = check_grpc_target(target)
        self.urls = (self.target,)
        self.servers = ServerPool(self.urls)
        self.timeout = check_timeout(timeout)
        self.retry = retry if retry is not None else DEFAULT_RETRY
        self.http = http
        self.can_query = http is not None
        self.transport = getattr(http, "transport", None)

    @classmethod
    def _for_target(cls, target: str) -> Any:
        check_grpc_target(target)
        with ClientBase._shared_lock:
            client = cls._shared.get(target)
            if client is None:
                client = cls._shared[target] = cls(target)  # type: ignore[call-arg]
                client.grpc_io.shared = True  # lives for the process: close() leaves its channels open
                if len(cls._shared) > MAX_SHARED_CLIENTS:
                    # Forgotten, not closed: a thread may be using it; its channels close when it is freed.
                    cls._shared.popitem(last=False)
            else:
                cls._shared.move_to_end(target)
        return client

    @classmethod
    def _forget_target(cls, target: Optional[str]) -> list[Any]:
        with ClientBase._shared_lock:
            keys = list(cls._shared) if target is None else [target]
            return [cls._shared.pop(k) for k in keys if k in cls._shared]

    @property
    def url(self) -> str:
        """The DTM gRPC target (``host:port``); what branches receive as ``dtm-dtm`` for nesting."""
        return self.target

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    # -- the hooks of ClientBase._call_flow ------------------------------------------------------

    def _encode_body(self, path: str, body: Optional[Mapping[str, Any]]) -> Any:
        if path not in DTM_METHODS:
            raise DtmInvalidInput(f"DTM's gRPC API has no {path} (use the HTTP API)")
        if body is None:
            return empty_pb2.Empty()
        try:
            return dtm_branch_request(body) if path == "registerBranch" else dtm_request(body)
        except DtmInvalidInput:
            raise
        except (TypeError, ValueError) as exc:  # a field of the wrong type for its protobuf field
            raise DtmInvalidInput(f"{path}: {exc}", gid=body.get("gid")) from None

    def _log_body(self, body: Mapping[str, Any]) -> str:
        return repr(dict(_redact(body)))

    def _dtm_effect(
        self, method: str, base: str, path: str, params: Optional[Mapping[str, str]], data: Any,
        timeout: Optional[float],
    ) -> Effect:
        return DtmCall(DTM_METHODS[path], data, timeout)

    def _query_flow(self, gid: str) -> Flow[Optional[Transaction]]:
        if self.http is None:
            raise DtmInvalidInput(
                "DTM's gRPC API has no query: give the gRPC client http=<the DTM server's HTTP URL or client>",
                gid=gid,
            )
        return (yield from self.http._query_flow(gid))

    def _call_body(self, path: str, body: Union[Mapping[str, Any], Message]) -> Flow[None]:
        if isinstance(body, Message):
            body = body_of(_own_message(path, body))
        if not isinstance(body, Mapping):
            raise DtmInvalidInput(f"{path}: body must be a mapping or a DtmRequest, not {type(body).__name__}")
        if path in ("prepare", "submit") and body.get("wait_result"):
            if not self.can_query:
                raise DtmInvalidInput(
                    f"{path}: wait_result over gRPC needs a client with http=<the DTM server's HTTP URL>: with "
                    "wait_result DTM answers Aborted whenever the transaction has not succeeded after one pass, "
                    "failed or not, and only a query can tell (DTM's gRPC API has none)", gid=body.get("gid"),
                )
            if path == "submit":
                yield from self._settled_submit_flow(body)
                return
        yield from self._post_flow(path, body, idempotent=path == "prepare")

    def _settled_submit_flow(self, body: Mapping[str, Any]) -> Flow[None]:
        """A raw wait_result submit, its unclear answer settled with a query as the builders do: DTM's
        Aborted only says "not succeeded after one pass" (protocol.md §6). Never resubmits."""
        try:
            yield from self._post_flow("submit", body)
        except (DtmFailure, DtmOngoing, DtmServerError, DtmTimeout) as exc:
            if isinstance(exc, DtmServerError) and exc.status < 500:
                raise
            gid = str(body.get("gid", ""))
            trans = yield from self._query_flow(gid)
            if trans is None or trans.status == PREPARED:
                raise
            if trans.status in (FAILED, ABORTING):
                raise DtmFailure(trans.rollback_reason or str(exc), gid=gid) from exc
            if trans.status != SUCCEED:
                raise DtmInProgress(
                    f"{body.get('trans_type')} {gid} is still {trans.status}; DTM keeps processing it, do not "
                    "submit again", status=trans.status, gid=gid,
                ) from exc


def _own_message(path: str, message: Message) -> Union[pb.DtmRequest, pb.DtmBranchRequest]:
    """``message`` as dtmcli's own DtmRequest / DtmBranchRequest: an app's class generated from DTM's
    ``dtmgimp.proto`` (same message, another Python class) is re-read from its bytes."""
    want: Union[type[pb.DtmRequest], type[pb.DtmBranchRequest]] = (
        pb.DtmBranchRequest if path == "registerBranch" else pb.DtmRequest
    )
    if isinstance(message, want):
        return message
    name = message.DESCRIPTOR.full_name
    if name == "dtmgimp." + want.__name__:
        return want.FromString(message.SerializeToString())
    raise DtmInvalidInput(
        f"{path}: body must be a mapping or a {want.__name__} (dtmcli.grpc._proto.dtmgimp_pb2, or DTM's "
        f"dtmgimp.{want.__name__}), not {name}"
    )


def _http_client(http: Any) -> Optional[DtmClient]:
    if http is None or isinstance(http, DtmClient):
        return http
    if isinstance(http, (str, list, tuple)):
        return DtmClient.for_url(http)
    raise DtmInvalidInput(f"http must be a DTM HTTP URL or a DtmClient, not {type(http).__name__}")


class DtmGrpcClient(GrpcClientCore):
    """A DTM server's gRPC API (``host:port``, default port 36790); thread-safe.

    ``timeout`` (seconds, default 10) is the deadline of each call, retries included; ``retry`` the
    policy for idempotent calls (newGid, prepare) after a transport error. ``channel`` is your own
    ``grpc.Channel`` to DTM (kept open by :meth:`close`); otherwise one is opened with
    ``credentials`` (plaintext when ``None``). Branch calls the client makes itself (TCC try, XA
    action, msg query_prepared) use one channel per branch address, with ``branch_credentials``.
    ``http`` is the same server's HTTP API (URL or :class:`~dtmcli.DtmClient`) for :meth:`query`,
    which DTM's gRPC API lacks.

    The builders of :mod:`dtmcli.grpc` take a client or a target string (the shared client of that
    target, :meth:`for_target`).
    """

    _shared: ClassVar[OrderedDict[str, DtmGrpcClient]]
    http: Optional[DtmClient]
    grpc_io: GrpcChannels

    def __init__(
        self,
        target: str,
        *,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        retry: Optional[Retry] = None,
        channel: Optional[grpc.Channel] = None,
        credentials: Optional[grpc.ChannelCredentials] = None,
        branch_credentials: Optional[grpc.ChannelCredentials] = None,
        options: Sequence[tuple[str, Any]] = (),
        http: Union[str, Sequence[str], DtmClient, None] = None,
    ) -> None:
        self._configure_grpc(target, timeout, retry, _http_client(http))
        self.grpc_io = GrpcChannels(
            self.target, channel, credentials=credentials, branch_credentials=branch_credentials, options=options
        )

    @classmethod
    def for_target(cls, target: str) -> DtmGrpcClient:
        """The shared client of ``target`` (created on first use, plaintext, default options)."""
        client: DtmGrpcClient = cls._for_target(target)
        return client

    @classmethod
    def close_shared(cls, target: Optional[str] = None) -> None:
        """Close and forget the shared client of ``target`` (every shared client when ``None``), at
        shutdown: calls still in flight on it fail, and it refuses further calls (``for_target`` then
        makes a new one)."""
        for client in cls._forget_target(target):
            client.grpc_io.shutdown()

    def __enter__(self) -> DtmGrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channels the client opened; a closed client refuses further calls. A no-op for the
        shared client of a target (:meth:`for_target`): it lives for the process, other threads may have
        calls in flight on it (:meth:`close_shared` closes it at shutdown)."""
        self.grpc_io.close()

    def new_gid(self) -> str:
        """A new gid from DTM (``NewGid``)."""
        return run(self._new_gid_flow(), self)

    def prepare(self, body: Union[Mapping[str, Any], pb.DtmRequest]) -> None:
        """``Prepare`` (idempotent on DTM: retried after a transport error within the deadline)."""
        run(self._call_body("prepare", body), self)

    def submit(self, body: Union[Mapping[str, Any], pb.DtmRequest]) -> None:
        """``Submit``; never retried (a second submit is not idempotent on DTM)."""
        run(self._call_body("submit", body), self)

    def abort(self, body: Union[Mapping[str, Any], pb.DtmRequest]) -> None:
        """``Abort``."""
        run(self._call_body("abort", body), self)

    def register_branch(self, body: Union[Mapping[str, Any], pb.DtmBranchRequest]) -> None:
        """``RegisterBranch``: ``gid``, ``trans_type``, ``branch_id``, ``op``, ``busi_payload`` (bytes),
        and the string fields that go to ``Data`` (``confirm``/``cancel``, ``url``, ...)."""
        run(self._call_body("registerBranch", body), self)

    def query(self, gid: str) -> Optional[Transaction]:
        """The stored transaction, through the HTTP API given as ``http`` (DTM's gRPC API has no query);
        DtmInvalidInput without it."""
        return run(self._query_flow(gid), self)

    def query_status(self, gid: str) -> Optional[str]:
        """Just the status of ``gid`` (see :meth:`query`)."""
        return run(self._query_status_flow(gid), self)


DtmGrpcLike = Union[str, DtmGrpcClient]


def as_grpc_client(dtm: Any) -> DtmGrpcClient:
    """A DtmGrpcClient from a target string (the shared client of it) or a client."""
    if isinstance(dtm, DtmGrpcClient):
        return dtm
    if isinstance(dtm, str):
        return DtmGrpcClient.for_target(dtm)
    hint = " (an HTTP client cannot speak gRPC)" if isinstance(dtm, ClientBase) else ""
    raise DtmInvalidInput(
        f"dtm must be a DTM gRPC target host:port or a DtmGrpcClient, not {dtm!r}{hint}"
    )
