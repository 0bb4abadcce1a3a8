"""The gRPC client's behaviour: status codes read as DTM means them, typed errors, the never-resubmit
rules shared with HTTP, msg do_and_submit over gRPC, XA metadata, bad input refused before sending,
and the asyncio twin. A grpcio server in the test process plays DTM and the branches (grpc_recorder).
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from typing import Any

import pytest

if os.environ.get("CI") != "true":
    pytest.importorskip("grpc")

import grpc
import responses
from google.protobuf import wrappers_pb2

sys.path.insert(0, os.path.dirname(__file__))
from grpc_recorder import Recorder

from dtmcli import (
    DtmClient,
    DtmConnectError,
    DtmFailure,
    DtmInProgress,
    DtmInvalidInput,
    DtmOngoing,
    DtmServerError,
    DtmTimeout,
    DtmTransportError,
    ExponentialBackoff,
    Retry,
)
from dtmcli.asyncio import grpc as agrpc
from dtmcli.branch import BranchRequestError
from dtmcli.grpc import DtmGrpcClient, Msg, Saga, Tcc, Xa, register_xa_branch, xa_global_transaction
from dtmcli.grpc._proto import dtmgimp_pb2 as pb
from dtmcli.grpc._wire import rpc_error

PAYLOAD = wrappers_pb2.Int64Value(value=30)
FAST = Retry(retries=2, backoff=ExponentialBackoff(base=0.01, cap=0.01))
SUBMIT, PREPARE, ABORT = "/dtmgimp.Dtm/Submit", "/dtmgimp.Dtm/Prepare", "/dtmgimp.Dtm/Abort"


@pytest.fixture
def rec() -> Any:
    with Recorder() as recorder:
        yield recorder


def saga(rec: Recorder, client: Any, **options: Any) -> Saga:
    return Saga(client, "gid1", **options).add(rec.url("TransOut"), rec.url("TransOutRevert"), PAYLOAD)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- how status codes read -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "details", "error", "status"),
    [
        ("ABORTED", "x", DtmFailure, None),
        ("ABORTED", "ONGOING", DtmOngoing, None),  # DTM reads an Aborted "ONGOING" as ONGOING
        ("FAILED_PRECONDITION", "not yet", DtmOngoing, None),
        ("DEADLINE_EXCEEDED", "", DtmTimeout, None),
        ("UNAVAILABLE", "failed to connect to all addresses", DtmTransportError, None),  # a peer's text
        ("UNAVAILABLE", "Socket closed", DtmTransportError, None),
        ("UNKNOWN", "boom", DtmServerError, 500),
        ("INTERNAL", "boom", DtmServerError, 500),
        ("UNIMPLEMENTED", "", DtmServerError, 404),
        ("INVALID_ARGUMENT", "", DtmServerError, 400),
    ],
)
def test_status_codes_map_to_typed_errors(code: str, details: str, error: type, status: Any) -> None:
    # an answer to a call that was made: "nothing sent" is decided before the call (the channel's state)
    exc = rpc_error(code, details, where="dtm Submit", gid="g")
    assert type(exc) is error and exc.gid == "g"
    if status is not None:
        assert isinstance(exc, DtmServerError) and exc.status == status


def test_branch_failure_text_is_gos() -> None:
    exc = rpc_error("ABORTED", "insufficient balance", where="u", bare=True)
    assert exc.message == "rpc error: code = Aborted desc = insufficient balance"


@pytest.mark.parametrize(
    ("code", "error"),
    [("ABORTED", DtmFailure), ("FAILED_PRECONDITION", DtmOngoing), ("UNKNOWN", DtmServerError)],
)
def test_dtm_answers_raise_typed_errors(rec: Recorder, code: str, error: type) -> None:
    rec.answers[SUBMIT] = [(code, "current status 'failed', cannot sumbmit. FAILURE", b"")]
    with pytest.raises(error) as info:
        saga(rec, DtmGrpcClient(rec.target)).submit()
    assert info.value.gid == "gid1"


# -- never resubmit --------------------------------------------------------------------------------


def test_refused_connection_sends_nothing_and_allows_a_new_submit() -> None:
    client = DtmGrpcClient(f"127.0.0.1:{closed_port()}", timeout=2, retry=FAST)
    s = Saga(client, "gid1").add("127.0.0.1:1/busi.Busi/A", "", PAYLOAD)
    with pytest.raises(DtmConnectError):
        s.submit()
    assert s.state == "new"  # DTM cannot have it: submitting again is allowed


def test_transport_error_after_sending_is_never_resent(rec: Recorder) -> None:
    rec.answers[SUBMIT] = [("UNAVAILABLE", "service unavailable", b"")]
    s = saga(rec, DtmGrpcClient(rec.target, retry=FAST))
    with pytest.raises(DtmTransportError) as info:
        s.submit(recover=True)  # recover needs a query, which only the HTTP API has: not resent
    assert not isinstance(info.value, DtmConnectError)
    assert rec.methods().count(SUBMIT) == 1
    with pytest.raises(DtmInvalidInput):
        s.submit()
    assert rec.methods().count(SUBMIT) == 1


def test_prepare_is_retried_within_the_deadline(rec: Recorder) -> None:
    rec.answers[PREPARE] = [("UNAVAILABLE", "service unavailable", b""), ("OK", "", b"")]
    msg = Msg(DtmGrpcClient(rec.target, retry=FAST), "gid1").add(rec.url("TransOut"), PAYLOAD)
    msg.prepare(rec.url("QueryPrepared"))
    assert rec.methods() == [PREPARE, PREPARE]


def test_deadline_gives_timeout_and_no_resubmit(rec: Recorder) -> None:
    rec.handlers[SUBMIT] = lambda body, ctx: (time.sleep(0.6), b"")[1]
    s = saga(rec, DtmGrpcClient(rec.target, timeout=0.2, retry=FAST))
    with pytest.raises(DtmTimeout):
        s.submit()
    with pytest.raises(DtmInvalidInput):
        s.submit()
    assert rec.methods().count(SUBMIT) == 1


def test_wait_result_without_a_query_is_refused_before_sending(rec: Recorder) -> None:
    """With wait_result DTM answers Aborted for "not succeeded yet" too; without http= nothing could
    tell it from a failure, so the transaction is refused before anything is sent (never DtmFailure)."""
    trans = saga(rec, DtmGrpcClient(rec.target), wait_result=True)
    with pytest.raises(DtmInvalidInput, match="wait_result over gRPC needs"):
        trans.submit()
    assert rec.methods() == []
    trans.wait_result = False  # nothing was sent: the same saga can still go
    trans.submit()
    assert rec.methods() == [SUBMIT]


def test_wait_result_settles_through_the_http_api(rec: Recorder) -> None:
    http = "http://127.0.0.1:8081/api/dtmsvr"
    rec.answers[SUBMIT] = [("UNKNOWN", "branch answered 500", b"")]
    client = DtmGrpcClient(rec.target, http=DtmClient(http))
    with responses.RequestsMock() as rsps:
        rsps.get(f"{http}/query", json={"transaction": {"gid": "gid1", "status": "submitted"}, "branches": []})
        with pytest.raises(DtmInProgress):
            saga(rec, client, wait_result=True).submit()
        assert len(rsps.calls) == 1


def test_query_needs_the_http_api() -> None:
    with pytest.raises(DtmInvalidInput, match="no query"):
        DtmGrpcClient("127.0.0.1:1").query("gid1")


# -- msg do_and_submit over gRPC -------------------------------------------------------------------


def _boom(barrier: Any) -> None:
    raise RuntimeError("local work failed")


@pytest.mark.parametrize(("answer", "then"), [("ABORTED", ABORT), ("OK", SUBMIT), ("UNAVAILABLE", None)])
def test_do_and_submit_asks_query_prepared_over_grpc(rec: Recorder, answer: str, then: Any) -> None:
    rec.answers["/busi.Busi/QueryPrepared"] = [(answer, "x", b"")]
    msg = Msg(DtmGrpcClient(rec.target), "gid1").add(rec.url("TransOut"), PAYLOAD)
    with pytest.raises(RuntimeError):
        msg.do_and_submit(rec.url("QueryPrepared"), _boom)
    assert rec.methods() == [PREPARE, "/busi.Busi/QueryPrepared"] + ([then] if then else [])
    query = rec.calls[1]
    assert query.body == b""
    assert query.metadata == {"dtm-gid": "gid1", "dtm-trans_type": "msg", "dtm-branch_id": "00", "dtm-op": "msg",
                              "dtm-dtm": rec.target}


def test_do_and_submit_business_failure_aborts_without_query(rec: Recorder) -> None:
    def fail(barrier: Any) -> None:
        raise DtmFailure("no")

    msg = Msg(DtmGrpcClient(rec.target), "gid1").add(rec.url("TransOut"), PAYLOAD)
    with pytest.raises(DtmFailure):
        msg.do_and_submit(rec.url("QueryPrepared"), fail)
    assert rec.methods() == [PREPARE, ABORT]


def test_do_and_submit_success_submits(rec: Recorder) -> None:
    msg = Msg(DtmGrpcClient(rec.target), "gid1").add(rec.url("TransOut"), PAYLOAD)
    assert msg.do_and_submit(rec.url("QueryPrepared"), lambda barrier: 7) == 7
    assert rec.methods() == [PREPARE, SUBMIT]


# -- xa, tcc details -------------------------------------------------------------------------------


def test_xa_action_carries_phase2_url(rec: Recorder) -> None:
    rec.handlers["/busi.Busi/TransOutXa"] = lambda body, ctx: pb.DtmGidReply(Gid="r").SerializeToString()
    with xa_global_transaction(DtmGrpcClient(rec.target), "gid1", branch_headers={"X-Tenant": "t"}) as xa:
        assert isinstance(xa, Xa)
        reply = xa.call_branch(PAYLOAD, rec.url("TransOutXa"), pb.DtmGidReply)
    assert reply == pb.DtmGidReply(Gid="r")
    assert rec.methods() == [PREPARE, "/busi.Busi/TransOutXa", SUBMIT]
    action = rec.calls[1]
    assert action.body == PAYLOAD.SerializeToString()
    assert action.metadata == {"dtm-gid": "gid1", "dtm-trans_type": "xa", "dtm-branch_id": "01", "dtm-op": "action",
                               "dtm-dtm": rec.target, "dtm-phase2_url": rec.url("TransOutXa"), "x-tenant": "t"}
    assert pb.DtmRequest.FromString(rec.calls[0].body).TransOptions.BranchHeaders == {"X-Tenant": "t"}


def test_xa_branch_registers_over_grpc(rec: Recorder) -> None:
    meta = [("dtm-gid", "g"), ("dtm-trans_type", "xa"), ("dtm-branch_id", "01"), ("dtm-op", "action"),
            ("dtm-dtm", rec.target), ("dtm-phase2_url", rec.url("TransOutXa"))]
    register_xa_branch(meta)
    assert rec.methods() == ["/dtmgimp.Dtm/RegisterBranch"]
    assert rec.calls[0].body == pb.DtmBranchRequest(  # Go's XaLocalTransaction: no Op, no BusiPayload
        Gid="g", TransType="xa", BranchID="01", Data={"url": rec.url("TransOutXa")}
    ).SerializeToString(deterministic=True)
    rec.answers["/dtmgimp.Dtm/RegisterBranch"] = [("ABORTED", "no trans with gid: g status: prepared found", b"")]
    with pytest.raises(DtmFailure):
        register_xa_branch(meta, dtm=DtmGrpcClient(rec.target))


def test_tcc_reply_into_a_message_and_raw(rec: Recorder) -> None:
    rec.handlers["/busi.Busi/Try"] = lambda body, ctx: body  # echoes the payload
    tcc = Tcc(DtmGrpcClient(rec.target), "gid1")
    tcc.prepare()
    into = wrappers_pb2.Int64Value()
    assert tcc.call_branch(PAYLOAD, rec.url("Try"), rec.url("C"), rec.url("X"), into) is into
    assert into.value == 30
    assert tcc.call_branch(b"\x08\x01", rec.url("Try"), "", "") == b"\x08\x01"
    tcc.submit()


def test_client_branch_calls_are_traced(rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    tcc = Tcc(DtmGrpcClient(rec.target), "gid1")
    tcc.prepare()
    tcc.call_branch(PAYLOAD, rec.url("Try"), "", "")
    provider.shutdown()
    span = next(s for s in exporter.get_finished_spans() if s.name == "dtm branch tcc try")
    traceparent = rec.calls[-1].metadata["traceparent"]
    assert format(span.context.span_id, "016x") in traceparent


def test_from_grpc_refuses_a_call_that_is_not_a_tcc_try() -> None:
    meta = [("dtm-gid", "g"), ("dtm-trans_type", "saga"), ("dtm-branch_id", "01"), ("dtm-op", "action"),
            ("dtm-dtm", "")]
    with pytest.raises(BranchRequestError):
        Tcc.from_grpc(meta)


# -- bad input: refused before anything is sent ----------------------------------------------------


def test_bad_input_is_refused_before_sending(rec: Recorder) -> None:
    client = DtmGrpcClient(rec.target)
    with pytest.raises(DtmInvalidInput, match="resolver schemes"):
        Saga(client, "g").add("dns:///busi:8081/busi.Busi/TransOut", "", PAYLOAD)
    with pytest.raises(DtmInvalidInput):
        Saga(client, "g").add(rec.url("A"), "", {"amount": 30})  # JSON payloads are the HTTP builders'
    with pytest.raises(DtmInvalidInput, match="concurrent"):
        Msg(client, "g").add(rec.url("A"), PAYLOAD).enable_concurrent().submit()
    with pytest.raises(DtmInvalidInput):
        Msg(client, "g").add(rec.url("A"), PAYLOAD).prepare("http://busi/qp")
    with pytest.raises(DtmInvalidInput):
        DtmGrpcClient("http://localhost:36789/api/dtmsvr")
    with pytest.raises(DtmInvalidInput):
        Saga("http://localhost:36789/api/dtmsvr", "g")
    tcc = Tcc(client, "g")
    tcc.prepare()
    with pytest.raises(DtmInvalidInput):
        tcc.call_branch(PAYLOAD, "localhost:1/NoService", "", "")
    assert rec.methods() == [PREPARE]


def test_client_calls_take_bodies_and_messages(rec: Recorder) -> None:
    client = DtmGrpcClient(rec.target)
    request = pb.DtmRequest(Gid="g", TransType="msg", TransOptions=pb.DtmTransOptions(RetryInterval=1),
                            BinPayloads=[b"\x08\x1e"], QueryPrepared="h:1/s.S/Q",
                            Steps='[{"action":"h:1/s.S/A"}]')
    client.prepare(request)
    client.submit({"gid": "g", "trans_type": "msg", "retry_interval": 1, "payloads": [b"\x08\x1e"],
                   "query_prepared": "h:1/s.S/Q", "steps": [{"action": "h:1/s.S/A"}]})
    branch = pb.DtmBranchRequest(Gid="g", TransType="tcc", BranchID="01", Data={"confirm": "c", "cancel": "x"},
                                 BusiPayload=b"\x01")
    client.register_branch(branch)
    client.abort({"gid": "g", "trans_type": "tcc", "rollback_reason": "r"})
    wire = request.SerializeToString(deterministic=True)
    assert [c.body for c in rec.calls[:2]] == [wire, wire]
    assert rec.calls[2].body == branch.SerializeToString(deterministic=True)
    assert pb.DtmRequest.FromString(rec.calls[3].body).RollbackReason == "r"
    assert client.new_gid() == "GID"


# -- asyncio twin ----------------------------------------------------------------------------------


def test_async_errors_and_rules(rec: Recorder) -> None:
    async def main() -> None:
        client = agrpc.AsyncDtmGrpcClient(rec.target, retry=FAST)
        rec.answers[SUBMIT] = [("ABORTED", "FAILURE", b"")]
        with pytest.raises(DtmFailure):
            await agrpc.Saga(client, "g1").add(rec.url("A"), "", PAYLOAD).submit()
        rec.answers[SUBMIT] = [("UNAVAILABLE", "service unavailable", b"")]
        s = agrpc.Saga(client, "g2").add(rec.url("A"), "", PAYLOAD)
        with pytest.raises(DtmTransportError):
            await s.submit()
        with pytest.raises(DtmInvalidInput):
            await s.submit()
        rec.answers["/busi.Busi/QueryPrepared"] = [("ABORTED", "x", b"")]
        msg = agrpc.Msg(client, "g3").add(rec.url("A"), PAYLOAD)
        with pytest.raises(RuntimeError):
            await msg.do_and_submit(rec.url("QueryPrepared"), _boom)
        refused = agrpc.AsyncDtmGrpcClient(f"127.0.0.1:{closed_port()}", timeout=2, retry=FAST)
        with pytest.raises(DtmConnectError):
            await refused.new_gid()
        await client.aclose()
        await refused.aclose()

    asyncio.run(main())
    assert rec.methods() == [SUBMIT, SUBMIT, PREPARE, "/busi.Busi/QueryPrepared", ABORT]


def test_async_tcc_branch_failure_aborts(rec: Recorder) -> None:
    rec.answers["/busi.Busi/Try"] = [("ABORTED", "insufficient balance", b"")]

    async def main() -> None:
        client = agrpc.AsyncDtmGrpcClient(rec.target)
        with pytest.raises(DtmFailure):
            async with agrpc.tcc_global_transaction(client, "g") as tcc:
                await tcc.call_branch(PAYLOAD, rec.url("Try"), rec.url("C"), rec.url("X"))
        await client.aclose()

    asyncio.run(main())
    assert rec.methods() == [PREPARE, "/dtmgimp.Dtm/RegisterBranch", "/busi.Busi/Try", ABORT]
    assert pb.DtmRequest.FromString(rec.calls[-1].body).RollbackReason == (
        "rpc error: code = Aborted desc = insufficient balance"
    )


def test_grpc_status_enum_names_cover_the_mapping() -> None:
    for name in ("ABORTED", "FAILED_PRECONDITION", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"):
        assert hasattr(grpc.StatusCode, name)
