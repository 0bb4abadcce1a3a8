"""Branch side of gRPC: the server interceptors (grpcio and grpc.aio), BranchBarrier.from_grpc and @barrier
on servicer methods, against real grpcio servers (and real MariaDB / PostgreSQL / Redis for the barrier).

Calls are made as DTM makes them (grpc_branch_headers.json): raw payload bytes, lower-case ``dtm-*``
metadata with an empty ``dtm-dtm``, a deadline; the status codes checked are the ones DTM reads
(grpc_branch_status_codes.json): OK, ABORTED = FAILURE, FAILED_PRECONDITION = ONGOING, others retried.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

import pytest
from services import POSTGRES, REDIS, in_ci, mysql_connect, psycopg2_connect, require

if not in_ci():
    pytest.importorskip("grpc")

import grpc  # CI: the grpc extra must be installed
import grpc.aio
from google.protobuf import wrappers_pb2
from grpc_serving import AioLoop

from dtmcli import DtmDuplicated, DtmFailure, DtmOngoing, local_gid
from dtmcli.barrier import BranchBarrier, barrier, create_schema
from dtmcli.branch import current_branch_info
from dtmcli.errors import BranchRequestError, DtmInvalidInput
from dtmcli.grpc.server import (
    AsyncDtmServerInterceptor,
    DtmServerInterceptor,
    GrpcBranchInfo,
    branch_info_from_grpc,
    set_grpc_dtm_servers,
)

SERVICE = "busi.Busi"
Handler = Callable[[Any, Any], Any]


def dtm_md(gid: str, trans_type: str = "saga", branch_id: str = "01", op: str = "action", dtm: str = "",
           **extra: str) -> tuple[tuple[str, str], ...]:
    """The metadata DTM sends (grpc_branch_headers.json: dtm-* keys, dtm-dtm empty, then branch headers)."""
    md = [("dtm-gid", gid), ("dtm-trans_type", trans_type), ("dtm-branch_id", branch_id), ("dtm-op", op),
          ("dtm-dtm", dtm)]
    return (*md, *extra.items())


# -- servers -------------------------------------------------------------------------------------------------


def _generic(handlers: dict[str, Handler], typed: bool) -> grpc.GenericRpcHandler:
    # typed: a protobuf request deserialiser (Int64Value has busi.ReqGrpc's Amount=1 wire shape); else raw bytes.
    deser = wrappers_pb2.Int64Value.FromString if typed else None
    ser = (lambda m: m.SerializeToString()) if typed else None
    return grpc.method_handlers_generic_handler(SERVICE, {
        name: grpc.unary_unary_rpc_method_handler(fn, request_deserializer=deser, response_serializer=ser)
        for name, fn in handlers.items()
    })


@contextlib.contextmanager
def sync_server(handlers: dict[str, Handler], *, typed: bool = False, intercept: bool = True) -> Iterator[str]:
    server = grpc.server(ThreadPoolExecutor(4), interceptors=[DtmServerInterceptor()] if intercept else [])
    server.add_generic_rpc_handlers((_generic(handlers, typed),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


@contextlib.contextmanager
def aio_server(handlers: dict[str, Handler], *, typed: bool = False, intercept: bool = True,
               loop: Optional[AioLoop] = None) -> Iterator[str]:
    own = loop is None
    aio = loop or AioLoop()

    async def start() -> tuple[Any, int]:
        server = grpc.aio.server(interceptors=[AsyncDtmServerInterceptor()] if intercept else [])
        server.add_generic_rpc_handlers((_generic(handlers, typed),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = aio.run(start())
    try:
        yield f"127.0.0.1:{port}"
    finally:
        aio.run(server.stop(0))
        if own:
            aio.close()


SERVERS = {"sync": sync_server, "aio": aio_server}
flavours = pytest.mark.parametrize("flavour", ["sync", "aio"])


def call(target: str, method: str, body: bytes, metadata: Any, timeout: float = 5) -> tuple[grpc.StatusCode, str]:
    """One raw-bytes call, as DTM's raw codec makes it; returns the status code and details."""
    with grpc.insecure_channel(target) as channel:
        try:
            channel.unary_unary(f"/{SERVICE}/{method}")(body, metadata=metadata, timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def behaving(flavour: str, outcome: Callable[[Any, Any], Any], seen: list[Any]) -> Handler:
    """A handler (sync, or ``async def`` for aio) recording the current BranchInfo and its request."""
    if flavour == "sync":
        def handler(request: Any, context: Any) -> Any:
            seen.append((current_branch_info(), request))
            return outcome(request, context)
        return handler

    async def ahandler(request: Any, context: Any) -> Any:
        seen.append((current_branch_info(), request))
        result = outcome(request, context)
        return await result if asyncio.iscoroutine(result) else result
    return ahandler


# -- BranchInfo and status mapping ------------------------------------------------------------------------------


@flavours
def test_branch_info_from_metadata_and_raw_bytes(flavour: str) -> None:
    seen: list[Any] = []
    gid = local_gid()
    with SERVERS[flavour]({"TransOut": behaving(flavour, lambda r, c: None, seen)}) as target:
        code, _ = call(target, "TransOut", b"\x08\x1e", dtm_md(gid, **{"x-trace-id": "t-1"}))
    assert code == grpc.StatusCode.OK
    info, request = seen[0]
    assert isinstance(info, GrpcBranchInfo)
    assert (info.gid, info.trans_type, info.branch_id, info.op, info.dtm) == (gid, "saga", "01", "action", None)
    assert request == b"\x08\x1e"  # a handler registered without deserialiser gets DTM's raw payload bytes
    assert current_branch_info() is None


@flavours
def test_protobuf_deserialiser_and_reply(flavour: str) -> None:
    seen: list[Any] = []

    def reply(request: Any, context: Any) -> Any:
        return wrappers_pb2.Int64Value(value=request.value + 1)

    with SERVERS[flavour]({"TransOut": behaving(flavour, reply, seen)}, typed=True) as target:
        with grpc.insecure_channel(target) as channel:
            out = channel.unary_unary(f"/{SERVICE}/TransOut")(b"\x08\x1e", metadata=dtm_md(local_gid()), timeout=5)
    assert seen[0][1] == wrappers_pb2.Int64Value(value=30)
    assert wrappers_pb2.Int64Value.FromString(out).value == 31


def _raise(exc: BaseException) -> Callable[[Any, Any], Any]:
    def outcome(request: Any, context: Any) -> Any:
        raise exc
    return outcome


CASES = [
    # (outcome, trans_type, op, expected code, expected details or None)
    (_raise(DtmFailure("insufficient balance")), "saga", "action", grpc.StatusCode.ABORTED, "insufficient balance"),
    (_raise(DtmFailure("insufficient balance")), "tcc", "try", grpc.StatusCode.ABORTED, "insufficient balance"),
    (_raise(DtmFailure("ONGOING")), "saga", "action", grpc.StatusCode.ABORTED, "ongoing"),  # not read as ONGOING
    # FAILURE where DTM would retry it forever: answered as an error (logged), as over HTTP
    (_raise(DtmFailure("no")), "saga", "compensate", grpc.StatusCode.INTERNAL, None),
    (_raise(DtmFailure("no")), "tcc", "confirm", grpc.StatusCode.INTERNAL, None),
    (_raise(DtmOngoing("not yet")), "saga", "action", grpc.StatusCode.FAILED_PRECONDITION, "not yet"),
    (_raise(DtmOngoing("not yet")), "msg", "msg", grpc.StatusCode.FAILED_PRECONDITION, "not yet"),
    (_raise(DtmDuplicated("again")), "msg", "action", grpc.StatusCode.OK, ""),
    (_raise(RuntimeError("db down")), "saga", "action", grpc.StatusCode.INTERNAL, "RuntimeError: db down"),
    (lambda r, c: {"dtm_result": "FAILURE", "message": "no money"}, "saga", "action", grpc.StatusCode.ABORTED,
     "no money"),
    (lambda r, c: {"dtm_result": "ONGOING"}, "saga", "action", grpc.StatusCode.FAILED_PRECONDITION, None),
    (lambda r, c: {"dtm_result": "SUCCESS"}, "saga", "action", grpc.StatusCode.OK, ""),
]


@flavours
@pytest.mark.parametrize("case", range(len(CASES)))
def test_status_mapping(flavour: str, case: int) -> None:
    outcome, trans_type, op, code, details = CASES[case]
    seen: list[Any] = []
    with SERVERS[flavour]({"M": behaving(flavour, outcome, seen)}) as target:
        got = call(target, "M", b"", dtm_md(local_gid(), trans_type, op=op))
    assert got[0] == code
    if details is not None:
        assert got[1] == details
    assert len(seen) == 1


@flavours
def test_handler_abort_is_kept(flavour: str) -> None:
    def outcome(request: Any, context: Any) -> Any:
        return context.abort(grpc.StatusCode.NOT_FOUND, "no such account")  # a coroutine under aio

    with SERVERS[flavour]({"M": behaving(flavour, outcome, [])}) as target:
        assert call(target, "M", b"", dtm_md(local_gid())) == (grpc.StatusCode.NOT_FOUND, "no such account")


@flavours
def test_downstream_rpc_error_is_an_error_not_failure(flavour: str) -> None:
    """A raw grpc.RpcError escaping from a downstream call is INTERNAL (retried) whatever its code: many
    services answer ABORTED for "conflict, retry", which must not compensate a saga. A handler that
    means FAILURE raises DtmFailure itself."""
    with sync_server({"Down": lambda r, c: c.abort(grpc.StatusCode.ABORTED, "child failed"),
                      "Busy": lambda r, c: c.abort(grpc.StatusCode.FAILED_PRECONDITION, "child busy"),
                      "Gone": lambda r, c: c.abort(grpc.StatusCode.UNAVAILABLE, "child gone")},
                     intercept=False) as child:

        def forward(method: str, as_failure: bool = False) -> Callable[[Any, Any], Any]:
            def outcome(request: Any, context: Any) -> Any:
                with grpc.insecure_channel(child) as channel:
                    try:
                        channel.unary_unary(f"/{SERVICE}/{method}")(b"", timeout=5)
                    except grpc.RpcError as exc:
                        if as_failure:
                            raise DtmFailure(f"child said {exc.details()}") from exc
                        raise
            return outcome

        handlers = {m: behaving(flavour, forward(m), []) for m in ("Down", "Busy", "Gone")}
        handlers["Fail"] = behaving(flavour, forward("Down", as_failure=True), [])
        with SERVERS[flavour](handlers) as target:
            for method in ("Down", "Busy", "Gone"):
                code, details = call(target, method, b"", dtm_md(local_gid(), "saga", op="action"))
                assert code == grpc.StatusCode.INTERNAL, method
                assert details.startswith("a downstream gRPC call failed"), details
            assert call(target, "Fail", b"", dtm_md(local_gid(), "saga", op="action")) == (
                grpc.StatusCode.ABORTED, "child said child failed")


@flavours
def test_malformed_metadata_is_invalid_argument_and_handler_not_called(flavour: str) -> None:
    seen: list[Any] = []
    gid = local_gid()
    bad = [
        (("dtm-gid", gid), ("dtm-trans_type", "saga"), ("dtm-branch_id", "01")),  # no op
        dtm_md(gid, "saga", op="confirm"),  # not a saga op
        dtm_md(gid, "nope"),
        dtm_md("bad gid;"),
        dtm_md(gid, "tcc", op="try", dtm="http://x y"),
        (*dtm_md(gid), ("dtm-op", "compensate")),  # given twice
    ]
    with SERVERS[flavour]({"M": behaving(flavour, lambda r, c: None, seen)}) as target:
        for md in bad:
            code, details = call(target, "M", b"", md)
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (md, code, details)
    assert seen == []


@flavours
def test_calls_without_dtm_metadata_pass_through(flavour: str) -> None:
    seen: list[Any] = []
    with SERVERS[flavour]({"Ping": behaving(flavour, lambda r, c: b"pong", seen),
                           "Boom": behaving(flavour, _raise(DtmFailure("x")), seen)}) as target:
        with grpc.insecure_channel(target) as channel:
            assert channel.unary_unary(f"/{SERVICE}/Ping")(b"", timeout=5) == b"pong"
        code, _ = call(target, "Boom", b"", ())
    assert seen[0][0] is None  # no BranchInfo: not a DTM call
    assert code == grpc.StatusCode.UNKNOWN  # grpcio's own answer: the interceptor stayed out


def test_grpc_branch_info_dtm_is_a_grpc_target() -> None:
    gid = local_gid()
    info = GrpcBranchInfo.from_metadata(dtm_md(gid, "tcc", op="try", dtm="127.0.0.1:36790"))
    assert info.dtm == "127.0.0.1:36790"
    xa = GrpcBranchInfo.from_metadata((*dtm_md(gid, "xa", op="action", dtm="dtm:36790"),
                                       ("dtm-phase2_url", "127.0.0.1:5/busi.Busi/XaCommit")))
    assert xa.require_phase2_url() == "127.0.0.1:5/busi.Busi/XaCommit"
    with pytest.raises(BranchRequestError):
        GrpcBranchInfo.from_metadata((*dtm_md(gid, "xa", op="action"), ("dtm-phase2_url", "no-method")))
    assert GrpcBranchInfo.from_metadata(dtm_md(gid)).dtm is None  # DTM's callbacks send dtm-dtm empty
    try:
        set_grpc_dtm_servers("127.0.0.1:36790")
        assert info.require_dtm() == "127.0.0.1:36790"
        with pytest.raises(BranchRequestError, match="not a trusted"):
            GrpcBranchInfo.from_metadata(dtm_md(gid, "tcc", op="try", dtm="evil:1")).require_dtm()
    finally:
        set_grpc_dtm_servers()
    with pytest.raises(BranchRequestError, match="no dtm-dtm"):
        GrpcBranchInfo.from_metadata(dtm_md(gid)).require_dtm()


@flavours
def test_branch_barrier_from_grpc(flavour: str) -> None:
    got: list[Any] = []

    def outcome(request: Any, context: Any) -> Any:
        got.append((BranchBarrier.from_grpc(context), branch_info_from_grpc(context)))

    gid = local_gid()
    with SERVERS[flavour]({"M": behaving(flavour, outcome, [])}) as target:
        assert call(target, "M", b"", dtm_md(gid, "tcc", "02", "cancel"))[0] == grpc.StatusCode.OK
    bb, info = got[0]
    assert (bb.trans_type, bb.gid, bb.branch_id, bb.op, bb.origin_op) == ("tcc", gid, "02", "cancel", "try")
    assert info.gid == gid


def test_branch_barrier_from_grpc_without_interceptor() -> None:
    got: list[Any] = []

    def handler(request: Any, context: Any) -> Any:
        got.append(BranchBarrier.from_grpc(context))
        try:
            BranchBarrier.from_grpc(_Ctx(()))
        except BranchRequestError as exc:
            got.append(exc)
        return b""

    gid = local_gid()
    with sync_server({"M": handler}, intercept=False) as target:
        assert call(target, "M", b"", dtm_md(gid, "saga", "01", "compensate"))[0] == grpc.StatusCode.OK
    assert (got[0].gid, got[0].op) == (gid, "compensate")
    assert isinstance(got[1], BranchRequestError)


class _Ctx:
    def __init__(self, md: Any) -> None:
        self._md = md

    def invocation_metadata(self) -> Any:
        return self._md


# -- @barrier on servicer methods, real databases ---------------------------------------------------------------

EFFECT = "dtmcli_grpc_effect"


def _prepare(connect: Callable[[], Any]) -> None:
    conn = connect()
    try:
        create_schema(conn)
        conn.cursor().execute(f"create table if not exists {EFFECT} (gid varchar(128) not null, "
                              "op varchar(45) not null, amount bigint not null)")
        conn.commit()
    finally:
        conn.close()


def _effects(connect: Callable[[], Any], gid: str) -> list[tuple[str, int]]:
    conn = connect()
    try:
        cur = conn.cursor()
        cur.execute(f"select op, amount from {EFFECT} where gid = %s order by op", (gid,))
        return [(str(r[0]), int(r[1])) for r in cur.fetchall()]
    finally:
        conn.close()


class SyncBusi:
    """A servicer whose methods are barrier-protected: (self, request, context, tx)."""

    def __init__(self) -> None:
        self.runs = 0

    @barrier(db=mysql_connect)
    def TransOut(self, request: Any, context: Any, tx: Any) -> Any:
        self.runs += 1
        info = current_branch_info()
        assert info is not None
        amount = wrappers_pb2.Int64Value.FromString(request).value
        tx.cursor().execute(f"insert into {EFFECT} (gid, op, amount) values (%s, %s, %s)", (info.gid, info.op, amount))
        if amount < 0:
            raise DtmFailure("negative amount")  # rolled back by the barrier, answered ABORTED
        return None

    TransOutRevert = TransOut


def _sync_handlers(busi: SyncBusi) -> dict[str, Handler]:
    return {"TransOut": busi.TransOut, "TransOutRevert": busi.TransOutRevert}


def test_barrier_on_sync_servicer_mysql() -> None:
    require("mysql")
    _prepare(mysql_connect)
    busi = SyncBusi()
    gid, gid2, gid3 = local_gid(), local_gid(), local_gid()
    with sync_server(_sync_handlers(busi)) as target:
        body = wrappers_pb2.Int64Value(value=30).SerializeToString()
        assert call(target, "TransOut", body, dtm_md(gid)) == (grpc.StatusCode.OK, "")
        assert call(target, "TransOut", body, dtm_md(gid)) == (grpc.StatusCode.OK, "")  # duplicate: skipped
        assert busi.runs == 1
        assert _effects(mysql_connect, gid) == [("action", 30)]
        # null compensation, then the late action is suspended: neither runs the business code
        assert call(target, "TransOutRevert", body, dtm_md(gid2, op="compensate")) == (grpc.StatusCode.OK, "")
        assert call(target, "TransOut", body, dtm_md(gid2)) == (grpc.StatusCode.OK, "")
        assert busi.runs == 1 and _effects(mysql_connect, gid2) == []
        # a failing action is rolled back and answered ABORTED; its compensation is then a null one
        neg = wrappers_pb2.Int64Value(value=-1).SerializeToString()
        assert call(target, "TransOut", neg, dtm_md(gid3)) == (grpc.StatusCode.ABORTED, "negative amount")
        assert _effects(mysql_connect, gid3) == []
        assert call(target, "TransOutRevert", neg, dtm_md(gid3, op="compensate")) == (grpc.StatusCode.OK, "")
        assert busi.runs == 2 and _effects(mysql_connect, gid3) == []


def test_barrier_on_servicer_needs_the_interceptor() -> None:
    require("mysql")
    _prepare(mysql_connect)
    busi = SyncBusi()
    gid = local_gid()
    with sync_server(_sync_handlers(busi), intercept=False) as target:
        code, details = call(target, "TransOut", b"\x08\x01", dtm_md(gid))
    assert code == grpc.StatusCode.UNKNOWN and "DtmServerInterceptor" in details
    assert busi.runs == 0 and _effects(mysql_connect, gid) == []


def test_barrier_on_async_servicer_postgres() -> None:
    require("postgres")
    _prepare(psycopg2_connect)
    import asyncpg

    aio = AioLoop()

    async def make_pool() -> Any:
        return await asyncpg.create_pool(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                                         database=POSTGRES["dbname"], min_size=1, max_size=4)

    pool = aio.run(make_pool())
    runs: list[str] = []

    @barrier(db=pool)
    async def trans_in(request: Any, context: Any, tx: Any) -> Any:
        info = current_branch_info()
        assert info is not None
        runs.append(info.op)
        amount = wrappers_pb2.Int64Value.FromString(request).value
        await tx.execute(f"insert into {EFFECT} (gid, op, amount) values ($1, $2, $3)", info.gid, info.op, amount)
        return None

    gid, gid2 = local_gid(), local_gid()
    body = wrappers_pb2.Int64Value(value=40).SerializeToString()
    try:
        with aio_server({"TransIn": trans_in, "TransInRevert": trans_in}, loop=aio) as target:
            assert call(target, "TransIn", body, dtm_md(gid, "tcc", op="try")) == (grpc.StatusCode.OK, "")
            assert call(target, "TransIn", body, dtm_md(gid, "tcc", op="try")) == (grpc.StatusCode.OK, "")
            assert call(target, "TransInRevert", body, dtm_md(gid, "tcc", op="cancel")) == (grpc.StatusCode.OK, "")
            assert call(target, "TransInRevert", body, dtm_md(gid2, "tcc", op="cancel")) == (grpc.StatusCode.OK, "")
            assert call(target, "TransIn", body, dtm_md(gid2, "tcc", op="try")) == (grpc.StatusCode.OK, "")
    finally:
        aio.run(pool.close())
        aio.close()
    assert runs == ["try", "cancel"]
    assert _effects(psycopg2_connect, gid) == [("cancel", 40), ("try", 40)]
    assert _effects(psycopg2_connect, gid2) == []


@flavours
def test_redis_barrier_from_grpc(flavour: str) -> None:
    require("redis")
    import redis

    client = redis.Redis(host=REDIS["host"], port=REDIS["port"])
    key = f"dtmcli-grpc-{local_gid()}"
    client.set(key, 100)

    def outcome(request: Any, context: Any) -> Any:
        amount = wrappers_pb2.Int64Value.FromString(request).value
        info = branch_info_from_grpc(context)
        sign = -1 if info.op == "action" else 1
        BranchBarrier.from_grpc(context).redis_check_adjust_amount(client, key, sign * amount, 600)

    gid = local_gid()
    body = wrappers_pb2.Int64Value(value=30).SerializeToString()
    try:
        with SERVERS[flavour]({"M": behaving(flavour, outcome, [])}) as target:
            assert call(target, "M", body, dtm_md(gid)) == (grpc.StatusCode.OK, "")
            assert call(target, "M", body, dtm_md(gid)) == (grpc.StatusCode.OK, "")  # duplicate: no effect
            assert int(client.get(key) or 0) == 70
            big = wrappers_pb2.Int64Value(value=1000).SerializeToString()
            code, _ = call(target, "M", big, dtm_md(local_gid()))
            assert code == grpc.StatusCode.ABORTED  # the barrier's FAILURE (would go negative)
            assert int(client.get(key) or 0) == 70
    finally:
        client.delete(key)
        client.close()


def test_barrier_decorator_plain_calls_unaffected_when_grpc_is_imported() -> None:
    """With grpc imported, a non-gRPC @barrier call still takes its info from the first argument."""
    calls: list[Any] = []

    @barrier(db=lambda: None)
    def handler(info: Any, tx: Any) -> Any:
        calls.append(info)

    with pytest.raises(DtmInvalidInput):
        handler()  # no request argument and no gRPC context: the plain form's own error
    assert calls == []


# -- tracing ---------------------------------------------------------------------------------------------------


@flavours
def test_server_span_continues_the_callers_trace(flavour: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With tracing on: one SERVER span per DTM call, child of the traceparent DTM forwards (a branch header)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    try:
        with SERVERS[flavour]({"Ok": behaving(flavour, lambda r, c: None, []),
                               "Fail": behaving(flavour, _raise(DtmFailure("no")), []),
                               "Bug": behaving(flavour, _raise(RuntimeError("bug")), [])}) as target:
            assert call(target, "Ok", b"", dtm_md(local_gid(), traceparent=parent))[0] == grpc.StatusCode.OK
            assert call(target, "Fail", b"", dtm_md(local_gid()))[0] == grpc.StatusCode.ABORTED
            assert call(target, "Bug", b"", dtm_md(local_gid()))[0] == grpc.StatusCode.INTERNAL
    finally:
        provider.shutdown()
    ok, fail, bug = exporter.get_finished_spans()
    assert ok.name == "dtm branch saga action" and ok.kind == trace.SpanKind.SERVER
    assert ok.context.trace_id == int("0af7651916cd43dd8448eb211c80319c", 16)
    assert ok.parent is not None and ok.parent.span_id == int("b7ad6b7169203331", 16)
    assert ok.attributes["rpc.grpc.status_code"] == 0
    assert fail.attributes["rpc.grpc.status_code"] == grpc.StatusCode.ABORTED.value[0]
    assert fail.status.is_ok  # an answered FAILURE is the protocol working, not an error
    assert bug.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert not bug.status.is_ok


def test_aio_server_with_a_plain_def_handler() -> None:
    """grpc.aio runs a plain handler in its thread pool (with a blocking context): mapped the same."""
    seen: list[Any] = []
    aio = AioLoop()

    async def start() -> tuple[Any, int]:
        server = grpc.aio.server(ThreadPoolExecutor(2), interceptors=[AsyncDtmServerInterceptor()])
        server.add_generic_rpc_handlers((_generic({"M": behaving("sync", _raise(DtmFailure("nope")), seen)},
                                                  False),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = aio.run(start())
    try:
        gid = local_gid()
        assert call(f"127.0.0.1:{port}", "M", b"", dtm_md(gid)) == (grpc.StatusCode.ABORTED, "nope")
    finally:
        aio.run(server.stop(0))
        aio.close()
    assert seen[0][0].gid == gid


@pytest.mark.skipif(not hasattr(grpc.Server, "add_registered_method_handlers"),
                    reason="grpcio < 1.63 has no registered method handlers (nor codegen using them)")
def test_registered_method_handlers_are_intercepted_too() -> None:
    """grpcio's generated code (>= 1.63) registers methods with add_registered_method_handlers."""
    seen: list[Any] = []
    server = grpc.server(ThreadPoolExecutor(2), interceptors=[DtmServerInterceptor()])
    server.add_registered_method_handlers(SERVICE, {
        "M": grpc.unary_unary_rpc_method_handler(behaving("sync", _raise(DtmOngoing("later")), seen))})
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        gid = local_gid()
        assert call(f"127.0.0.1:{port}", "M", b"", dtm_md(gid)) == (grpc.StatusCode.FAILED_PRECONDITION, "later")
    finally:
        server.stop(0).wait()
    assert seen[0][0].gid == gid
