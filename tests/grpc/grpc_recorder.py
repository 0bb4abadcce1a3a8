"""A grpcio server for the gRPC client tests: it plays DTM (``dtmgimp.Dtm``) and the branch services
on one port, records every call as the trace files do (method path, request bytes, dtm-* and other
application metadata), and answers from a script (by default a recorded trace's answers)."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import grpc
from google.protobuf import empty_pb2
from traces import load

from dtmcli.grpc._proto import METHODS, dtmgimp_pb2

DTM_PREFIX = "/dtmgimp.Dtm/"

# Answer = (status code name, details, reply bytes)
Answer = tuple[str, str, bytes]
OK: Answer = ("OK", "", b"")


@dataclass
class Call:
    kind: str  # "client->dtm" | "client->branch"
    path: str
    body: bytes
    metadata: dict[str, str]
    time_remaining: Optional[float]


@dataclass
class Recorder:
    """Records calls; ``answers[path]`` lists answers given in turn (the last one repeats), ``handlers[path]``
    runs instead (``fn(body, context) -> reply bytes``). DTM's NewGid answers ``gid`` by default."""

    gid: str = "GID"
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    handlers: dict[str, Callable[[bytes, Any], bytes]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    port: int = 0
    server: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, method: str, service: str = "busi.Busi") -> str:
        return f"{self.target}/{service}/{method}"

    def dtm_calls(self) -> list[Call]:
        return [c for c in self.calls if c.kind == "client->dtm"]

    def methods(self) -> list[str]:
        return [c.path for c in self.calls]

    def _answer(self, path: str) -> Answer:
        with self.lock:
            queue = self.answers.get(path)
            if queue:
                return queue.pop(0) if len(queue) > 1 else queue[0]
        if path == DTM_PREFIX + "NewGid":
            return ("OK", "", dtmgimp_pb2.DtmGidReply(Gid=self.gid).SerializeToString())
        return OK

    def _handle(self, path: str) -> Callable[[bytes, Any], bytes]:
        def behavior(body: bytes, context: Any) -> bytes:
            meta = {k: v for k, v in context.invocation_metadata() if k != "user-agent" and not k.startswith("grpc-")}
            kind = "client->dtm" if path.startswith(DTM_PREFIX) else "client->branch"
            with self.lock:
                self.calls.append(Call(kind, path, body, meta, context.time_remaining()))
            handler = self.handlers.get(path)
            if handler is not None:
                return handler(body, context)
            code, details, reply = self._answer(path)
            if code != "OK":
                context.abort(getattr(grpc.StatusCode, code), details)
            return reply

        return behavior

    def __enter__(self) -> Recorder:
        recorder = self

        class Generic(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> Any:
                return grpc.unary_unary_rpc_method_handler(recorder._handle(details.method))

        self.server = grpc.server(ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((Generic(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(None)


def code_name(trace_status: str) -> str:
    """A trace's status name (Go's, e.g. FailedPrecondition) as grpc.StatusCode's name."""
    out = "".join("_" + ch if ch.isupper() and i and trace_status[i - 1].islower() else ch
                  for i, ch in enumerate(trace_status)).upper()
    return {"CANCELED": "CANCELLED"}.get(out, out)


def trace_calls(name: str) -> list[dict[str, Any]]:
    """The client-side gRPC events of a trace: calls to dtmgimp.Dtm and client-made branch calls."""
    out = []
    for event in load(name)["events"]:
        path = event["request"].get("path", "")
        if (event["kind"] == "client->dtm" and path.startswith(DTM_PREFIX)) or event["kind"] == "client->branch":
            out.append(event)
    return out


def script_from_trace(recorder: Recorder, name: str) -> None:
    """Make ``recorder`` answer as the trace's DTM and branches did, call after call."""
    for event in trace_calls(name):
        resp = event["response"]
        reply = base64.b64decode(resp.get("body_b64", ""))
        recorder.answers.setdefault(event["request"]["path"], []).append(
            (code_name(resp["grpc_status"]), resp["grpc_message"], reply)
        )


def normalised(call: Call, target: str) -> tuple[str, str, str, dict[str, str]]:
    """(kind, path, base64 body, metadata) with the test's address written as the traces' 127.0.0.1:PORT;
    a DTM request is re-encoded deterministically after the replacement, as the trace files were."""
    body = call.body
    if call.kind == "client->dtm":
        request_type = METHODS[call.path[len(DTM_PREFIX):]][0]
        message = request_type.FromString(body)
        if not isinstance(message, empty_pb2.Empty):
            _replace(message, target)
        body = message.SerializeToString(deterministic=True)
    meta = {k: v.replace(target, "127.0.0.1:PORT") for k, v in call.metadata.items()}
    return call.kind, call.path, base64.b64encode(body).decode(), meta


def _replace(message: Any, target: str) -> None:
    # The fields that carry addresses: URLs in Steps/QueryPrepared, confirm/cancel/url in Data.
    def fix(text: str) -> str:
        return text.replace(target, "127.0.0.1:PORT")

    if isinstance(message, dtmgimp_pb2.DtmRequest):
        message.Steps, message.QueryPrepared = fix(message.Steps), fix(message.QueryPrepared)
    elif isinstance(message, dtmgimp_pb2.DtmBranchRequest):
        for key in list(message.Data):
            message.Data[key] = fix(message.Data[key])


def expected(name: str) -> list[tuple[str, str, str, dict[str, str]]]:
    """The trace's client-side calls in the form of :func:`normalised`."""
    return [
        (e["kind"], e["request"]["path"], e["request"].get("body_b64", ""), e["request"].get("metadata", {}))
        for e in trace_calls(name)
    ]
