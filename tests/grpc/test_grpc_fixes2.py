"""Regression tests for the second gRPC review (review-grpc2: N1-N10).

Each test names the finding it pins. They use the recorder (a grpcio server playing DTM and branches),
fake channels (for states a real channel reaches only by a race), or pure functions.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

if os.environ.get("CI") != "true":
    pytest.importorskip("grpc")

import grpc
import grpc.aio
from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2, message_factory, wrappers_pb2
from google.protobuf.descriptor import FieldDescriptor

sys.path.insert(0, os.path.dirname(__file__))
from grpc_recorder import Recorder

from dtmcli import (
    DtmConnectError,
    DtmConnectTimeout,
    DtmFailure,
    DtmInProgress,
    DtmInvalidInput,
    DtmTransportError,
)
from dtmcli._flow import Flow
from dtmcli._models import Transaction
from dtmcli.asyncio import grpc as agrpc
from dtmcli.grpc import DtmGrpcClient, Saga, tcc_global_transaction, xa_global_transaction
from dtmcli.grpc._io import serialize
from dtmcli.grpc._proto import dtmgimp_pb2 as pb
from dtmcli.grpc._wire import check_grpc_url, dtm_branch_request, dtm_request, success_response

PAYLOAD = wrappers_pb2.Int64Value(value=30)
DTM = "/dtmgimp.Dtm/"
SUBMIT, PREPARE, ABORT, REGISTER = DTM + "Submit", DTM + "Prepare", DTM + "Abort", DTM + "RegisterBranch"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
HAS_CANCELLING = hasattr(asyncio.Task, "cancelling")


@pytest.fixture
def rec() -> Any:
    with Recorder() as recorder:
        yield recorder


def saga(rec: Recorder, client: Any, gid: str = "gid1", **options: Any) -> Any:
    cls = agrpc.Saga if isinstance(client, agrpc.AsyncDtmGrpcClient) else Saga
    return cls(client, gid, **options).add(rec.url("TransOut"), rec.url("TransOutRevert"), PAYLOAD)


def slow_submit(rec: Recorder, seconds: float = 0.5) -> None:
    def handler(body: bytes, context: Any) -> bytes:
        time.sleep(seconds)
        return b""

    rec.handlers[SUBMIT] = handler


def wait_for_calls(rec: Recorder, n: int) -> None:
    deadline = time.monotonic() + 5
    while len(rec.dtm_calls()) < n:
        assert time.monotonic() < deadline, rec.methods()
        time.sleep(0.01)


# -- N1: closing a shared client never breaks other threads' and tasks' calls in flight ---------------


def test_n1_closing_the_shared_client_keeps_calls_in_flight(rec: Recorder) -> None:
    slow_submit(rec)
    outcome: dict[str, Any] = {}

    def submit() -> None:
        try:
            Saga(rec.target, "g1").add(rec.url("A"), "", PAYLOAD).submit()  # the shared client of the target
            outcome["r"] = "ok"
        except Exception as exc:
            outcome["r"] = exc

    try:
        thread = threading.Thread(target=submit)
        thread.start()
        wait_for_calls(rec, 1)  # the Submit is at DTM, its answer pending
        with DtmGrpcClient.for_target(rec.target) as other:  # another request handler's `with`
            other.new_gid()
        DtmGrpcClient.for_target(rec.target).close()
        thread.join(10)
        assert outcome["r"] == "ok"
        assert DtmGrpcClient.for_target(rec.target).new_gid() == "GID"  # still usable
    finally:
        DtmGrpcClient.close_shared(rec.target)


def test_n1_many_calls_while_another_thread_keeps_closing_the_shared_client(rec: Recorder) -> None:
    slow_submit(rec, 0.05)
    stop = threading.Event()
    results: list[Any] = []

    def closer() -> None:
        while not stop.is_set():
            DtmGrpcClient.for_target(rec.target).close()
            time.sleep(0.001)

    def submit(i: int) -> None:
        try:
            Saga(rec.target, f"g{i}").add(rec.url("A"), "", PAYLOAD).submit()
            results.append("ok")
        except Exception as exc:
            results.append(exc)

    try:
        closing = threading.Thread(target=closer)
        closing.start()
        threads = [threading.Thread(target=submit, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        stop.set()
        closing.join(5)
        assert results == ["ok"] * 10
        assert len(rec.dtm_calls()) == 10
    finally:
        stop.set()
        DtmGrpcClient.close_shared(rec.target)


def test_n1_async_closing_the_shared_client_keeps_calls_in_flight(rec: Recorder) -> None:
    slow_submit(rec)

    async def main() -> None:
        task = asyncio.ensure_future(agrpc.Saga(rec.target, "g1").add(rec.url("A"), "", PAYLOAD).submit())
        while not rec.dtm_calls():
            await asyncio.sleep(0.01)
        async with agrpc.AsyncDtmGrpcClient.for_target(rec.target) as other:
            await other.new_gid()
        await task  # no CancelledError, no error: the shared channels stayed open

    try:
        asyncio.run(main())
    finally:
        agrpc.AsyncDtmGrpcClient.close_shared(rec.target)


@pytest.mark.skipif(not HAS_CANCELLING, reason="Task.cancelling() (Python 3.11+) tells who cancelled")
def test_n1_async_own_client_closed_mid_call_is_a_transport_error_not_a_cancel(rec: Recorder) -> None:
    slow_submit(rec)

    async def main() -> None:
        client = agrpc.AsyncDtmGrpcClient(rec.target)
        trans = agrpc.Saga(client, "g1").add(rec.url("A"), "", PAYLOAD)
        task = asyncio.ensure_future(trans.submit())
        while not rec.dtm_calls():
            await asyncio.sleep(0.01)
        await client.aclose()
        with pytest.raises(DtmTransportError, match="closed during the call") as info:
            await task
        assert not isinstance(info.value, DtmConnectError)  # it was sent: never resent
        assert not task.cancelled()

    asyncio.run(main())


def test_n1_async_a_real_cancel_still_cancels(rec: Recorder) -> None:
    slow_submit(rec)

    async def main() -> None:
        async with agrpc.AsyncDtmGrpcClient(rec.target) as client:
            task = asyncio.ensure_future(agrpc.Saga(client, "g1").add(rec.url("A"), "", PAYLOAD).submit())
            while not rec.dtm_calls():
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


# -- N2: an error raised once the call was handed to grpc is "maybe sent" ----------------------------


class _FailAfterSending(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)  # the call went out
        int(outcome.code().name)  # a bug in a metrics interceptor: ValueError
        return outcome


def test_n2_an_interceptor_failing_after_sending_is_maybe_sent(rec: Recorder) -> None:
    raw = grpc.insecure_channel(rec.target, options=[("grpc.enable_retries", 0)])
    client = DtmGrpcClient(rec.target, channel=grpc.intercept_channel(raw, _FailAfterSending()))
    trans = saga(rec, client, "gid-ve")
    with pytest.raises(DtmTransportError, match="may have been sent") as info:
        trans.submit()
    assert not isinstance(info.value, (DtmConnectError, DtmInvalidInput))
    with pytest.raises(DtmInvalidInput, match="already submitted"):
        trans.submit()  # never a second Submit
    assert rec.methods() == [SUBMIT]
    raw.close()


class _AioFailAfterSending(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        call = await continuation(details, request)
        await call
        raise TypeError("a bug after the call")


def test_n2_async_an_interceptor_failing_after_sending_is_maybe_sent(rec: Recorder) -> None:
    async def main() -> None:
        async with grpc.aio.insecure_channel(rec.target, interceptors=[_AioFailAfterSending()]) as channel:
            trans = agrpc.Saga(agrpc.AsyncDtmGrpcClient(rec.target, channel=channel), "g1").add(
                rec.url("A"), "", PAYLOAD)
            with pytest.raises(DtmTransportError, match="may have been sent"):
                await trans.submit()
            with pytest.raises(DtmInvalidInput, match="already submitted"):
                await trans.submit()

    asyncio.run(main())
    assert rec.methods() == [SUBMIT]


# -- N3: "nothing sent" is a fact about the channel before the call, never read from error text -------

READY, TF, IDLE, CONNECTING = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                               grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING)


class _Unavailable(grpc.RpcError):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused"


class _FakeCore:
    def __init__(self, owner: FakeChannel) -> None:
        self.owner = owner

    def check_connectivity_state(self, try_to_connect: bool) -> int:
        return int(self.owner.state().value[0])


class FakeChannel:
    """A blocking channel whose state is scripted: ``before`` until a call is made, ``after`` then;
    ``watch`` are the states a subscriber sees; calls fail with ``error`` (or answer Empty)."""

    def __init__(self, before: grpc.ChannelConnectivity, after: Optional[grpc.ChannelConnectivity] = None,
                 watch: tuple[grpc.ChannelConnectivity, ...] = (), error: Optional[Exception] = None) -> None:
        self.before, self.after, self.watch, self.error = before, after or before, watch, error
        self.calls = 0
        self._channel = _FakeCore(self)

    def state(self) -> grpc.ChannelConnectivity:
        return self.after if self.calls else self.before

    def unary_unary(self, path: str, request_serializer: Any = None, response_deserializer: Any = None) -> Any:
        def call(message: Any, timeout: Any = None, metadata: Any = None) -> Any:
            self.calls += 1
            if self.error is not None:
                raise self.error
            return empty_pb2.Empty()

        return call

    def subscribe(self, callback: Callable[[Any], None], try_to_connect: bool = False) -> None:
        def deliver() -> None:
            for state in self.watch:
                time.sleep(0.01)
                callback(state)

        threading.Thread(target=deliver, daemon=True).start()

    def unsubscribe(self, callback: Any) -> None:
        pass


def test_n3_grpc_core_text_after_the_call_was_made_is_maybe_sent() -> None:
    """The m1 race: READY when the Submit is made, disconnected when its error is read. The error's
    text is grpc-core's own "could not connect", but the call was made: maybe sent."""
    channel = FakeChannel(READY, TF, error=_Unavailable())
    trans = Saga(DtmGrpcClient("127.0.0.1:1", channel=channel), "g1").add("h:1/a.B/C", "", PAYLOAD)
    with pytest.raises(DtmTransportError) as info:
        trans.submit()
    assert not isinstance(info.value, DtmConnectError)
    with pytest.raises(DtmInvalidInput, match="already submitted"):
        trans.submit()
    assert channel.calls == 1


def test_n3_no_connection_means_the_call_is_never_made() -> None:
    channel = FakeChannel(TF, error=_Unavailable())
    trans = Saga(DtmGrpcClient("127.0.0.1:1", channel=channel), "g1").add("h:1/a.B/C", "", PAYLOAD)
    with pytest.raises(DtmConnectError, match="could not connect"):
        trans.submit()
    assert channel.calls == 0
    channel.before = READY
    channel.error = None
    trans.submit()  # nothing was sent: the same saga may be submitted again
    assert channel.calls == 1


def test_n3_waits_for_ready_within_the_deadline() -> None:
    channel = FakeChannel(IDLE, READY, watch=(IDLE, CONNECTING, READY))
    Saga(DtmGrpcClient("127.0.0.1:1", channel=channel), "g1").add("h:1/a.B/C", "", PAYLOAD).submit()
    assert channel.calls == 1
    stuck = FakeChannel(CONNECTING, watch=(CONNECTING,))
    client = DtmGrpcClient("127.0.0.1:1", channel=stuck, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(DtmConnectTimeout):
        Saga(client, "g2").add("h:1/a.B/C", "", PAYLOAD).submit()
    assert stuck.calls == 0 and time.monotonic() - start < 2
    failing = FakeChannel(IDLE, watch=(CONNECTING, TF))
    with pytest.raises(DtmConnectError):
        Saga(DtmGrpcClient("127.0.0.1:1", channel=failing), "g3").add("h:1/a.B/C", "", PAYLOAD).submit()
    assert failing.calls == 0


class FakeAioChannel:
    def __init__(self, before: grpc.ChannelConnectivity, after: grpc.ChannelConnectivity) -> None:
        self.before, self.after, self.calls = before, after, 0

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.after if self.calls else self.before

    def unary_unary(self, path: str, request_serializer: Any = None, response_deserializer: Any = None) -> Any:
        async def call(message: Any, timeout: Any = None, metadata: Any = None) -> Any:
            self.calls += 1
            raise _Unavailable()

        return call


def test_n3_async_grpc_core_text_after_the_call_was_made_is_maybe_sent() -> None:
    async def main() -> None:
        channel = FakeAioChannel(READY, TF)
        client = agrpc.AsyncDtmGrpcClient("127.0.0.1:1", channel=channel)  # type: ignore[arg-type]
        with pytest.raises(DtmTransportError) as info:
            await agrpc.Saga(client, "g1").add("h:1/a.B/C", "", PAYLOAD).submit()
        assert not isinstance(info.value, DtmConnectError) and channel.calls == 1
        refused = FakeAioChannel(TF, TF)
        client = agrpc.AsyncDtmGrpcClient("127.0.0.1:1", channel=refused)  # type: ignore[arg-type]
        with pytest.raises(DtmConnectError):
            await agrpc.Saga(client, "g2").add("h:1/a.B/C", "", PAYLOAD).submit()
        assert refused.calls == 0

    asyncio.run(main())


def test_n3_a_refused_connection_is_a_connect_error_sync_and_async() -> None:
    with pytest.raises(DtmConnectError):
        Saga(DtmGrpcClient("127.0.0.1:1", timeout=2), "g1").add("h:1/a.B/C", "", PAYLOAD).submit()

    async def main() -> None:
        async with agrpc.AsyncDtmGrpcClient("127.0.0.1:1", timeout=2) as client:
            with pytest.raises(DtmConnectError):
                await agrpc.Saga(client, "g1").add("h:1/a.B/C", "", PAYLOAD).submit()

    asyncio.run(main())


# -- N4: DTM tells HTTP branches by the exact lower-case scheme --------------------------------------


@pytest.mark.parametrize("url", ["HTTP://127.0.0.1:8081/api/busi/TransOut", "Https://busi.example/TransOut",
                                 "hTTp://h:1/a.B/C"])
def test_n4_upper_case_schemes_are_refused(url: str) -> None:
    for allow_http in (True, False):
        with pytest.raises(DtmInvalidInput, match="lower case"):
            check_grpc_url(url, "saga action URL", allow_http=allow_http)
    with pytest.raises(DtmInvalidInput, match="lower case"):
        Saga(DtmGrpcClient("127.0.0.1:1"), "g1").add(url, "", PAYLOAD)
    with pytest.raises(DtmInvalidInput, match="lower case"):
        Saga(DtmGrpcClient("127.0.0.1:1"), "g1").add("h:1/a.B/C", url, PAYLOAD)
    assert check_grpc_url(url.replace(url[:url.index(":")], url[:url.index(":")].lower()), "u", allow_http=True)


# -- N5: the raw client's wait_result follows the builders' rule ------------------------------------


def test_n5_raw_wait_result_without_http_is_refused_before_sending(rec: Recorder) -> None:
    client = DtmGrpcClient(rec.target)
    request = pb.DtmRequest(Gid="g1", TransType="saga", TransOptions=pb.DtmTransOptions(WaitResult=True))
    for call in (client.submit, client.prepare):
        with pytest.raises(DtmInvalidInput, match="wait_result over gRPC needs"):
            call(request)
        with pytest.raises(DtmInvalidInput, match="wait_result over gRPC needs"):
            call({"gid": "g1", "trans_type": "saga", "wait_result": True})

    async def main() -> None:
        async with agrpc.AsyncDtmGrpcClient(rec.target) as aclient:
            with pytest.raises(DtmInvalidInput, match="wait_result over gRPC needs"):
                await aclient.submit(request)

    asyncio.run(main())
    assert rec.methods() == []


class _FakeHttp:
    def __init__(self, status: Optional[str], reason: str = "") -> None:
        self.status, self.reason = status, reason
        self.asked: list[str] = []

    def _query_flow(self, gid: str) -> Flow[Optional[Transaction]]:
        self.asked.append(gid)
        if self.status is None:
            return None
        yield from ()
        return Transaction.from_json({"gid": gid, "status": self.status, "rollback_reason": self.reason})


@pytest.mark.parametrize(("status", "outcome"), [("succeed", None), ("submitted", DtmInProgress),
                                                 ("failed", DtmFailure), ("prepared", DtmFailure)])
def test_n5_raw_wait_result_with_http_is_settled_by_a_query(rec: Recorder, status: str, outcome: Any) -> None:
    rec.answers[SUBMIT] = [("ABORTED", "wait result not return success: FAILURE", b"")]
    client = DtmGrpcClient(rec.target)
    client.http, client.can_query = _FakeHttp(status, "insufficient"), True  # type: ignore[assignment]
    body = {"gid": "g1", "trans_type": "saga", "wait_result": True}
    if outcome is None:
        client.submit(body)  # DTM's Aborted only said "not succeeded after one pass"
    else:
        with pytest.raises(outcome) as info:
            client.submit(body)
        if status == "submitted":
            assert info.value.status == "submitted"  # type: ignore[attr-defined]
        if status == "failed":
            assert "insufficient" in info.value.message
    assert client.http.asked == ["g1"]  # type: ignore[attr-defined]
    assert rec.methods() == [SUBMIT]  # never resubmitted


# -- N6: every field number and type of the messages DTM reads, pinned against protocol.md §11 ----------

T = FieldDescriptor
SPEC: dict[str, list[tuple[str, int, int, bool]]] = {  # name, number, type, repeated (maps: repeated messages)
    "DtmTransOptions": [("WaitResult", 1, T.TYPE_BOOL, False), ("TimeoutToFail", 2, T.TYPE_INT64, False),
                        ("RetryInterval", 3, T.TYPE_INT64, False), ("BranchHeaders", 5, T.TYPE_MESSAGE, True),
                        ("RequestTimeout", 6, T.TYPE_INT64, False), ("RetryLimit", 7, T.TYPE_INT64, False)],
    "DtmRequest": [("Gid", 1, T.TYPE_STRING, False), ("TransType", 2, T.TYPE_STRING, False),
                   ("TransOptions", 3, T.TYPE_MESSAGE, False), ("CustomedData", 4, T.TYPE_STRING, False),
                   ("BinPayloads", 5, T.TYPE_BYTES, True), ("QueryPrepared", 6, T.TYPE_STRING, False),
                   ("Steps", 7, T.TYPE_STRING, False), ("ReqExtra", 8, T.TYPE_MESSAGE, True),
                   ("RollbackReason", 9, T.TYPE_STRING, False)],
    "DtmBranchRequest": [("Gid", 1, T.TYPE_STRING, False), ("TransType", 2, T.TYPE_STRING, False),
                         ("BranchID", 3, T.TYPE_STRING, False), ("Op", 4, T.TYPE_STRING, False),
                         ("Data", 5, T.TYPE_MESSAGE, True), ("BusiPayload", 6, T.TYPE_BYTES, False)],
    "DtmGidReply": [("Gid", 1, T.TYPE_STRING, False)],
    "DtmProgressesReply": [("Transaction", 1, T.TYPE_MESSAGE, False), ("Progresses", 2, T.TYPE_MESSAGE, True)],
    "DtmProgress": [("Status", 1, T.TYPE_STRING, False), ("BinData", 2, T.TYPE_BYTES, False),
                    ("BranchID", 3, T.TYPE_STRING, False), ("Op", 4, T.TYPE_STRING, False)],
    # §11 names DtmTransaction's fields in order {Gid, Status, RollbackReason, Result}
    "DtmTransaction": [("Gid", 1, T.TYPE_STRING, False), ("Status", 2, T.TYPE_STRING, False),
                       ("RollbackReason", 3, T.TYPE_STRING, False), ("Result", 4, T.TYPE_STRING, False)],
}
MAPS = {("DtmTransOptions", "BranchHeaders"), ("DtmRequest", "ReqExtra"), ("DtmBranchRequest", "Data")}


def _repeated(field: Any) -> bool:
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == T.LABEL_REPEATED


@pytest.mark.parametrize("name", sorted(SPEC))
def test_n6_field_numbers_and_types_match_the_spec(name: str) -> None:
    desc = pb.DESCRIPTOR.message_types_by_name[name]
    got = [(f.name, f.number, f.type, _repeated(f)) for f in sorted(desc.fields, key=lambda f: f.number)]
    assert got == SPEC[name]
    for field in desc.fields:
        if (name, field.name) in MAPS:  # map<string, string>
            entry = field.message_type
            assert entry.GetOptions().map_entry
            assert [(f.name, f.number, f.type) for f in entry.fields] == [
                ("key", 1, T.TYPE_STRING), ("value", 2, T.TYPE_STRING)]


def _tag(number: int, wire: int) -> bytes:
    return bytes([number << 3 | wire])  # every field number here is < 16


def _int(number: int, value: int) -> bytes:
    return _tag(number, 0) + bytes([value])  # values < 128


def _ld(number: int, data: bytes) -> bytes:
    assert len(data) < 128
    return _tag(number, 2) + bytes([len(data)]) + data


def _entry(number: int, key: str, value: str) -> bytes:
    return _ld(number, _ld(1, key.encode()) + _ld(2, value.encode()))


ALL_FIELDS = {
    "gid": "g1", "trans_type": "saga", "wait_result": True, "timeout_to_fail": 2, "retry_interval": 3,
    "branch_headers": {"x-b": "hb"}, "request_timeout": 6, "retry_limit": 7,
    "custom_data": '{"concurrent":true,"orders":{"1":[0]}}', "payloads": [b"P0", b"P1"],
    "query_prepared": "h:1/q.Q/Q", "steps": [{"action": "h:1/a.A/A", "compensate": ""}],
    "req_extra": {"k": "v"}, "rollback_reason": "why",
}


def request_bytes(wait_result: bool) -> bytes:
    """ALL_FIELDS hand-encoded from protocol.md §11 (fields in number order, map entries key=1 value=2)."""
    options = (_int(1, 1) if wait_result else b"") + _int(2, 2) + _int(3, 3) + _entry(5, "x-b", "hb") + _int(6, 6)
    options += _int(7, 7)
    return (
        _ld(1, b"g1") + _ld(2, b"saga") + _ld(3, options) + _ld(4, b'{"concurrent":true,"orders":{"1":[0]}}')
        + _ld(5, b"P0") + _ld(5, b"P1") + _ld(6, b"h:1/q.Q/Q") + _ld(7, b'[{"action":"h:1/a.A/A","compensate":""}]')
        + _entry(8, "k", "v") + _ld(9, b"why")
    )


def test_n6_a_request_with_every_field_set_is_the_spec_bytes(rec: Recorder) -> None:
    assert serialize(dtm_request(ALL_FIELDS)) == request_bytes(True)
    client = DtmGrpcClient(rec.target)  # the whole client path (WaitResult false is not on the wire)
    client.prepare({k: v for k, v in ALL_FIELDS.items() if k != "wait_result"})
    assert rec.calls[0].body == request_bytes(False)


def test_n6_a_branch_request_with_every_field_set_is_the_spec_bytes() -> None:
    body = {"gid": "g1", "trans_type": "tcc", "branch_id": "01", "op": "try", "confirm": "h:1/c.C/C",
            "busi_payload": b"B"}
    want = (_ld(1, b"g1") + _ld(2, b"tcc") + _ld(3, b"01") + _ld(4, b"try") + _entry(5, "confirm", "h:1/c.C/C")
            + _ld(6, b"B"))
    assert serialize(dtm_branch_request(body)) == want


def test_n6_a_progresses_reply_is_read_from_the_spec_bytes() -> None:
    trans = _ld(1, b"g1") + _ld(2, b"prepared") + _ld(3, b"rr") + _ld(4, b"res")
    progress = _ld(1, b"succeed") + _ld(2, b"\x01\x02") + _ld(3, b"01") + _ld(4, b"action")
    reply = pb.DtmProgressesReply.FromString(_ld(1, trans) + _ld(2, progress))
    body = success_response(reply).json()
    assert body["transaction"] == {"gid": "g1", "status": "prepared", "rollback_reason": "rr", "result": "res"}
    assert body["progresses"] == [{"status": "succeed", "bin_data": "AQI=", "branch_id": "01", "op": "action"}]


# -- N7: a closed channel= is a typed error, sync and asyncio alike -----------------------------------


def test_n7_a_closed_given_channel_is_typed_sync_and_async(rec: Recorder) -> None:
    channel = grpc.insecure_channel(rec.target)
    channel.close()
    with pytest.raises(DtmInvalidInput, match="closed"):
        DtmGrpcClient(rec.target, channel=channel).new_gid()

    async def main() -> None:
        achannel = grpc.aio.insecure_channel(rec.target)
        await achannel.close()
        with pytest.raises(DtmInvalidInput, match="closed"):
            await agrpc.AsyncDtmGrpcClient(rec.target, channel=achannel).new_gid()

    asyncio.run(main())
    assert rec.methods() == []


# -- N8: make demo skips gRPC only when the extra is missing ------------------------------------------

_DEMO_IMPORT = """
import sys
sys.path.insert(0, {examples!r})
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == {blocked!r}:
            raise {error}
sys.meta_path.insert(0, Block())
try:
    import demo
except ImportError as exc:
    print("ImportError", type(exc).__name__, exc)
else:
    print("grpc_transfer", demo.grpc_transfer)
"""


@pytest.mark.parametrize(("blocked", "error", "out"), [
    ("grpc", "ModuleNotFoundError('No module named grpc', name='grpc')", "grpc_transfer None"),
    ("google.protobuf", "ModuleNotFoundError('no protobuf', name='google.protobuf')", "grpc_transfer None"),
    ("dtmcli.grpc", "ImportError('broken dtmcli.grpc')", "ImportError ImportError broken dtmcli.grpc"),
    ("dtmcli.grpc._wire", "ModuleNotFoundError('gone', name='dtmcli.grpc._wire')", "ImportError"),
])
def test_n8_demo_skips_grpc_only_without_the_extra(blocked: str, error: str, out: str) -> None:
    base = _DEMO_IMPORT.format(examples=str(EXAMPLES), blocked="-", error="ImportError")
    proc = subprocess.run([sys.executable, "-c", base], capture_output=True, text=True, timeout=60)
    if not proc.stdout.startswith("grpc_transfer <module"):  # e.g. a floor venv without the examples' flask
        pytest.skip(f"examples/demo.py does not import here: {proc.stdout.strip()}")
    code = _DEMO_IMPORT.format(examples=str(EXAMPLES), blocked=blocked, error=error)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=str(EXAMPLES.parent))
    assert proc.stdout.strip().startswith(out), proc.stdout + proc.stderr


# -- N9: an app's own generated DtmRequest is read as dtmcli's -----------------------------------------


def _apps_dtmgimp() -> Any:
    """DtmRequest as an app generates it from DTM's dtmgimp.proto (package dtmgimp, its own pool)."""
    fdp = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(fdp)
    fdp.name, fdp.package = "app/dtmgimp.proto", "dtmgimp"

    def fix(message: Any) -> None:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(".dtmcli.dtmgimp.", ".dtmgimp.")
        for nested in message.nested_type:
            fix(nested)

    for message in fdp.message_type:
        fix(message)
    for service in fdp.service:
        for method in service.method:
            method.input_type = method.input_type.replace(".dtmcli.dtmgimp.", ".dtmgimp.")
            method.output_type = method.output_type.replace(".dtmcli.dtmgimp.", ".dtmgimp.")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(empty_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("dtmgimp.DtmRequest"))


def test_n9_an_apps_own_dtm_request_is_sent_as_its_bytes(rec: Recorder) -> None:
    app_request = _apps_dtmgimp()
    request = app_request(Gid="g1", TransType="saga", Steps="null", RollbackReason="r")
    request.TransOptions.RetryInterval = 3
    client = DtmGrpcClient(rec.target)
    client.abort(request)
    assert rec.calls[0].body == serialize(pb.DtmRequest.FromString(request.SerializeToString()))
    with pytest.raises(DtmInvalidInput, match=r"dtmgimp\.DtmRequest"):
        client.submit(wrappers_pb2.Int64Value(value=1))  # type: ignore[arg-type]
    with pytest.raises(DtmInvalidInput, match="DtmBranchRequest"):
        client.register_branch(request)  # type: ignore[arg-type]
    assert rec.methods() == [ABORT]


# -- N10: a TCC/XA whose submit is refused for wait_result leaves nothing prepared at DTM -------------


def test_n10_wait_result_given_up_front_is_refused_before_prepare(rec: Recorder) -> None:
    client = DtmGrpcClient(rec.target)
    with pytest.raises(DtmInvalidInput, match="wait_result"):
        with tcc_global_transaction(client, "g1", wait_result=True) as tcc:
            tcc.call_branch(PAYLOAD, rec.url("Try"), rec.url("Confirm"), rec.url("Cancel"))
    with pytest.raises(DtmInvalidInput, match="wait_result"):
        with xa_global_transaction(client, "g2", wait_result=True) as xa:
            xa.call_branch(PAYLOAD, rec.url("Action"))
    assert rec.methods() == []


def test_n10_wait_result_set_in_the_body_aborts_at_once(rec: Recorder) -> None:
    client = DtmGrpcClient(rec.target)
    with pytest.raises(DtmInvalidInput, match="wait_result"):
        with tcc_global_transaction(client, "g1") as tcc:
            tcc.call_branch(PAYLOAD, rec.url("Try"), rec.url("Confirm"), rec.url("Cancel"))
            tcc.set_wait_result(True)
    assert rec.methods() == [PREPARE, REGISTER, "/busi.Busi/Try", ABORT]
    assert tcc._state == "aborted"
    rec.calls.clear()
    with pytest.raises(DtmInvalidInput, match="wait_result"):
        with xa_global_transaction(client, "g2") as xa:
            xa.call_branch(PAYLOAD, rec.url("Action"))
            xa.wait_result = True
    assert rec.methods() == [PREPARE, "/busi.Busi/Action", ABORT]


def test_n10_async_wait_result_set_in_the_body_aborts_at_once(rec: Recorder) -> None:
    async def main() -> None:
        async with agrpc.AsyncDtmGrpcClient(rec.target) as client:
            with pytest.raises(DtmInvalidInput, match="wait_result"):
                async with agrpc.tcc_global_transaction(client, "g1") as tcc:
                    await tcc.call_branch(PAYLOAD, rec.url("Try"), rec.url("Confirm"), rec.url("Cancel"))
                    tcc.set_options(wait_result=True)

    asyncio.run(main())
    assert rec.methods() == [PREPARE, REGISTER, "/busi.Busi/Try", ABORT]
