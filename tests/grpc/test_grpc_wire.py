"""The gRPC client on the wire: every message sent to dtmgimp.Dtm and every client-made branch call,
pinned byte for byte against the Go client's recorded messages (tests/data/traces/grpc_goclient_*.json).

A grpcio server in the test process plays DTM and the branch services and answers as the trace's DTM
and branches did; the scenario is driven with the dtmcli.grpc builders (and their asyncio twins), and
the recorded calls, normalised as the trace files were (address -> 127.0.0.1:PORT, deterministic
encoding), must equal the trace's: same methods in the same order, same request bytes, same metadata.

Deliberate differences, not compared: the client sets a deadline (its ``timeout``) on the branch calls
it makes, where Go sets none; and its query_prepared call uses grpc's default content type rather
than Go's raw codec name (the bytes are the same: an empty message).
"""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from typing import Any, Callable

import pytest

if os.environ.get("CI") != "true":
    pytest.importorskip("grpc")

import grpc
from google.protobuf import empty_pb2, wrappers_pb2

sys.path.insert(0, os.path.dirname(__file__))
from grpc_recorder import Recorder, expected, normalised, script_from_trace

from dtmcli import DtmFailure
from dtmcli.asyncio import grpc as agrpc
from dtmcli.grpc import DtmGrpcClient, Msg, Saga, Tcc, tcc_global_transaction
from dtmcli.grpc._proto import dtmgimp_pb2 as pb
from dtmcli.grpc._wire import dtm_request, go_json, success_response

AMOUNT_30 = wrappers_pb2.Int64Value(value=30)  # the same bytes as busi.ReqGrpc{Amount: 30}: 08 1e
AMOUNT_40 = base64.b64decode("CCg=")  # busi.ReqGrpc{Amount: 40} as bytes
AMOUNT_50 = base64.b64decode("CDI=")


def replay(name: str, scenario: Callable[[Recorder, Any], None], *, aio: bool = False) -> Recorder:
    """Run ``scenario(recorder, client)`` against a recorder answering as trace ``name``; check the calls."""
    with Recorder() as rec:
        script_from_trace(rec, name)
        if aio:
            async def main() -> None:
                client = agrpc.AsyncDtmGrpcClient(rec.target)
                try:
                    await scenario(rec, client)  # type: ignore[func-returns-value]
                finally:
                    await client.aclose()

            asyncio.run(main())
        else:
            with DtmGrpcClient(rec.target) as client:
                scenario(rec, client)
        got = [normalised(c, rec.target) for c in rec.calls]
    assert got == expected(name)
    return rec


# -- saga ------------------------------------------------------------------------------------------


def saga_scenario(rec: Recorder, client: DtmGrpcClient, **options: Any) -> None:
    saga = Saga(client, client.new_gid(), **options)
    saga.add(rec.url("TransOut"), rec.url("TransOutRevert"), AMOUNT_30)
    saga.add(rec.url("TransIn"), rec.url("TransInRevert"), AMOUNT_40)
    saga.submit()


@pytest.mark.parametrize("name", ["grpc_goclient_saga_success", "grpc_goclient_saga_action_aborted"])
def test_saga_submit_matches_go(name: str) -> None:
    replay(name, saga_scenario)


def test_saga_branch_headers_match_go() -> None:
    headers = {"X-Trace-Id": "trace-123", "authorization": "Bearer token-abc", "x-tenant": "t1"}
    replay("grpc_branch_headers", lambda rec, c: saga_scenario(rec, c, branch_headers=headers))


def test_saga_retry_interval_matches_go() -> None:
    def scenario(rec: Recorder, client: DtmGrpcClient) -> None:
        for _ in range(6):  # NewGid answers GID, GID2, ... as recorded
            Saga(client, client.new_gid(), retry_interval=1).add(
                rec.url("TransOut"), rec.url("TransOutRevert"), AMOUNT_30
            ).submit()

    replay("grpc_branch_status_codes", scenario)


def test_async_saga_matches_go() -> None:
    async def scenario(rec: Recorder, client: agrpc.AsyncDtmGrpcClient) -> None:
        saga = agrpc.Saga(client, await client.new_gid())
        saga.add(rec.url("TransOut"), rec.url("TransOutRevert"), AMOUNT_30)
        saga.add(rec.url("TransIn"), rec.url("TransInRevert"), AMOUNT_40)
        await saga.submit()

    replay("grpc_goclient_saga_success", scenario, aio=True)


# -- msg -------------------------------------------------------------------------------------------


def test_msg_prepare_submit_matches_go() -> None:
    def scenario(rec: Recorder, client: DtmGrpcClient) -> None:
        msg = Msg(client, client.new_gid()).add(rec.url("TransOut"), AMOUNT_30).add(rec.url("TransIn"), AMOUNT_40)
        msg.prepare(rec.url("QueryPrepared"))
        msg.submit()

    replay("grpc_goclient_msg_prepare_submit", scenario)


def test_msg_prepare_with_options_matches_go() -> None:
    def scenario(rec: Recorder, client: DtmGrpcClient) -> None:
        msg = Msg(client, client.new_gid(), retry_interval=1)
        msg.add(rec.url("TransOut"), AMOUNT_30).add(rec.url("TransIn"), AMOUNT_40)
        msg.prepare(rec.url("QueryPrepared"))

    replay("grpc_goclient_msg_query_prepared", scenario)


# -- tcc -------------------------------------------------------------------------------------------


def tcc_branches(rec: Recorder, tcc: Tcc) -> None:
    tcc.call_branch(AMOUNT_30, rec.url("TransOutTcc"), rec.url("TransOutConfirm"), rec.url("TransOutRevert"))
    tcc.call_branch(AMOUNT_40, rec.url("TransInTcc"), rec.url("TransInConfirm"), rec.url("TransInRevert"))


def test_tcc_matches_go() -> None:
    def scenario(rec: Recorder, client: DtmGrpcClient) -> None:
        with tcc_global_transaction(client, client.new_gid()) as tcc:
            tcc_branches(rec, tcc)

    rec = replay("grpc_goclient_tcc_success", scenario)
    tries = [c for c in rec.calls if c.kind == "client->branch"]
    assert all(c.time_remaining is not None for c in tries)  # deliberate: a deadline, where Go sets none


def test_tcc_try_aborted_aborts_with_gos_reason() -> None:
    def scenario(rec: Recorder, client: DtmGrpcClient) -> None:
        with pytest.raises(DtmFailure) as info:
            with tcc_global_transaction(client, client.new_gid()) as tcc:
                tcc_branches(rec, tcc)
        assert info.value.message == "rpc error: code = Aborted desc = insufficient balance"
        assert info.value.branch_id == "02"

    replay("grpc_goclient_tcc_try_aborted", scenario)


def test_nested_tcc_from_grpc_metadata_matches_go() -> None:
    def scenario(rec: Recorder, client: DtmGrpcClient) -> None:
        def nested_try(body: bytes, context: grpc.ServicerContext) -> bytes:
            nested = Tcc.from_grpc(context)
            assert (nested.gid, nested.dtm, nested.nested) == ("GID", rec.target, True)
            nested.call_branch(AMOUNT_50, rec.url("TransInTcc"), rec.url("TransInConfirm"), rec.url("TransInRevert"))
            return b""

        rec.handlers["/busi.Busi/TransInTccNested"] = nested_try
        with tcc_global_transaction(client, client.new_gid()) as tcc:
            tcc.call_branch(AMOUNT_30, rec.url("TransOutTcc"), rec.url("TransOutConfirm"), rec.url("TransOutRevert"))
            tcc.call_branch(AMOUNT_40, rec.url("TransInTccNested"), rec.url("TransInConfirm"), rec.url("TransInRevert"))

    replay("grpc_goclient_tcc_nested", scenario)


def test_async_tcc_matches_go() -> None:
    async def scenario(rec: Recorder, client: agrpc.AsyncDtmGrpcClient) -> None:
        async with agrpc.tcc_global_transaction(client, await client.new_gid()) as tcc:
            await tcc.call_branch(AMOUNT_30, rec.url("TransOutTcc"), rec.url("TransOutConfirm"),
                                  rec.url("TransOutRevert"))
            await tcc.call_branch(AMOUNT_40, rec.url("TransInTcc"), rec.url("TransInConfirm"),
                                  rec.url("TransInRevert"))

    replay("grpc_goclient_tcc_success", scenario, aio=True)


# -- pure encoding ---------------------------------------------------------------------------------


def test_steps_are_gos_json_text() -> None:
    assert go_json(None) == "null"
    assert go_json([{"compensate": "a<b>&c", "action": "x\u2028é"}]) == (
        '[{"action":"x\\u2028é","compensate":"a\\u003cb\\u003e\\u0026c"}]'
    )


def test_dtm_request_always_carries_trans_options() -> None:
    wire = dtm_request({"gid": "GID", "trans_type": "tcc"}).SerializeToString(deterministic=True)
    assert wire == pb.DtmRequest(
        Gid="GID", TransType="tcc", TransOptions=pb.DtmTransOptions(), Steps="null"
    ).SerializeToString(deterministic=True)
    assert b"\x1a\x00" in wire  # the empty TransOptions is on the wire, as Go sends it


def test_replies_read_as_the_http_answers() -> None:
    assert success_response(empty_pb2.Empty()).json() == {"dtm_result": "SUCCESS"}
    assert success_response(pb.DtmGidReply(Gid="g")).json() == {"dtm_result": "SUCCESS", "gid": "g"}
    reply = pb.DtmProgressesReply(
        Transaction=pb.DtmTransaction(Gid="g", Status="prepared"),
        Progresses=[pb.DtmProgress(Status="succeed", BinData=b"ok", BranchID="01", Op="action")],
    )
    assert success_response(reply).json() == {
        "dtm_result": "SUCCESS",
        "transaction": {"gid": "g", "status": "prepared", "rollback_reason": "", "result": ""},
        "progresses": [{"status": "succeed", "bin_data": "b2s=", "branch_id": "01", "op": "action"}],
    }
