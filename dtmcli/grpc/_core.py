"""The gRPC builders' cores, shared by the blocking classes (:mod:`dtmcli.grpc`) and the asyncio ones
(:mod:`dtmcli.asyncio.grpc`).

Each core is the HTTP core of :mod:`dtmcli` (its flows, lifecycle and decisions) with what gRPC
changes: branch URLs are ``host:port/package.Service/Method``, payloads are protobuf bytes, and the
branch calls the client makes itself (TCC try, XA action, msg query_prepared) are gRPC calls carrying
``dtm-*`` metadata (:class:`~dtmcli.grpc._io.BranchCall`).
"""

from __future__ import annotations

from typing import Any, Optional, TypeVar, Union

from google.protobuf.message import DecodeError, Message

from .. import _otel
from .._consts import MSG_BRANCH_ID, OP_ACTION, OP_MSG, OP_TRY, TCC
from .._flow import Flow
from .._steps import StepTrans
from .._trans import TransCore
from .._twophase import TwoPhaseCore
from ..errors import DtmInvalidInput, DtmServerError
from ..msg import MsgCore
from ..saga import SagaCore
from ..tcc import TccCore
from ..xa import XaCore
from ._io import BranchCall
from ._wire import branch_metadata, check_grpc_url, encode_grpc_payload

__all__ = [
    "GrpcMsgCore", "GrpcSagaCore", "GrpcTccCore", "GrpcTransRules", "GrpcXaCore", "Reply", "branch_call_flow",
    "check_reply", "parse_reply",
]

S = TypeVar("S", bound="GrpcStepsMixin")
TC = TypeVar("TC", bound="GrpcTccCore")

Reply = Union[type[Message], Message, None]
"""What a branch call returns: a message class (parsed into a new message), a message (parsed into
it), or ``None`` (the raw reply bytes)."""


def check_reply(reply: Any, *, gid: Optional[str] = None) -> Reply:
    """``reply`` if it is a :data:`Reply`; DtmInvalidInput (before anything is sent) otherwise."""
    if reply is None or isinstance(reply, Message) or (isinstance(reply, type) and issubclass(reply, Message)):
        return reply
    raise DtmInvalidInput(f"reply must be a protobuf message class, a message or None, not {reply!r}", gid=gid)


def parse_reply(raw: bytes, reply: Reply, *, url: str = "", gid: Optional[str] = None) -> Any:
    """The reply of a branch call as asked for by ``reply`` (see :data:`Reply`); a reply that does not
    parse as that message raises DtmServerError (the branch answered something else)."""
    if reply is None:
        return raw
    try:
        if isinstance(reply, Message):
            reply.ParseFromString(raw)
            return reply
        return reply.FromString(raw)
    except DecodeError as exc:
        name = reply.DESCRIPTOR.full_name
        raise DtmServerError(f"the reply of {url} is not a {name}: {exc}", status=200,
                             body=raw[:1000].decode("latin-1"), gid=gid) from None


def branch_call_flow(
    trans: TransCore, url: str, payload: bytes, branch_id: str, op: str, phase2_url: Optional[str] = None
) -> Flow[bytes]:
    """A call the client makes to a gRPC branch of ``trans``: the ``dtm-*`` metadata (``dtm-dtm`` = the
    client's DTM target, for nesting), the branch headers, and with tracing on a client span whose
    context travels as ``traceparent`` metadata. Returns the reply bytes; raises the typed error."""
    headers = dict(trans.options.branch_headers)
    span = _otel.start(f"dtm branch {trans.trans_type} {op}", gid=trans.gid, trans_type=trans.trans_type,
                       branch_id=branch_id, op=op)
    _otel.inject(span, headers)
    metadata = branch_metadata(trans.gid, trans.trans_type, branch_id, op, trans.client.url, headers, phase2_url)
    try:
        raw: bytes = yield BranchCall(url, payload, metadata, trans.client.timeout, trans.gid, branch_id, op)
    except BaseException as exc:
        _otel.finish(span, exc)
        raise
    _otel.finish(span)
    return raw


# Branches DTM calls itself: an http(s) URL there is called over HTTP, in a gRPC transaction too.
_DTM_CALLED = frozenset({"saga action URL", "saga compensate URL", "msg action URL", "tcc confirm URL",
                         "tcc cancel URL"})


class GrpcTransRules(TransCore):
    """What gRPC changes in every transaction: branch URLs, and ``wait_result`` only with a client that
    can query (DTM's gRPC answer alone cannot tell "failed" from "not succeeded yet"). Branch headers
    are checked as gRPC metadata when the body is encoded (:func:`~dtmcli.grpc._wire.dtm_request`)."""

    def _check_url(self, url: Any, what: str, *, allow_empty: bool = False) -> str:
        return check_grpc_url(url, what, gid=self.gid, allow_empty=allow_empty, allow_http=what in _DTM_CALLED)

    def _wait_result_refusal(self) -> Optional[DtmInvalidInput]:
        if self.options.wait_result and not self.client.can_query:
            return DtmInvalidInput(
                "wait_result over gRPC needs a client with http=<the DTM server's HTTP URL>: with wait_result DTM "
                "answers Aborted whenever the transaction has not succeeded after one pass, failed or not, and only "
                "a query can tell (DTM's gRPC API has none)", gid=self.gid,
            )
        return None

    def _check_wait_result(self) -> None:
        refusal = self._wait_result_refusal()
        if refusal is not None:
            raise refusal

    def _prepare_flow(self) -> Flow[None]:
        self._check_wait_result()
        yield from super()._prepare_flow()

    def _submit_flow(self, recover: bool = False) -> Flow[None]:
        self._check_wait_result()
        yield from super()._submit_flow(recover)


class GrpcBranchCalls(GrpcTransRules, TwoPhaseCore):
    """The gRPC branch call a TCC/XA client makes itself (its try or action), as a flow."""

    def _finish_flow(self, exc: Optional[BaseException]) -> Flow[None]:
        """As TwoPhaseCore's, except that a submit refused for ``wait_result`` (set inside the body, after
        the prepare) aborts the prepared transaction at once instead of leaving it to timeout_to_fail."""
        if exc is None and self._branch_error is None:
            refusal = self._wait_result_refusal()
            if refusal is not None:
                yield from super()._finish_flow(refusal)  # the abort after a failed body
                raise refusal
        yield from super()._finish_flow(exc)

    def _grpc_branch_flow(
        self, url: str, payload: bytes, branch_id: str, op: str, reply: Reply, phase2_url: Optional[str] = None
    ) -> Flow[Any]:
        raw = yield from branch_call_flow(self, url, payload, branch_id, op, phase2_url)
        return parse_reply(raw, reply, url=url, gid=self.gid)


class GrpcStepsMixin(GrpcTransRules, StepTrans):
    """Saga and msg steps whose payloads are protobuf bytes (sent as ``BinPayloads``)."""

    def __init__(self, dtm: Any, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)
        self._bin_payloads: list[bytes] = []

    @property
    def payloads(self) -> tuple[bytes, ...]:  # type: ignore[override]
        """The proto-encoded payload of each step, in order (read-only)."""
        return tuple(self._bin_payloads)

    def _append_bin_step(self, step: dict[str, str], payload: Any) -> None:
        data = encode_grpc_payload(payload, gid=self.gid)
        with self._lock:
            self._check_mutable("add a step")
            self._steps.append(step)
            self._payloads.append("")  # the HTTP (text) form: unused, kept the same length
            self._bin_payloads.append(data)

    def _extra_body(self) -> dict[str, Any]:
        body = super()._extra_body()
        body["payloads"] = list(self._bin_payloads)
        return body


class GrpcSagaCore(GrpcStepsMixin, SagaCore):
    """A saga over gRPC: steps ``add(action, compensate, message)``; everything else is the saga's."""

    def add(self: S, action: str, compensate: str, payload: Any) -> S:
        """Append a step: gRPC URLs ``host:port/package.Service/Method`` (``compensate`` may be ``""``)
        and a protobuf message (or its bytes) DTM sends to both. An http(s) URL is called over HTTP by
        DTM, with the payload bytes as the body."""
        self._check_url(action, "saga action URL")
        self._check_url(compensate, "saga compensate URL", allow_empty=True)
        self._append_bin_step({"action": action, "compensate": compensate}, payload)
        return self


class GrpcMsgCore(GrpcStepsMixin, MsgCore):
    """A 2-phase message over gRPC: actions and ``query_prepared`` are gRPC URLs, payloads protobuf.

    DTM's gRPC API has no ``concurrent`` field, so a concurrent message is refused before anything
    is sent (use the HTTP API for it).
    """

    def _add_step(self: S, action: str, payload: Any) -> S:
        self._append_bin_step({"action": action}, payload)
        return self

    def build_body(self) -> dict[str, Any]:
        """The prepare/submit/abort body; refuses a concurrent message (no such gRPC field)."""
        if self.concurrent:
            raise DtmInvalidInput(
                "DTM's gRPC API cannot run a msg concurrently (DtmTransOptions has no concurrent); "
                "use the HTTP Msg for that", gid=self.gid,
            )
        return super().build_body()

    def _query_prepared_flow(self, query_prepared: Optional[str] = None) -> Flow[None]:
        """Call ``query_prepared`` as DTM would: an empty message, branch ``00``, op ``msg``; OK is
        success, Aborted FAILURE, FailedPrecondition ONGOING."""
        url = self._check_url(query_prepared or self.query_prepared, "query_prepared URL")
        yield from branch_call_flow(self, url, b"", MSG_BRANCH_ID, OP_MSG)


class GrpcTccCore(GrpcBranchCalls, TccCore):
    """A TCC over gRPC: ``call_branch(message, try, confirm, cancel, reply)``; nesting from the
    metadata of an incoming try call (:meth:`from_grpc`)."""

    @classmethod
    def from_grpc(cls: type[TC], context: Any, *, dtm: Optional[Any] = None) -> TC:
        """A nested TCC inside a gRPC try handler: ``context`` is the handler's servicer context (or its
        metadata). Same gid; branches ``<branch_id>01``, ``<branch_id>02``, ...

        The DTM target is the caller's ``dtm-dtm``, accepted only when trusted
        (:func:`dtmcli.grpc.server.set_grpc_dtm_servers`), unless ``dtm`` (a target or client) pins
        your own. Raises BranchRequestError unless the call is a tcc try carrying gid, branch_id and dtm.
        """
        from .server import branch_info_from_grpc  # the branch side: trusted-target check included

        return cls.from_info(branch_info_from_grpc(context), dtm=dtm)

    def _call_grpc_branch_flow(
        self, payload: Any, try_url: str, confirm_url: str, cancel_url: str, reply: Reply
    ) -> Flow[Any]:
        """Check (nothing sent on bad input), take the next branch id, register, call the try."""
        self._check_can_call()
        self._check_url(try_url, "tcc try URL")
        self._check_url(confirm_url, "tcc confirm URL", allow_empty=True)
        self._check_url(cancel_url, "tcc cancel URL", allow_empty=True)
        check_reply(reply, gid=self.gid)
        data = encode_grpc_payload(payload, gid=self.gid)
        branch_id = self._ids.next()
        flow = self._register_and_try_grpc(data, branch_id, try_url, confirm_url, cancel_url, reply)
        return self._recording(flow, branch_id, OP_TRY)

    def _register_and_try_grpc(
        self, data: bytes, branch_id: str, try_url: str, confirm_url: str, cancel_url: str, reply: Reply
    ) -> Flow[Any]:
        yield from self.client._post_flow(
            "registerBranch",
            {"gid": self.gid, "trans_type": TCC, "branch_id": branch_id, "confirm": confirm_url,
             "cancel": cancel_url, "busi_payload": data},
        )
        return (yield from self._grpc_branch_flow(try_url, data, branch_id, OP_TRY, reply))


class GrpcXaCore(GrpcBranchCalls, XaCore):
    """An XA global transaction over gRPC: ``call_branch(message, url, reply)`` calls the action with
    ``dtm-op=action`` and ``dtm-phase2_url=url``; DTM later calls the same method with an empty
    message and ``dtm-op`` commit or rollback (protocol.md §9)."""

    def _call_grpc_branch_flow(self, payload: Any, url: str, reply: Reply) -> Flow[Any]:
        self._check_can_call()
        self._check_url(url, "xa branch URL")
        check_reply(reply, gid=self.gid)
        data = encode_grpc_payload(payload, gid=self.gid)
        branch_id = self._ids.next()
        flow = self._grpc_branch_flow(url, data, branch_id, OP_ACTION, reply, phase2_url=url)
        return self._recording(flow, branch_id, OP_ACTION)
