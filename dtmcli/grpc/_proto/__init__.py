"""Protobuf messages of DTM's gRPC API, generated from the .proto files here by scripts/gen-grpc.sh.

Only message modules are generated. ``METHODS`` names the request and reply type of each ``dtmgimp.Dtm``
method, for callers (client stubs, the embedded coordinator's server) that work with method paths.
"""

from __future__ import annotations

from google.protobuf import empty_pb2
from google.protobuf.message import Message

from dtmcli.grpc._proto import dtmgimp_pb2, workflow_pb2

DTM_SERVICE = "dtmgimp.Dtm"
WORKFLOW_SERVICE = "workflow.Workflow"

METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "NewGid": (empty_pb2.Empty, dtmgimp_pb2.DtmGidReply),
    "Submit": (dtmgimp_pb2.DtmRequest, empty_pb2.Empty),
    "Prepare": (dtmgimp_pb2.DtmRequest, empty_pb2.Empty),
    "Abort": (dtmgimp_pb2.DtmRequest, empty_pb2.Empty),
    "RegisterBranch": (dtmgimp_pb2.DtmBranchRequest, empty_pb2.Empty),
    "PrepareWorkflow": (dtmgimp_pb2.DtmRequest, dtmgimp_pb2.DtmProgressesReply),
    "Subscribe": (dtmgimp_pb2.DtmTopicRequest, empty_pb2.Empty),
    "Unsubscribe": (dtmgimp_pb2.DtmTopicRequest, empty_pb2.Empty),
    "DeleteTopic": (dtmgimp_pb2.DtmTopicRequest, empty_pb2.Empty),
}
"""Method name of ``dtmgimp.Dtm`` -> (request message class, reply message class)."""


def method_path(name: str, service: str = DTM_SERVICE) -> str:
    """The full gRPC method path, e.g. ``/dtmgimp.Dtm/Submit``."""
    return f"/{service}/{name}"


__all__ = ["DTM_SERVICE", "METHODS", "WORKFLOW_SERVICE", "dtmgimp_pb2", "method_path", "workflow_pb2"]
