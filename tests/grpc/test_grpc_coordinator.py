"""The coordinator's gRPC API and its calls to gRPC branches, checked against the grpc_*.json traces of DTM v1.19.0.

Requests are the recorded Go client messages (``body_b64``) with the gid and branch address replaced;
the branch service is a real grpcio server that accepts any method as raw bytes and answers scripted
status codes, recording what DTM's calls carry (method, metadata, deadline, bytes).

In process by default (the ``dtm_grpc`` fixture); with ``--dtm-grpc-server host:port`` (``DTM_GRPC_SERVER``)
and ``--dtm-server`` for the same DTM's HTTP API, they run against a real DTM (the in-process-only ones skip).
"""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
from services import in_ci

if not in_ci():
    pytest.importorskip("grpc")

import grpc  # CI: the grpc extra must be installed
from google.protobuf import empty_pb2

from dtmcli import local_gid
from dtmcli.grpc._proto import dtmgimp_pb2 as pb
from dtmcli.testing import BranchService, DtmFacade

TRACES = Path(__file__).resolve().parents[1] / "data" / "traces"
Code = grpc.StatusCode


def trace(name: str) -> dict[str, Any]:
    return json.loads((TRACES / f"{name}.json").read_text())  # type: ignore[no-any-return]


def dtm_message(name: str, path: str, index: int = 0) -> bytes:
    """The recorded request bytes of the ``index``-th call to ``/dtmgimp.Dtm/<path>`` in a trace."""
    events = [e for e in trace(name)["events"] if e["request"].get("path") == f"/dtmgimp.Dtm/{path}"]
    return base64.b64decode(events[index]["request"]["body_b64"])


def branch_events(name: str) -> list[dict[str, Any]]:
    return [e for e in trace(name)["events"] if e["kind"] == "dtm->branch"]


def retarget(text: str, target: str, gid: str) -> str:
    """A trace string with the branch address and the gid of this run."""
    return text.replace("127.0.0.1:PORT", target).replace("GID", gid)


def dtm_request(name: str, path: str, target: str, gid: str, index: int = 0) -> pb.DtmRequest:
    req = pb.DtmRequest.FromString(dtm_message(name, path, index))
    req.Gid = gid
    req.Steps = retarget(req.Steps, target, gid)
    req.QueryPrepared = retarget(req.QueryPrepared, target, gid)
    return req


def branch_request(name: str, target: str, gid: str, index: int) -> pb.DtmBranchRequest:
    req = pb.DtmBranchRequest.FromString(dtm_message(name, "RegisterBranch", index))
    req.Gid = gid
    for key in list(req.Data):
        req.Data[key] = retarget(req.Data[key], target, gid)
    return req


# -- the branch service -----------------------------------------------------------------------------------------


@dataclass
class BranchCall:
    method: str
    metadata: dict[str, str]
    body: bytes
    deadline: Optional[float]
    at: float


class GrpcBranches:
    """A grpcio server answering every method with raw bytes and a scripted status; records each call."""

    def __init__(self) -> None:
        self.calls: list[BranchCall] = []
        self.scripts: dict[str, list[tuple[Code, str]]] = {}
        self._lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(8))
        outer = self

        class Any_(grpc.GenericRpcHandler):
            def service(self, details: grpc.HandlerCallDetails) -> Any:
                method = details.method

                def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
                    return outer._handle(method, request, context)

                return grpc.unary_unary_rpc_method_handler(handle)

        self.server.add_generic_rpc_handlers((Any_(),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def script(self, method: str, *answers: tuple[Code, str]) -> None:
        """Answers for ``/busi.Busi/<method>``, used in order; then OK."""
        self.scripts[f"/busi.Busi/{method}"] = list(answers)

    def _handle(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        md = {k: v for k, v in context.invocation_metadata() if k != "user-agent" and isinstance(v, str)}
        with self._lock:
            self.calls.append(BranchCall(method, md, request, context.time_remaining(), time.monotonic()))
            answers = self.scripts.get(method)
            answer = answers.pop(0) if answers else (Code.OK, "")
        if answer[0] != Code.OK:
            context.abort(*answer)
        return b""

    def of(self, gid: str) -> list[BranchCall]:
        with self._lock:
            return [c for c in self.calls if c.metadata.get("dtm-gid") == gid]

    def close(self) -> None:
        self.server.stop(0).wait()


@pytest.fixture
def branches() -> Iterator[GrpcBranches]:
    svc = GrpcBranches()
    yield svc
    svc.close()


@dataclass
class Coord:
    target: str
    facade: DtmFacade
    channel: grpc.Channel

    @property
    def in_process(self) -> bool:
        return not self.facade.is_real

    def rpc(self, method: str, message: Any) -> tuple[Code, str, bytes]:
        """Call ``/dtmgimp.Dtm/<method>`` with a message; returns the status code, details and reply bytes."""
        call = self.channel.unary_unary(f"/dtmgimp.Dtm/{method}", request_serializer=lambda m: m.SerializeToString())
        try:
            return Code.OK, "", call(message, timeout=10)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or "", b""


@pytest.fixture
def coord(dtm_grpc: DtmFacade) -> Iterator[Coord]:
    """The ``dtm_grpc`` coordinator (in process, or a real DTM with ``--dtm-grpc-server`` and ``--dtm-server``)."""
    assert dtm_grpc.grpc_target is not None
    with grpc.insecure_channel(dtm_grpc.grpc_target) as channel:
        yield Coord(dtm_grpc.grpc_target, dtm_grpc, channel)


def in_process_only(coord: Coord) -> None:
    if not coord.in_process:
        pytest.skip("checks the embedded coordinator's own timing or limits")


def wait_calls(branches: GrpcBranches, gid: str, count: int, timeout: float = 10) -> list[BranchCall]:
    deadline = time.monotonic() + timeout
    while len(branches.of(gid)) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return branches.of(gid)


def normalised(call: BranchCall, target: str, gid: str) -> dict[str, Any]:
    """A recorded call in the trace's form (GID for the gid)."""
    md = {k: v.replace(gid, "GID") for k, v in call.metadata.items()}
    return {"path": call.method, "metadata": md, "body_b64": base64.b64encode(call.body).decode()}


def traced(event: dict[str, Any]) -> dict[str, Any]:
    r = event["request"]
    return {"path": r["path"], "metadata": r["metadata"], "body_b64": r["body_b64"]}


# -- the API ----------------------------------------------------------------------------------------------------


def test_new_gid(coord: Coord) -> None:
    code, _, raw = coord.rpc("NewGid", empty_pb2.Empty())
    assert code == Code.OK
    gid = pb.DtmGidReply.FromString(raw).Gid
    assert len(gid) == 22 and gid.isalnum()


def test_saga_success_calls_like_dtm(coord: Coord, branches: GrpcBranches) -> None:
    name = "grpc_goclient_saga_success"
    gid = local_gid()
    assert coord.rpc("Submit", dtm_request(name, "Submit", branches.target, gid))[0] == Code.OK
    trans = coord.facade.wait_status(gid)
    assert trans.status == "succeed" and trans.protocol == "grpc"
    calls = branches.of(gid)
    assert [normalised(c, branches.target, gid) for c in calls] == [traced(e) for e in branch_events(name)]
    for c in calls:  # DTM: the request timeout (server default 3 s) as the deadline
        assert c.deadline is not None and 2.0 < c.deadline <= 3.05
    rows = {(b.branch_id, b.op): (b.status, base64.b64encode(b.data).decode(), b.url) for b in trans.branches}
    assert rows[("01", "action")] == ("succeed", "CB4=", f"{branches.target}/busi.Busi/TransOut")
    assert rows[("02", "compensate")] == ("prepared", "CCg=", f"{branches.target}/busi.Busi/TransInRevert")


def test_saga_action_aborted_compensates(coord: Coord, branches: GrpcBranches) -> None:
    name = "grpc_goclient_saga_action_aborted"
    gid = local_gid()
    branches.script("TransIn", (Code.ABORTED, "insufficient balance"))
    assert coord.rpc("Submit", dtm_request(name, "Submit", branches.target, gid))[0] == Code.OK
    trans = coord.facade.wait_status(gid)
    assert trans.status == "failed"
    reason = f"url:{branches.target}/busi.Busi/TransIn return failed: insufficient balance FAILURE"
    assert trans.rollback_reason == reason
    got = [normalised(c, branches.target, gid) for c in branches.of(gid)]
    assert got == [traced(e) for e in branch_events(name)]
    assert {(b.branch_id, b.op): b.status for b in trans.branches}[("02", "action")] == "failed"


def test_branch_headers_as_lowercase_metadata(coord: Coord, branches: GrpcBranches) -> None:
    name = "grpc_branch_headers"
    gid = local_gid()
    branches.script("TransIn", (Code.ABORTED, "insufficient balance"))
    assert coord.rpc("Submit", dtm_request(name, "Submit", branches.target, gid))[0] == Code.OK
    assert coord.facade.wait_status(gid).status == "failed"
    got = [normalised(c, branches.target, gid) for c in branches.of(gid)]
    assert got == [traced(e) for e in branch_events(name)]
    assert got[0]["metadata"]["x-trace-id"] == "trace-123"  # sent as X-Trace-Id


def _status_saga(coord: Coord, branches: GrpcBranches, answers: list[tuple[Code, str]]) -> str:
    """A one-step saga (RetryInterval 1, as in grpc_branch_status_codes) whose action answers ``answers``."""
    gid = local_gid()
    method = f"Act{gid[-8:]}"
    branches.script(method, *answers)
    req = pb.DtmRequest(Gid=gid, TransType="saga", TransOptions=pb.DtmTransOptions(RetryInterval=1),
                        BinPayloads=[b"\x08\x1e"],
                        Steps=json.dumps([{"action": f"{branches.target}/busi.Busi/{method}",
                                           "compensate": f"{branches.target}/busi.Busi/{method}Revert"}]))
    assert coord.rpc("Submit", req)[0] == Code.OK
    return gid


@pytest.mark.parametrize("message", ["business failure", "still ONGOING, or not"])
def test_status_codes_failure(coord: Coord, branches: GrpcBranches, message: str) -> None:
    """ABORTED is FAILURE whatever its message, unless it is exactly ONGOING (no substring rule as over HTTP)."""
    gid = _status_saga(coord, branches, [(Code.ABORTED, message)])
    trans = coord.facade.wait_status(gid)
    assert trans.status == "failed"
    assert trans.rollback_reason.startswith("url:") and " return failed: " in trans.rollback_reason
    assert trans.rollback_reason.endswith(" FAILURE")
    assert [c.metadata["dtm-op"] for c in branches.of(gid)] == ["action", "compensate"]


@pytest.mark.parametrize("answer", [(Code.ABORTED, "ONGOING"), (Code.FAILED_PRECONDITION, "not ready yet")],
                         ids=["aborted-ONGOING", "failed-precondition"])
def test_status_codes_ongoing_fixed_interval(coord: Coord, branches: GrpcBranches, answer: tuple[Code, str]) -> None:
    gid = _status_saga(coord, branches, [answer] * 3)
    wait_calls(branches, gid, 1)
    intervals = []
    for expected in (2, 3, 4):
        coord.facade.advance(2.5 if coord.in_process else 4, [gid])
        wait_calls(branches, gid, expected, timeout=15)
        trans = coord.facade.query(gid)
        assert trans is not None
        intervals.append(trans.next_cron_interval)
    assert coord.facade.wait_status(gid, timeout=15).status == "succeed"
    assert [c.metadata["dtm-op"] for c in branches.of(gid)] == ["action"] * 4  # never compensated
    assert set(intervals[:-1]) == {1}  # ONGOING keeps the retry interval


@pytest.mark.parametrize("answer", [(Code.UNAVAILABLE, "service unavailable"), (Code.INTERNAL, "internal error")],
                         ids=["unavailable", "internal"])
def test_status_codes_error_backoff(coord: Coord, branches: GrpcBranches, answer: tuple[Code, str]) -> None:
    in_process_only(coord)  # a real DTM takes 2 + 4 + 8 s (and its cron's delay)
    gid = _status_saga(coord, branches, [answer] * 3)
    server = coord.facade.server
    assert server is not None
    wait_calls(branches, gid, 1)
    server.wait_idle()
    seen = []
    for _ in range(3):
        trans = coord.facade.query(gid)
        assert trans is not None and trans.status == "submitted"
        seen.append(trans.next_cron_interval)
        coord.facade.advance(trans.next_cron_interval)
    assert seen == [2, 4, 8]  # an error doubles the interval (retry_interval 1)
    trans = coord.facade.wait_status(gid)
    assert trans.status == "succeed"
    assert [c.metadata["dtm-op"] for c in branches.of(gid)] == ["action"] * 4


def test_unreachable_branch_is_retried(coord: Coord, branches: GrpcBranches) -> None:
    in_process_only(coord)
    gid = local_gid()
    req = pb.DtmRequest(Gid=gid, TransType="saga", TransOptions=pb.DtmTransOptions(RetryInterval=1, RequestTimeout=1),
                        BinPayloads=[b""], Steps=json.dumps([{"action": "127.0.0.1:1/busi.Busi/Nowhere"}]))
    assert coord.rpc("Submit", req)[0] == Code.OK
    server = coord.facade.server
    assert server is not None
    server.wait_idle()
    trans = coord.facade.query(gid)
    assert trans is not None and trans.status == "submitted" and trans.next_cron_interval == 2


def test_tcc_register_and_confirm(coord: Coord, branches: GrpcBranches) -> None:
    name = "grpc_goclient_tcc_success"
    gid = local_gid()
    assert coord.rpc("Prepare", dtm_request(name, "Prepare", branches.target, gid))[0] == Code.OK
    for i in range(2):
        assert coord.rpc("RegisterBranch", branch_request(name, branches.target, gid, i))[0] == Code.OK
    assert coord.rpc("Submit", dtm_request(name, "Submit", branches.target, gid))[0] == Code.OK
    trans = coord.facade.wait_status(gid)
    assert trans.status == "succeed"
    got = [normalised(c, branches.target, gid) for c in branches.of(gid)]
    assert got == [traced(e) for e in branch_events(name)]  # confirm 02 then 01, with the BusiPayload bytes
    ops = {(b.branch_id, b.op): (b.status, base64.b64encode(b.data).decode()) for b in trans.branches}
    assert ops[("01", "cancel")] == ("prepared", "CB4=")


def test_tcc_abort_cancels(coord: Coord, branches: GrpcBranches) -> None:
    name = "grpc_goclient_tcc_try_aborted"
    gid = local_gid()
    assert coord.rpc("Prepare", dtm_request(name, "Prepare", branches.target, gid))[0] == Code.OK
    for i in range(2):
        assert coord.rpc("RegisterBranch", branch_request(name, branches.target, gid, i))[0] == Code.OK
    assert coord.rpc("Abort", dtm_request(name, "Abort", branches.target, gid))[0] == Code.OK
    trans = coord.facade.wait_status(gid)
    assert trans.status == "failed"
    assert trans.rollback_reason == "rpc error: code = Aborted desc = insufficient balance"
    got = [normalised(c, branches.target, gid) for c in branches.of(gid)]
    assert got == [traced(e) for e in branch_events(name)]


def test_msg_prepare_submit(coord: Coord, branches: GrpcBranches) -> None:
    name = "grpc_goclient_msg_prepare_submit"
    gid = local_gid()
    assert coord.rpc("Prepare", dtm_request(name, "Prepare", branches.target, gid))[0] == Code.OK
    assert coord.rpc("Submit", dtm_request(name, "Submit", branches.target, gid))[0] == Code.OK
    trans = coord.facade.wait_status(gid)
    assert trans.status == "succeed" and trans.query_prepared == f"{branches.target}/busi.Busi/QueryPrepared"
    got = [normalised(c, branches.target, gid) for c in branches.of(gid)]
    assert got == [traced(e) for e in branch_events(name)]


def test_msg_query_prepared(coord: Coord, branches: GrpcBranches) -> None:
    in_process_only(coord)  # a real DTM asks after TimeoutToFail (35 s)
    name = "grpc_goclient_msg_query_prepared"
    gid = local_gid()
    branches.script("QueryPrepared", (Code.FAILED_PRECONDITION, "ONGOING"))
    assert coord.rpc("Prepare", dtm_request(name, "Prepare", branches.target, gid))[0] == Code.OK
    coord.facade.advance(30)  # not timed out yet (TimeoutToFail 35 s): not asked
    assert branches.of(gid) == []
    # RetryInterval 1, but each early look pushes the next one a server RetryInterval (10 s) away: asked at 41 s,
    # as DTM asked at about 39 s in the trace.
    coord.facade.advance(11.5)
    assert [c.method for c in branches.of(gid)] == ["/busi.Busi/QueryPrepared"]
    coord.facade.advance(1)  # ONGOING: asked again one retry_interval later
    trans = coord.facade.wait_status(gid)
    assert trans.status == "succeed"
    got = [normalised(c, branches.target, gid) for c in branches.of(gid)]
    assert got == [traced(e) for e in branch_events(name)]  # empty query_prepared request, branch 00, op msg


def test_api_errors_map_to_status_codes(coord: Coord, branches: GrpcBranches) -> None:
    gid = local_gid()
    branches.script("TransIn", (Code.ABORTED, "insufficient balance"))
    submit = dtm_request("grpc_goclient_saga_action_aborted", "Submit", branches.target, gid)
    assert coord.rpc("Submit", submit)[0] == Code.OK
    assert coord.facade.wait_status(gid).status == "failed"
    code, details, _ = coord.rpc("Submit", submit)
    assert (code, details) == (Code.ABORTED, "current status 'failed', cannot sumbmit. FAILURE")
    code, details, _ = coord.rpc("Abort", pb.DtmRequest(Gid=gid, TransType="saga"))
    assert code == Code.ABORTED and "cannot abort" in details
    code, details, _ = coord.rpc("RegisterBranch", branch_request("grpc_goclient_tcc_success", branches.target,
                                                                  local_gid(), 0))
    assert code == Code.ABORTED and "no trans with gid" in details
    code, _, _ = coord.rpc("Prepare", pb.DtmRequest(Gid=local_gid(), TransType="tcc", Steps="[{"))
    assert code == Code.INTERNAL  # Go's unmarshal panic, answered by dtmsvr's grpcRecover (verified v1.19.0)


def test_unsupported_methods(coord: Coord) -> None:
    in_process_only(coord)
    code, details, _ = coord.rpc("Subscribe", pb.DtmTopicRequest(Topic="t", URL="u"))
    assert code == Code.UNIMPLEMENTED and "not supported" in details


def test_bytes_survive_above_0x7f(coord: Coord, branches: GrpcBranches) -> None:
    """Payloads are raw bytes end to end (here not UTF-8), and /query shows them as DTM does (base64)."""
    gid = local_gid()
    payload = bytes(range(256))
    req = pb.DtmRequest(Gid=gid, TransType="msg", BinPayloads=[payload],
                        Steps=json.dumps([{"action": f"{branches.target}/busi.Busi/Bin"}]))
    assert coord.rpc("Submit", req)[0] == Code.OK
    trans = coord.facade.wait_status(gid)
    assert trans.status == "succeed"
    assert branches.of(gid)[0].body == payload
    assert trans.branches[0].data == payload
    if coord.in_process:  # DTM keeps BinPayloads out of the transaction's JSON
        assert "payloads" not in coord.facade.server.query_json(gid)["transaction"]  # type: ignore[union-attr]


def test_mixed_grpc_and_http_branches(coord: Coord, branches: GrpcBranches) -> None:
    """A gRPC-API saga whose second step is an HTTP URL: DTM calls that one over HTTP with the payload bytes."""
    in_process_only(coord)
    with BranchService() as http:
        gid = local_gid()
        steps = [{"action": f"{branches.target}/busi.Busi/TransOut", "compensate": ""},
                 {"action": http.url("/TransIn"), "compensate": ""}]
        req = pb.DtmRequest(Gid=gid, TransType="saga", BinPayloads=[b"\x08\x1e", b'{"amount":30}'],
                            Steps=json.dumps(steps))
        assert coord.rpc("Submit", req)[0] == Code.OK
        assert coord.facade.wait_status(gid).status == "succeed"
        assert [c.body for c in branches.of(gid)] == [b"\x08\x1e"]
        (call,) = http.calls("/TransIn")
        assert call.method == "POST" and call.json() == {"amount": 30}
        assert call.query == {"gid": gid, "trans_type": "saga", "branch_id": "02", "op": "action"}


def test_grpc_protocol_over_the_http_api(coord: Coord, branches: GrpcBranches) -> None:
    """protocol "grpc" in an HTTP submit: the payload text's UTF-8 bytes go to the gRPC branch."""
    gid = local_gid()
    body = {"gid": gid, "trans_type": "msg", "protocol": "grpc", "payloads": ["caf\u00e9"],
            "steps": [{"action": f"{branches.target}/busi.Busi/TransOut"}]}
    coord.facade.client.post("submit", body)
    trans = coord.facade.wait_status(gid)
    assert trans.status == "succeed"
    assert [c.body for c in branches.of(gid)] == ["caf\u00e9".encode()]


def test_grpc_port_in_use_fails_start_cleanly() -> None:
    from dtmcli.testing import DtmTestServer

    with DtmTestServer(grpc_port=0) as first:
        taken = int(first.grpc_target.rsplit(":", 1)[1])
        second = DtmTestServer(grpc_port=taken)
        with pytest.raises(OSError, match="cannot bind the gRPC API"):
            second.start()
        assert not second.serves_grpc
        with pytest.raises(RuntimeError, match="not started"):
            second.port  # noqa: B018 - the HTTP listener was closed again
        second.close()
    with DtmTestServer() as plain:
        assert not plain.serves_grpc
        with pytest.raises(RuntimeError, match="grpc_port"):
            plain.grpc_target  # noqa: B018
