"""Regression tests for the gRPC review (review-grpc: M1, M2, m1-m9) and for http(s) steps in gRPC sagas.

Each test names the finding it pins. They use the recorder (a grpcio server playing DTM and branches)
or pure functions; the two that need a coordinator use the ``dtm_grpc`` fixture (embedded, or a real
DTM with ``--dtm-grpc-server`` + ``--dtm-server``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("CI") != "true":
    pytest.importorskip("grpc")

import grpc
from google.protobuf import wrappers_pb2

sys.path.insert(0, os.path.dirname(__file__))
from grpc_recorder import Recorder

from dtmcli import (
    DtmConnectError,
    DtmFailure,
    DtmInvalidInput,
    DtmOngoing,
    DtmServerError,
    DtmTransportError,
)
from dtmcli.asyncio import grpc as agrpc
from dtmcli.grpc import DtmGrpcClient, Msg, Saga, Tcc, Xa, tcc_global_transaction
from dtmcli.grpc import server as gserver
from dtmcli.grpc._core import parse_reply
from dtmcli.grpc._io import channel_options, translate_rpc_error
from dtmcli.grpc._proto import method_path
from dtmcli.grpc._wire import (
    branch_metadata,
    branch_result,
    check_branch_headers,
    check_grpc_target,
    check_grpc_url,
    rpc_error,
    split_grpc_url,
)
from dtmcli.testing import DtmFacade
from dtmcli.testing._branch_client import is_grpc_url
from dtmcli.testing._grpc_branch import GrpcBranchCaller, grpc_answer

PAYLOAD = wrappers_pb2.Int64Value(value=30)
SUBMIT, PREPARE, NEW_GID = "/dtmgimp.Dtm/Submit", "/dtmgimp.Dtm/Prepare", "/dtmgimp.Dtm/NewGid"
PROTO_DIR = Path(__file__).resolve().parents[2] / "dtmcli" / "grpc" / "_proto"


@pytest.fixture
def rec() -> Any:
    with Recorder() as recorder:
        yield recorder


def saga(rec: Recorder, client: Any, gid: str = "gid1", **options: Any) -> Any:
    cls = agrpc.Saga if isinstance(client, agrpc.AsyncDtmGrpcClient) else Saga
    return cls(client, gid, **options).add(rec.url("TransOut"), rec.url("TransOutRevert"), PAYLOAD)


# -- M1: wait_result without a query is refused before sending ---------------------------------------


def test_m1_wait_result_without_http_refused_for_every_kind(rec: Recorder) -> None:
    client = DtmGrpcClient(rec.target)
    with pytest.raises(DtmInvalidInput, match="wait_result over gRPC needs"):
        Msg(client, "g1", wait_result=True).add(rec.url("A"), PAYLOAD).prepare(rec.url("Q"))
    with pytest.raises(DtmInvalidInput, match="wait_result over gRPC needs"):
        Msg(client, "g2", wait_result=True).add(rec.url("A"), PAYLOAD).submit()
    with pytest.raises(DtmInvalidInput, match="wait_result over gRPC needs"):
        tcc_global_transaction(client, "g3", lambda tcc: None, wait_result=True)
    assert rec.methods() == []
    tcc = Tcc(client, "g4")
    tcc.prepare()
    tcc.set_wait_result(True)  # allowed between prepare and submit: checked when submitting
    with pytest.raises(DtmInvalidInput, match="wait_result over gRPC needs"):
        tcc.submit()
    assert rec.methods() == [PREPARE]


def test_m1_async_wait_result_without_http_refused(rec: Recorder) -> None:
    async def main() -> None:
        async with agrpc.AsyncDtmGrpcClient(rec.target) as client:
            with pytest.raises(DtmInvalidInput, match="wait_result over gRPC needs"):
                await saga(rec, client, wait_result=True).submit()

    asyncio.run(main())
    assert rec.methods() == []


def test_m1_wait_result_with_http_still_allowed(rec: Recorder) -> None:
    """With http= an Aborted answer is settled by a query (test_grpc_client: DtmInProgress, as over HTTP)."""
    client = DtmGrpcClient(rec.target, http="http://127.0.0.1:1/api/dtmsvr")
    saga(rec, client, wait_result=True).submit()  # the recorder answers OK: no query needed
    assert rec.methods() == [SUBMIT]


# -- M2: the aio interceptor when grpc.aio's context.code() is the int 0 (grpcio 1.59) -------------


class _Ctx:
    def __init__(self, code: Any) -> None:
        self._code = code

    def code(self) -> Any:
        return self._code


@pytest.mark.parametrize(
    ("code", "kept"),
    [(None, False), (0, False), (grpc.StatusCode.OK, False), (10, True), (grpc.StatusCode.ABORTED, True)],
)
def test_m2_code_zero_is_not_a_status_set_by_the_handler(code: Any, kept: bool) -> None:
    assert gserver._aborted_by_handler(DtmFailure("no"), _Ctx(code)) is kept


# -- http(s) steps in a gRPC saga (DTM calls any http(s) URL over HTTP) --------------------------------


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8081/api/busi/TransIn", "http://127.0.0.1:8081/TransIn", "https://busi.example/TransIn",
     "http://busi:8081/a/b/c/TransIn"],
)
def test_http_steps_accepted_where_dtm_calls_them(rec: Recorder, url: str) -> None:
    client = DtmGrpcClient(rec.target)
    Saga(client, "g1").add(rec.url("TransOut"), "", PAYLOAD).add(url, url, b"{}").submit()
    Msg(client, "g2").add(url, b"{}").submit()
    assert rec.methods() == [SUBMIT, SUBMIT]
    assert url.encode() in rec.calls[0].body and url.encode() in rec.calls[1].body
    tcc = Tcc(client, "g3")
    tcc.prepare()
    tcc.call_branch(PAYLOAD, rec.url("Try"), url, url)  # confirm/cancel: DTM calls them
    # the client itself calls a try, an XA action and query_prepared over gRPC: http is refused there
    with pytest.raises(DtmInvalidInput):
        tcc.call_branch(PAYLOAD, url, "", "")
    with pytest.raises(DtmInvalidInput):
        Xa(client, "g4").call_branch(PAYLOAD, url)
    with pytest.raises(DtmInvalidInput):
        Msg(client, "g5").add(rec.url("A"), PAYLOAD).prepare(url)


def test_http_steps_refuse_bad_http_urls(rec: Recorder) -> None:
    with pytest.raises(DtmInvalidInput):
        Saga(DtmGrpcClient(rec.target), "g1").add("http://", "", PAYLOAD)
    with pytest.raises(DtmInvalidInput):
        Saga(DtmGrpcClient(rec.target), "g1").add("http://h:1/a b", "", PAYLOAD)


# -- m1: UNAVAILABLE is "nothing sent" only from client-side facts -------------------------------------


def test_m1_peer_sent_connect_text_is_not_a_connect_error(rec: Recorder) -> None:
    """A proxy in front of DTM forwarded the Submit, then answered UNAVAILABLE with grpc-core-like text."""
    rec.answers[SUBMIT] = [("UNAVAILABLE", "failed to connect to all addresses; last error: Connection refused", b""),
                           ("OK", "", b"")]
    trans = saga(rec, DtmGrpcClient(rec.target))
    with pytest.raises(DtmTransportError) as info:
        trans.submit()
    assert not isinstance(info.value, DtmConnectError)
    with pytest.raises(DtmInvalidInput, match="already submitted"):
        trans.submit()
    assert rec.methods() == [SUBMIT]


def test_m1_peer_sent_connect_text_async(rec: Recorder) -> None:
    rec.answers[SUBMIT] = [("UNAVAILABLE", "failed to connect to all addresses", b"")]

    async def main() -> None:
        async with agrpc.AsyncDtmGrpcClient(rec.target) as client:
            with pytest.raises(DtmTransportError) as info:
                await saga(rec, client).submit()
            assert not isinstance(info.value, DtmConnectError)

    asyncio.run(main())


# -- m2: grpc-core retries are always off on the channels the SDK opens ------------------------------


RETRY_POLICY = json.dumps({"methodConfig": [{"name": [{}], "retryPolicy": {
    "maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "0.1s", "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"]}}]})


def test_m2_channel_options_turn_retries_off() -> None:
    assert channel_options(())[-1] == ("grpc.enable_retries", 0)
    assert channel_options([("grpc.service_config", "{}")])[-1] == ("grpc.enable_retries", 0)
    with pytest.raises(DtmInvalidInput, match="enable_retries"):
        channel_options([("grpc.enable_retries", 1)])
    with pytest.raises(DtmInvalidInput, match="enable_retries"):
        DtmGrpcClient("127.0.0.1:1", options=[("grpc.enable_retries", 1)])
    with pytest.raises(DtmInvalidInput, match="enable_retries"):
        agrpc.AsyncDtmGrpcClient("127.0.0.1:1", options=[("grpc.enable_retries", 1)])


def test_m2_a_service_config_retry_policy_never_resends_submit(rec: Recorder) -> None:
    rec.answers[SUBMIT] = [("UNAVAILABLE", "upstream reset", b""), ("OK", "", b"")]
    client = DtmGrpcClient(rec.target, options=[("grpc.service_config", RETRY_POLICY)])
    with pytest.raises(DtmTransportError):
        saga(rec, client).submit()
    assert rec.methods() == [SUBMIT]


def test_m2_a_service_config_retry_policy_never_resends_submit_async(rec: Recorder) -> None:
    rec.answers[SUBMIT] = [("UNAVAILABLE", "upstream reset", b""), ("OK", "", b"")]

    async def main() -> None:
        async with agrpc.AsyncDtmGrpcClient(rec.target, options=[("grpc.service_config", RETRY_POLICY)]) as client:
            with pytest.raises(DtmTransportError):
                await saga(rec, client).submit()

    asyncio.run(main())
    assert rec.methods() == [SUBMIT]


# -- m3: branch headers are checked as gRPC metadata before anything is sent -------------------------


@pytest.mark.parametrize(
    ("headers", "match"),
    [({"x-user": "José"}, "printable ASCII"), ({"x-trace-bin": "abc"}, "-bin"), ({"dtm-op": "cancel"}, "reserved"),
     ({"DTM-DTM": "evil:1"}, "reserved"), ({"grpc-timeout": "1S"}, "reserved"), ({"x user": "a"}, "metadata key"),
     ({"x-a": "1", "X-A": "2"}, "twice"), ({"x-a": "line\nbreak"}, "printable ASCII")],
)
def test_m3_bad_branch_headers_refused_before_sending(rec: Recorder, headers: dict[str, str], match: str) -> None:
    client = DtmGrpcClient(rec.target)
    with pytest.raises(DtmInvalidInput):  # some are refused already as HTTP headers by the options
        saga(rec, client).set_branch_headers(headers).submit()
    with pytest.raises(DtmInvalidInput):
        Tcc(client, "g2", branch_headers=headers).prepare()
    with pytest.raises(DtmInvalidInput, match=match):  # a raw body: only the gRPC check
        client.submit({"gid": "g3", "trans_type": "saga", "branch_headers": headers})
    assert rec.methods() == []


def test_m3_good_branch_headers_go_lower_cased_as_metadata(rec: Recorder) -> None:
    assert check_branch_headers({"X-User": "ann", "traceparent": "00-ab-cd-01"}) == {
        "x-user": "ann", "traceparent": "00-ab-cd-01"}
    with pytest.raises(DtmInvalidInput):  # the metadata of a client-made branch call is checked too
        branch_metadata("g", "tcc", "01", "try", "dtm:1", {"x-user": "José"})
    tcc = Tcc(DtmGrpcClient(rec.target), "g1", branch_headers={"X-User": "ann"})
    tcc.prepare()
    tcc.call_branch(PAYLOAD, rec.url("Try"), "", "")
    assert rec.calls[-1].metadata["x-user"] == "ann"


def test_m3_non_rpc_errors_of_a_made_call_may_have_been_sent() -> None:
    """(N2 of review grpc2) Whatever a call raises once handed to grpc may come after sending: only
    dtmcli's own checks before the call mean "nothing sent"."""
    for exc in (TypeError("bad metadata"), ValueError("x"), KeyError("x")):
        err = translate_rpc_error(exc, "dtm Submit")
        assert type(err) is DtmTransportError and "may have been sent" in err.message


# -- m4: resolver-scheme branch URLs are refused (DTM's default driver calls host:port only) ----------


def test_m4_resolver_scheme_urls_refused_everywhere() -> None:
    for url in ("dns:///busi:8081/busi.Busi/TransIn", "unix:///tmp/s/busi.Busi/TransIn",
                "ipv4:127.0.0.1:1/busi.Busi/TransIn"):
        with pytest.raises(DtmInvalidInput):
            check_grpc_url(url, "url")
        with pytest.raises(DtmInvalidInput):
            split_grpc_url(url)
        assert not is_grpc_url(url)  # the embedded coordinator refuses it at submit
        caller = GrpcBranchCaller()
        answer = caller.call("POST", url, {"gid": "g"}, b"", {}, 1.0)
        assert answer.status == 0 and not caller._channels  # an error answer; no channel to "dns:"
    assert split_grpc_url("busi:8081/busi.Busi/TransIn") == ("busi:8081", "/busi.Busi/TransIn")
    assert check_grpc_target("dns:///dtm:36790") == "dns:///dtm:36790"  # the client's own channel may
    with pytest.raises(DtmInvalidInput, match="not a URL"):
        check_grpc_target("http://evil/api")
    with pytest.raises(DtmInvalidInput):
        check_grpc_target("https://evil:443/")


# -- m5: closing the shared client of a target does not poison it -------------------------------------


def test_m5_shared_client_recovers_after_close(rec: Recorder) -> None:
    shared = DtmGrpcClient.for_target(rec.target)
    try:
        shared.close()
        assert shared.new_gid() == "GID"
        Saga(rec.target, "g1").add(rec.url("A"), "", PAYLOAD).submit()  # a target string: the shared client
        DtmGrpcClient.close_shared(rec.target)
        assert DtmGrpcClient.for_target(rec.target) is not shared
        with pytest.raises(DtmInvalidInput, match="closed"):
            shared.new_gid()  # close_shared() really closes it (shutdown)
    finally:
        DtmGrpcClient.close_shared(rec.target)
    own = DtmGrpcClient(rec.target)
    own.close()
    with pytest.raises(DtmInvalidInput, match="closed"):
        own.new_gid()  # a client you made and closed stays closed


def test_m5_async_shared_client_recovers_and_given_channel_checks_closed(rec: Recorder) -> None:
    async def main() -> None:
        shared = agrpc.AsyncDtmGrpcClient.for_target(rec.target)
        await shared.aclose()
        assert await shared.new_gid() == "GID"
        await shared.aclose()
        agrpc.AsyncDtmGrpcClient.close_shared(rec.target)
        async with grpc.aio.insecure_channel(rec.target) as channel:
            own = agrpc.AsyncDtmGrpcClient(rec.target, channel=channel)
            assert await own.new_gid() == "GID"
            await own.aclose()
            with pytest.raises(DtmInvalidInput, match="closed"):
                await own.new_gid()

    asyncio.run(main())


# -- m6: our proto package does not clash with an app's own dtmgimp module ----------------------------

_USER_PROTO = """
from google.protobuf import descriptor_pb2, descriptor_pool
fdp = descriptor_pb2.FileDescriptorProto(name="dtmgimp/dtmgimp.proto", package="dtmgimp", syntax="proto3")
for name in ("DtmTransOptions", "DtmRequest", "DtmGidReply", "DtmBranchRequest"):
    fdp.message_type.add(name=name)
fdp.service.add(name="Dtm")
descriptor_pool.Default().Add(fdp)     # the app's own dtmgimp_pb2, generated from DTM's .proto
import dtmcli.grpc, dtmcli.asyncio.grpc
from dtmcli.grpc._proto import dtmgimp_pb2, method_path
print(dtmgimp_pb2.DtmRequest.DESCRIPTOR.full_name, method_path("Submit"))
"""


def test_m6_an_apps_own_dtmgimp_module_loads_beside_dtmcli() -> None:
    out = subprocess.run([sys.executable, "-c", _USER_PROTO], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["dtmcli.dtmgimp.DtmRequest", "/dtmgimp.Dtm/Submit"]
    assert method_path("Submit") == SUBMIT  # the wire name is DTM's


# -- m7: no warning at import whatever the protobuf runtime ------------------------------------------


def test_m7_gencode_has_no_runtime_version_check() -> None:
    for name in ("dtmgimp_pb2.py", "workflow_pb2.py"):
        assert "ValidateProtobufRuntimeVersion" not in (PROTO_DIR / name).read_text()


def test_m7_imports_under_w_error() -> None:
    code = "import dtmcli.grpc, dtmcli.grpc.server, dtmcli.asyncio.grpc, dtmcli.testing._grpc"
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


# -- m9: typed errors, async query_status, one ABORTED/ONGOING rule -------------------------------------


@pytest.mark.parametrize(
    ("code", "details"),
    [(grpc.StatusCode.OK, ""), (grpc.StatusCode.ABORTED, "no money"), (grpc.StatusCode.ABORTED, "ONGOING"),
     (grpc.StatusCode.ABORTED, "x ONGOING y"), (grpc.StatusCode.FAILED_PRECONDITION, "later"),
     (grpc.StatusCode.UNAVAILABLE, "down"), (grpc.StatusCode.INTERNAL, "boom")],
)
def test_m9_client_and_coordinator_read_statuses_alike(code: grpc.StatusCode, details: str) -> None:
    result = branch_result(code.name, details)
    http = {"SUCCESS": 200, "FAILURE": 409, "ONGOING": 425, None: 0}[result]
    assert grpc_answer(code, details).status == http
    if code != grpc.StatusCode.OK:
        err = rpc_error(code.name, details, where="u")
        expected = {"FAILURE": DtmFailure, "ONGOING": DtmOngoing}.get(str(result))
        if expected is not None:
            assert type(err) is expected
        else:
            assert not isinstance(err, (DtmFailure, DtmOngoing))


def test_m9_reply_errors_are_typed(rec: Recorder) -> None:
    with pytest.raises(DtmServerError, match="Int64Value"):
        parse_reply(b"\xff\xff\xff", wrappers_pb2.Int64Value, url="h:1/a.B/C")
    client = DtmGrpcClient(rec.target)
    tcc = Tcc(client, "g1")
    tcc.prepare()
    with pytest.raises(DtmInvalidInput, match="reply must be"):
        tcc.call_branch(PAYLOAD, rec.url("Try"), "", "", reply="Int64Value")  # type: ignore[arg-type]
    with pytest.raises(DtmInvalidInput, match="busi_payload must be bytes"):
        client.register_branch({"gid": "g1", "trans_type": "tcc", "branch_id": "01", "busi_payload": "text"})
    with pytest.raises(DtmInvalidInput, match="submit"):
        client.submit({"gid": "g1", "trans_type": "saga", "timeout_to_fail": "soon"})
    assert rec.methods() == [PREPARE]


def test_m9_async_query_status(dtm_grpc: DtmFacade) -> None:
    assert dtm_grpc.grpc_target is not None

    async def main() -> None:
        async with agrpc.AsyncDtmGrpcClient(dtm_grpc.grpc_target, http=dtm_grpc.url) as client:
            gid = await client.new_gid()
            msg = agrpc.Msg(client, gid).add(f"{dtm_grpc.grpc_target}/no.Such/Method", b"")
            await msg.prepare(f"{dtm_grpc.grpc_target}/no.Such/Query")
            assert await client.query_status(gid) == "prepared"
            assert await client.query_status("no-such-gid-x") is None
            await msg.abort()
            assert await client.query_status(gid) in ("aborting", "failed")
        async with agrpc.AsyncDtmGrpcClient(dtm_grpc.grpc_target) as bare:
            with pytest.raises(DtmInvalidInput, match="no query"):
                await bare.query_status(gid)

    asyncio.run(main())
