"""Branch side of gRPC: answer DTM's calls to gRPC branch services (grpcio, sync and ``grpc.aio``).

DTM calls a gRPC branch with the stored payload bytes as the request, the call's identity in the
metadata ``dtm-gid``, ``dtm-trans_type``, ``dtm-branch_id``, ``dtm-op`` (plus ``dtm-dtm`` and
``dtm-phase2_url`` on client-made calls) and reads only the status code: OK is success,
``ABORTED`` is FAILURE, ``FAILED_PRECONDITION`` is ONGOING, anything else is retried with backoff
(protocol.md §4, §11).

Install the interceptor on the server::

    server = grpc.server(pool, interceptors=[DtmServerInterceptor()])          # grpcio
    server = grpc.aio.server(interceptors=[AsyncDtmServerInterceptor()])       # grpc.aio

For each call that carries ``dtm-gid`` it parses a :class:`GrpcBranchInfo` (malformed:
``INVALID_ARGUMENT``, the handler is not called), makes it :func:`~dtmcli.branch.current_branch_info`
while the handler runs (with an OpenTelemetry SERVER span when tracing is on) and maps what the
handler does, with the same rules as the HTTP integrations (:func:`dtmcli.branch.error_response`):

* returns a message (or raw ``bytes`` for a handler registered without serialisers): sent as is;
  ``None`` or ``{"dtm_result": "SUCCESS"}``: an empty reply (any proto3 message decodes from it);
* raises :class:`~dtmcli.errors.DtmFailure` → ``ABORTED`` (only where FAILURE is allowed: a saga
  action, tcc try, xa action, msg query_prepared; elsewhere DTM would retry it forever, so it is
  logged and answered ``INTERNAL``); :class:`~dtmcli.errors.DtmOngoing` → ``FAILED_PRECONDITION``;
  :class:`~dtmcli.errors.DtmDuplicated` → OK; any other exception → ``INTERNAL`` (retried);
* calls ``context.abort(...)`` itself: that status is kept. A ``grpc.RpcError`` escaping from a
  downstream call is an error (``INTERNAL``, retried) whatever its code: raise DtmFailure yourself
  when it means the branch failed (calls made with dtmcli already raise its typed errors).

Calls without ``dtm-gid`` (other services on the same server) pass through untouched. The barrier
decorator (``@barrier(db=...)``) works on servicer methods ``method(self, request, context, tx)``
under this interceptor; :meth:`BranchBarrier.from_grpc(context) <dtmcli.barrier.BranchBarrier.from_grpc>`
builds a barrier by hand.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence

import grpc
import grpc.aio

from .. import _otel
from ..branch import BranchInfo, error_response, handling, raise_for_result
from ..errors import BranchRequestError, DtmInvalidInput
from ._wire import check_grpc_target, check_grpc_url

__all__ = [
    "AsyncDtmServerInterceptor",
    "DtmServerInterceptor",
    "GrpcBranchInfo",
    "ENV_VAR",
    "branch_info_from_grpc",
    "dtm_metadata",
    "set_grpc_dtm_servers",
]

logger = logging.getLogger("dtmcli")

PREFIX = "dtm-"
"""The prefix of DTM's metadata keys (gRPC keys are lower-case on the wire)."""
ENV_VAR = "DTMCLI_GRPC_SERVER"
"""Comma-separated trusted DTM gRPC targets (``host:port``), when :func:`set_grpc_dtm_servers` was not called."""

_FIELDS = ("gid", "trans_type", "branch_id", "op")
_STATUS = {
    200: grpc.StatusCode.OK,
    400: grpc.StatusCode.INVALID_ARGUMENT,
    409: grpc.StatusCode.ABORTED,
    425: grpc.StatusCode.FAILED_PRECONDITION,
}

# -- metadata and BranchInfo --------------------------------------------------------------------


def _pairs(source: Any) -> Any:
    """The metadata pairs of a servicer context, ``HandlerCallDetails`` or the metadata itself."""
    if hasattr(source, "invocation_metadata"):
        source = source.invocation_metadata
        if callable(source):
            source = source()
    return source or ()


def dtm_metadata(source: Any) -> dict[str, str]:
    """The ``dtm-*`` entries of a call's metadata, without the prefix (``{"gid": ..., "op": ...}``).

    ``source`` is a servicer context (sync or ``grpc.aio``), ``HandlerCallDetails`` or the metadata
    itself (pairs). A key given twice raises :class:`BranchRequestError`, as a repeated query
    parameter does over HTTP; binary (``-bin``) entries are ignored.
    """
    out: dict[str, str] = {}
    for item in _pairs(source):
        key, value = item[0], item[1]
        key = key.lower()
        if not key.startswith(PREFIX) or key.endswith("-bin"):
            continue
        name = key[len(PREFIX) :]
        if name in out:
            raise BranchRequestError(f"metadata {key!r} is given more than once")
        out[name] = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return out


def _check_target(value: str, what: str, *, path: bool, where: Mapping[str, str]) -> None:
    """A gRPC target (``host:port``) or, with ``path``, a gRPC URL (``host:port/package.Service/Method``)."""
    try:
        if path:
            check_grpc_url(value, what)
        else:
            check_grpc_target(value, what)
    except DtmInvalidInput as exc:
        raise BranchRequestError(f"{exc.message} (in the call's metadata)", **where) from None


_lock = threading.Lock()
_trusted: Optional[frozenset[str]] = None
_warned = False


def set_grpc_dtm_servers(*targets: str) -> None:
    """Trust only these DTM gRPC targets (``host:port``) in a call's ``dtm-dtm`` metadata.

    The gRPC twin of :func:`dtmcli.set_dtm_servers` (which holds HTTP URLs): a nested TCC or an XA
    registration calls the address the caller sent, so configure the servers once at start-up
    (or ``DTMCLI_GRPC_SERVER``, comma-separated). No argument clears the configuration.
    """
    global _trusted
    for target in targets:
        check_grpc_target(target.strip() if isinstance(target, str) else target, "trusted DTM gRPC target")
    with _lock:
        _trusted = frozenset(t.strip().lower() for t in targets) if targets else None


def _is_trusted(target: str) -> bool:
    global _warned
    with _lock:
        trusted = _trusted
    if trusted is None:
        env = [t.strip().lower() for t in os.environ.get(ENV_VAR, "").split(",") if t.strip()]
        trusted = frozenset(env) if env else None
    if trusted is None:
        with _lock:
            first, _warned = not _warned, True
        if first:
            logger.warning(
                "using the DTM gRPC address sent in a call's dtm-dtm metadata (%s) without checking it: configure "
                "the trusted servers with dtmcli.grpc.server.set_grpc_dtm_servers(...) or %s",
                target,
                ENV_VAR,
            )
        return True
    return target.lower() in trusted


@dataclass(frozen=True)
class GrpcBranchInfo(BranchInfo):
    """A :class:`~dtmcli.branch.BranchInfo` read from gRPC metadata.

    ``dtm`` is the DTM gRPC target (``host:port``) and ``phase2_url`` a gRPC URL, not HTTP URLs.
    """

    def _validate(self) -> None:
        BranchInfo(self.gid, self.trans_type, self.branch_id, self.op)  # the common checks
        where = self._where()
        if self.dtm is not None:
            _check_target(self.dtm, "dtm-dtm", path=False, where=where)
        if self.phase2_url is not None:
            _check_target(self.phase2_url, "dtm-phase2_url", path=True, where=where)

    @classmethod
    def from_metadata(cls, source: Any) -> GrpcBranchInfo:
        """Parse and validate the ``dtm-*`` metadata of ``source`` (see :func:`dtm_metadata`).

        Raises :class:`BranchRequestError` when one of ``dtm-gid``, ``dtm-trans_type``,
        ``dtm-branch_id``, ``dtm-op`` is missing or malformed. An empty ``dtm-dtm`` (DTM's own
        callbacks) counts as absent. With tracing on, ``traceparent``/``tracestate`` are kept.
        """
        values = dtm_metadata(source)
        missing = [f"dtm-{k}" for k in _FIELDS if not values.get(k)]
        if missing:
            raise BranchRequestError(
                f"not a DTM branch call: {', '.join(missing)} missing from the metadata", gid=values.get("gid") or None
            )
        info = cls(
            gid=values["gid"],
            trans_type=values["trans_type"],
            branch_id=values["branch_id"],
            op=values["op"],
            dtm=values.get("dtm") or None,
            phase2_url=values.get("phase2_url") or None,
        )
        if _otel.enabled():
            trace = _trace_metadata(source)
            if trace:
                object.__setattr__(info, "trace_context", trace)
        return info

    def require_dtm(self) -> str:
        """The DTM gRPC target of a client-made call (``dtm-dtm``), checked against the trusted targets.

        Raises BranchRequestError when absent (DTM's own callbacks) or not trusted
        (:func:`set_grpc_dtm_servers`).
        """
        if not self.dtm:
            raise BranchRequestError(
                "this call has no dtm-dtm metadata: only client-originated calls (tcc try, xa action) carry it",
                **self._where(),
            )
        if not _is_trusted(self.dtm):
            raise BranchRequestError(
                f"dtm-dtm {self.dtm[:80]!r} is not a trusted DTM gRPC server (see set_grpc_dtm_servers)",
                **self._where(),
            )
        return self.dtm


def _trace_metadata(source: Any) -> dict[str, str]:
    return {k: v for k, v in _pairs(source) if k in _otel.TRACE_HEADERS and isinstance(v, str)}


def branch_info_from_grpc(context: Any) -> GrpcBranchInfo:
    """The branch call being served: the interceptor's, or parsed from ``context``'s metadata."""
    current = _SERVING.get()
    if current is not None and current[0] is context:
        return current[1]
    return GrpcBranchInfo.from_metadata(context)


# -- outcome mapping (shared by the sync and asyncio interceptors) ------------------------------------

# (context, info) of the call the interceptor is serving in this thread or task.
_SERVING: ContextVar[Optional[tuple[Any, GrpcBranchInfo]]] = ContextVar("dtmcli_grpc_serving", default=None)


def _error_status(exc: BaseException, info: Optional[BranchInfo]) -> tuple[grpc.StatusCode, str]:
    """The status for a handler's exception: the HTTP integrations' rules, in gRPC codes.

    Only dtmcli's typed outcomes are FAILURE or ONGOING. A raw ``grpc.RpcError`` escaping from a
    downstream call is an error (``INTERNAL``, retried), whatever its code: many services answer
    ABORTED for "conflict, try again", which must not compensate a saga. Catch it and raise
    DtmFailure when it really means the branch failed.
    """
    if isinstance(exc, grpc.RpcError) and callable(getattr(exc, "code", None)):
        code, details = exc.code(), exc.details() if callable(getattr(exc, "details", None)) else ""
        logger.warning("branch %s: a downstream gRPC call failed (%s %s); answering INTERNAL (DTM retries)",
                       info, getattr(code, "name", code), details)
        return grpc.StatusCode.INTERNAL, f"a downstream gRPC call failed: {getattr(code, 'name', code)} {details}"
    answer = error_response(exc, info)
    message = str(answer.body.get("message", ""))
    return _STATUS.get(answer.status, grpc.StatusCode.INTERNAL), message


def _success_value(value: Any) -> Any:
    """A handler's return value as the reply: a returned ``dtm_result`` mapping means what it says."""
    if isinstance(value, Mapping):
        raise_for_result(value)  # FAILURE / ONGOING raise; SUCCESS is an empty reply
        return None
    return value


def _record(code: grpc.StatusCode) -> None:
    if _otel.enabled():
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        span = trace.get_current_span()
        span.set_attribute("rpc.grpc.status_code", int(code.value[0]))
        if code not in (grpc.StatusCode.OK, grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION):
            span.set_status(Status(StatusCode.ERROR, f"gRPC {code.name}"))


def _serializer(inner: Optional[Callable[[Any], bytes]]) -> Callable[[Any], bytes]:
    """The handler's serializer, with ``None`` (an empty reply) encoded as no bytes."""

    def serialize(value: Any) -> bytes:
        if value is None:
            return b""
        return inner(value) if inner is not None else bytes(value)

    return serialize


_OK = (grpc.StatusCode.OK, "")


def _has_dtm_gid(details: grpc.HandlerCallDetails) -> bool:
    return any(item[0] == PREFIX + "gid" for item in (details.invocation_metadata or ()))


def _status_set(code: Any) -> bool:
    """Whether ``context.code()`` says a status was set: grpc.aio before 1.60 gives the int 0 for none."""
    if code is None:
        return False
    if isinstance(code, grpc.StatusCode):
        return code != grpc.StatusCode.OK
    return isinstance(code, int) and code != 0


def _aborted_by_handler(exc: BaseException, context: Any) -> bool:
    """The handler chose its own status (``context.abort``, or ``set_code`` then raise): keep it."""
    if isinstance(exc, grpc.aio.AbortError):
        return True
    try:
        code = context.code()
    except Exception:  # an older grpcio without code(): nothing to keep
        return False
    return _status_set(code)


def _answer(
    context: Any, info: GrpcBranchInfo, value: Any, exc: Optional[Exception]
) -> tuple[Any, grpc.StatusCode, str]:
    """The reply, status and message for what the handler did (returned ``value`` or raised ``exc``);
    re-raises an exception whose status the handler set itself."""
    if exc is None:
        try:
            return _success_value(value), grpc.StatusCode.OK, ""
        except Exception as err:  # a returned {"dtm_result": "FAILURE"} ...
            exc = err
    if _aborted_by_handler(exc, context):
        raise exc
    code, message = _error_status(exc, info)
    return None, code, message


def _wrap_sync(behavior: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def serve(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            info = GrpcBranchInfo.from_metadata(context)
        except BranchRequestError as exc:
            context.abort(*_error_status(exc, None))
        token = _SERVING.set((context, info))
        try:
            with handling(info):
                try:
                    value, error = behavior(request, context), None
                except Exception as exc:
                    value, error = None, exc
                value, code, message = _answer(context, info, value, error)
                _record(code)
        finally:
            _SERVING.reset(token)
        if code != grpc.StatusCode.OK:
            context.abort(code, message)
        return value

    return serve


def _wrap_async(behavior: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Awaitable[Any]]:
    async def serve(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            info = GrpcBranchInfo.from_metadata(context)
        except BranchRequestError as exc:
            await context.abort(*_error_status(exc, None))
        token = _SERVING.set((context, info))
        try:
            with handling(info):
                try:
                    value, error = await behavior(request, context), None
                except Exception as exc:
                    value, error = None, exc
                value, code, message = _answer(context, info, value, error)
                _record(code)
        finally:
            _SERVING.reset(token)
        if code != grpc.StatusCode.OK:
            await context.abort(code, message)
        return value

    return serve


def _wrapped(handler: Optional[grpc.RpcMethodHandler[Any, Any]]) -> Optional[grpc.RpcMethodHandler[Any, Any]]:
    """A unary-unary handler wrapped for DTM; other handlers (streams, unknown methods) unchanged."""
    if handler is None or handler.request_streaming or handler.response_streaming or handler.unary_unary is None:
        return handler
    behavior = handler.unary_unary
    serve = _wrap_async(behavior) if inspect.iscoroutinefunction(behavior) else _wrap_sync(behavior)
    return grpc.unary_unary_rpc_method_handler(
        serve,
        request_deserializer=handler.request_deserializer,
        response_serializer=_serializer(handler.response_serializer),
    )


class DtmServerInterceptor(grpc.ServerInterceptor):
    """grpcio server interceptor answering DTM's branch calls (see the module docs)."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Optional[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler[Any, Any]]:
        """Wrap the method handler of a call that carries ``dtm-gid``; leave any other call alone."""
        handler = continuation(handler_call_details)
        return _wrapped(handler) if _has_dtm_gid(handler_call_details) else handler


class AsyncDtmServerInterceptor(grpc.aio.ServerInterceptor):
    """``grpc.aio`` server interceptor answering DTM's branch calls; ``async def`` and plain handlers."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Optional[grpc.RpcMethodHandler[Any, Any]]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler[Any, Any]]:
        """Wrap the method handler of a call that carries ``dtm-gid``; leave any other call alone."""
        handler = await continuation(handler_call_details)
        if not _has_dtm_gid(handler_call_details):
            return handler
        return _wrapped(handler)


# -- the barrier decorator's hook --------------------------------------------------------------------


def _is_context(value: Any) -> bool:
    # grpc.aio's context is a Cython class that is not registered as a grpc.aio.ServicerContext: duck-type it.
    return isinstance(value, grpc.ServicerContext) or all(
        callable(getattr(value, name, None)) for name in ("invocation_metadata", "abort", "set_code", "time_remaining")
    )


def call_info(args: Sequence[Any]) -> Optional[GrpcBranchInfo]:
    """For ``@barrier`` on a servicer method: the call's info when ``args`` hold a gRPC context, else None.

    Raises :class:`DtmInvalidInput` when the server has no DTM interceptor: the handler could not
    answer a skipped call (duplicate, null compensation) with an empty reply without it.
    """
    current = _SERVING.get()
    if current is not None and any(a is current[0] for a in args):
        return current[1]
    if any(_is_context(a) for a in args):
        raise DtmInvalidInput(
            "@barrier on a gRPC handler needs the server interceptor: grpc.server(..., "
            "interceptors=[dtmcli.grpc.server.DtmServerInterceptor()]) (AsyncDtmServerInterceptor for grpc.aio)"
        )
    return None
