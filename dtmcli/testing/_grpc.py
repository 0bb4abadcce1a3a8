"""The coordinator's gRPC front: service ``dtmgimp.Dtm`` (the ``grpc`` extra; branch calls: ``_grpc_branch``).

The API maps each request onto the handlers the HTTP API uses (protocol.md §11): a ``DtmRequest``
becomes the same transaction body, with ``BinPayloads`` as the (binary) payloads, ``Steps`` parsed
from its JSON text and protocol ``grpc``. Answers map as DTM's ``DtmError2GrpcError``: FAILURE
(409) → ``ABORTED``, ONGOING (425) → ``FAILED_PRECONDITION``, any other error → ``INTERNAL`` (dtmsvr
answers its panics so; the errors it returns, such as an unknown trans type at registerBranch, are ``UNKNOWN``).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import grpc
import shortuuid
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from .._consts import RESULT_FAILURE, RESULT_ONGOING
from ..grpc._proto import DTM_SERVICE, METHODS, dtmgimp_pb2
from . import _api
from ._branch_client import bin_text
from ._engine import Engine
from ._rules import ApiError, ApiResult
from ._wire import BadInput, decode_json

__all__ = ["GrpcApi"]

logger = logging.getLogger("dtmcli.testing")

# -- the API -------------------------------------------------------------------------------------------


def _trans_body(req: dtmgimp_pb2.DtmRequest) -> bytes:
    """The JSON body the HTTP API would get for ``req`` (payloads as latin-1 text of the raw bytes)."""
    steps: Any = decode_json(req.Steps.encode()) if req.Steps else None
    o = req.TransOptions
    body = {
        "gid": req.Gid,
        "trans_type": req.TransType,
        "steps": steps,
        "payloads": [bin_text(p) for p in req.BinPayloads],
        "custom_data": req.CustomedData,
        "query_prepared": req.QueryPrepared,
        "protocol": "grpc",
        "rollback_reason": req.RollbackReason,
        "req_extra": dict(req.ReqExtra),
        "wait_result": o.WaitResult,
        "timeout_to_fail": o.TimeoutToFail,
        "retry_interval": o.RetryInterval,
        "request_timeout": o.RequestTimeout,
        "retry_limit": o.RetryLimit,
        "branch_headers": dict(o.BranchHeaders),
    }
    return json.dumps(body).encode()


def _branch_body(req: dtmgimp_pb2.DtmBranchRequest) -> bytes:
    """The registerBranch JSON map for ``req``: its Data, identity, and BusiPayload as ``data``."""
    data = dict(req.Data)
    data.update(gid=req.Gid, trans_type=req.TransType, branch_id=req.BranchID, data=bin_text(req.BusiPayload))
    if req.Op:
        data.setdefault("op", req.Op)
    return json.dumps(data).encode()


def _status(result: ApiResult) -> tuple[grpc.StatusCode, str]:
    status, body = result
    message = str(body.get("message", ""))
    if status == 200:
        return grpc.StatusCode.OK, ""
    if status == 409 or body.get("dtm_result") == RESULT_FAILURE:
        return grpc.StatusCode.ABORTED, message
    if status == 425 or body.get("dtm_result") == RESULT_ONGOING:
        return grpc.StatusCode.FAILED_PRECONDITION, message
    if message.startswith("unknow trans type"):
        return grpc.StatusCode.UNKNOWN, message  # an error dtmsvr returns (DtmError2GrpcError)
    return grpc.StatusCode.INTERNAL, message  # dtmsvr raises the rest as panics, which grpcRecover answers INTERNAL


class GrpcApi:
    """A grpcio server answering ``dtmgimp.Dtm`` from an engine (unstarted; :meth:`start` binds)."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0, workers: int = 16) -> None:
        self.engine = engine
        # No SO_REUSEPORT (grpcio's default on Linux): a second coordinator on a taken port must fail, not share it.
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="dtm-grpc")
        self._server = grpc.server(self._pool, options=[("grpc.so_reuseport", 0)])
        api: dict[str, Callable[[Any, grpc.ServicerContext], Message]] = {
            "NewGid": lambda req, ctx: dtmgimp_pb2.DtmGidReply(Gid=str(shortuuid.uuid())),
            "Prepare": self._trans(_api.prepare, binary=True),
            "Submit": self._trans(_api.submit, binary=True),
            "Abort": self._trans(_api.abort),
            "RegisterBranch": self._register,
        }
        handlers = {}
        for name, (request_type, _) in METHODS.items():
            fn = api.get(name, self._unsupported(name))
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=request_type.FromString, response_serializer=_serialize
            )
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(DTM_SERVICE, handlers),))
        try:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # newer grpcio raises where older ones return 0
            self.port = 0
        if not self.port:
            self._pool.shutdown(wait=False)
            raise OSError(f"cannot bind the gRPC API to {host}:{port} (in use?)")

    def start(self) -> None:
        """Serve (in the server's own threads)."""
        self._server.start()

    def stop(self) -> None:
        """Stop serving; calls in flight get a second to finish."""
        self._server.stop(1).wait()
        self._pool.shutdown(wait=True)

    def _answer(self, context: grpc.ServicerContext, name: str, call: Callable[[], ApiResult]) -> Message:
        try:
            result = call()
        except ApiError as exc:
            result = (exc.status, exc.body)
        except BadInput as exc:
            result = (exc.status, {"message": str(exc)})
        except Exception as exc:  # a bug must not kill the server
            logger.exception("gRPC %s failed", name)
            result = (500, {"message": f"{type(exc).__name__}: {exc}"})
        code, message = _status(result)
        logger.info("gRPC %s -> %s %s", name, code.name, message)
        if code != grpc.StatusCode.OK:
            context.abort(code, message)
        return empty_pb2.Empty()

    def _trans(
        self, route: Callable[..., ApiResult], **flags: bool
    ) -> Callable[[Any, grpc.ServicerContext], Message]:
        def serve(req: dtmgimp_pb2.DtmRequest, context: grpc.ServicerContext) -> Message:
            s = self.engine.scheduler
            return self._answer(context, route.__name__, lambda: route(s, {}, _trans_body(req), **flags))

        return serve

    def _register(self, req: dtmgimp_pb2.DtmBranchRequest, context: grpc.ServicerContext) -> Message:
        s = self.engine.scheduler
        return self._answer(context, "register", lambda: _api.register(s, {}, _branch_body(req), binary=True))

    @staticmethod
    def _unsupported(name: str) -> Callable[[Any, grpc.ServicerContext], Message]:
        def serve(req: Any, context: grpc.ServicerContext) -> Message:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not supported by the dtmcli test coordinator")

        return serve


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
