"""gRPC end to end: sagas, TCC (nested), msg and XA through real grpcio branch services and DTM's gRPC API.

The branch service is started in the test: a blocking ``grpc.server`` with :class:`DtmServerInterceptor`
whose handlers write through the SQL barrier on MariaDB, or a ``grpc.aio`` server with
:class:`AsyncDtmServerInterceptor` on PostgreSQL (asyncpg). Each handler records the call (method,
branch id, op) before the barrier, so a test sees every call DTM or the client made, in order, and
the barrier's table rows show which of them took effect. Clients are :mod:`dtmcli.grpc` (sync) and
:mod:`dtmcli.asyncio.grpc` (async).

The coordinator is the ``dtm_grpc`` fixture: the embedded one with its gRPC API, or a real DTM with
``--dtm-grpc-server host:port`` plus ``--dtm-server URL`` (its HTTP API, for queries); the DTM must
reach 127.0.0.1 of this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import pytest
from flavours import ASYNC, SYNC, Flavour
from services import POSTGRES, in_ci, mysql_connect, psycopg2_connect, require

if not in_ci():
    pytest.importorskip("grpc")

import grpc  # CI: the grpc extra must be installed
import grpc.aio
from google.protobuf import wrappers_pb2
from grpc_serving import grpc_service, raw_handlers

import dtmcli
import dtmcli.asyncio.grpc as agrpc
import dtmcli.grpc as sgrpc
from dtmcli import DtmFailure, DtmInvalidInput, local_gid
from dtmcli.asyncio import BranchBarrier as AsyncBranchBarrier
from dtmcli.barrier import BranchBarrier, create_schema
from dtmcli.branch import current_branch_info
from dtmcli.grpc.server import branch_info_from_grpc
from dtmcli.testing import Answer, BranchService, DtmFacade

SERVICE = "bank.Bank"
TABLE = "dtmcli_grpc_e2e"
METHODS = (
    "TransOut", "TransOutRevert", "TransIn", "TransInRevert",
    "TransOutTry", "TransOutConfirm", "TransOutCancel", "TransInTry", "TransInConfirm", "TransInCancel",
    "HopTry", "HopConfirm", "HopCancel", "QueryPrepared", "XaOut", "XaIn",
)


def amount(value: int) -> wrappers_pb2.Int64Value:
    """The payload: Int64Value has the wire shape of DTM's ``busi.ReqGrpc{Amount=1}``."""
    return wrappers_pb2.Int64Value(value=value)


# -- databases ------------------------------------------------------------------------------------------------


CONNECT = {"mysql": mysql_connect, "postgres": psycopg2_connect}


def _prepare(db: str) -> None:
    conn = CONNECT[db]()
    try:
        create_schema(conn)
        conn.cursor().execute(f"create table if not exists {TABLE} (gid varchar(128) not null, branch_id varchar(32) "
                              "not null, op varchar(45) not null, method varchar(45) not null, amount bigint not null)")
        conn.commit()
    finally:
        conn.close()


def effects(db: str, gid: str) -> list[tuple[str, str, str, int]]:
    """The rows the barrier let through for ``gid``: (branch_id, op, method, amount), in branch/op order."""
    conn = CONNECT[db]()
    try:
        cur = conn.cursor()
        cur.execute(f"select branch_id, op, method, amount from {TABLE} where gid = %s order by branch_id, op", (gid,))
        return [(str(r[0]), str(r[1]), str(r[2]), int(r[3])) for r in cur.fetchall()]
    finally:
        conn.close()


# -- the branch service ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    gid: str
    method: str
    branch_id: str
    op: str
    amount: int


class Bank:
    """A gRPC bank service; ``fail[method] = text`` makes that method answer FAILURE (its local work rolled back)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.db = "mysql" if kind == "sync" else "postgres"
        self.target = ""
        self.seen: list[Seen] = []
        self.fail: dict[str, str] = {}
        self.nest = False  # TransInTry opens a nested TCC with a Hop branch
        self.on_call: Optional[Callable[[str], None]] = None
        self.pool: Any = None  # the asyncpg pool of the aio server
        self._lock = threading.Lock()

    def url(self, method: str) -> str:
        return f"{self.target}/{SERVICE}/{method}"

    def calls(self, gid: str) -> list[tuple[str, str, str]]:
        """(method, branch_id, op) of every call for ``gid``, in arrival order."""
        with self._lock:
            return [(s.method, s.branch_id, s.op) for s in self.seen if s.gid == gid]

    def effects(self, gid: str) -> list[tuple[str, str, str, int]]:
        return effects(self.db, gid)

    def _record(self, method: str, request: bytes) -> tuple[Any, int]:
        info = current_branch_info()
        assert info is not None, "the interceptor sets the current branch"
        value = wrappers_pb2.Int64Value.FromString(request).value
        with self._lock:
            self.seen.append(Seen(info.gid, method, info.branch_id, info.op, value))
        if self.on_call is not None:
            self.on_call(method)
        return info, value

    def _insert_sql(self) -> str:
        marks = ", ".join(f"${i}" for i in range(1, 6)) if self.db == "postgres" else ", ".join(["%s"] * 5)
        return f"insert into {TABLE} (gid, branch_id, op, method, amount) values ({marks})"

    # the blocking handler (grpc.server)
    def handle(self, method: str, request: bytes, context: Any) -> Any:
        info, value = self._record(method, request)
        if method == "QueryPrepared":
            with contextlib.closing(mysql_connect()) as conn:
                BranchBarrier.from_grpc(context).query_prepared(conn)  # DtmFailure (Aborted) unless committed
            return None
        if method.startswith("Xa"):
            if info.op == "action":
                if method in self.fail:
                    raise DtmFailure(self.fail[method])
                sgrpc.register_xa_branch(context)  # over gRPC, to the trusted dtm-dtm
            return None

        def work(tx: Any) -> None:
            tx.cursor().execute(self._insert_sql(), (info.gid, info.branch_id, info.op, method, value))
            if method in self.fail:
                raise DtmFailure(self.fail[method])

        BranchBarrier.from_grpc(context).call_with_db(mysql_connect, work)
        if method == "TransInTry" and self.nest:
            sgrpc.Tcc.from_grpc(context).call_branch(
                amount(value), self.url("HopTry"), self.url("HopConfirm"), self.url("HopCancel"))
        return None

    # the asyncio handler (grpc.aio.server)
    async def ahandle(self, method: str, request: bytes, context: Any) -> Any:
        info, value = self._record(method, request)
        if method == "QueryPrepared":
            await AsyncBranchBarrier.from_grpc(context).query_prepared(self.pool)
            return None
        if method.startswith("Xa"):
            if info.op == "action":
                if method in self.fail:
                    raise DtmFailure(self.fail[method])
                await asyncio.to_thread(sgrpc.register_xa_branch, branch_info_from_grpc(context))
            return None

        async def work(tx: Any) -> None:
            await tx.execute(self._insert_sql(), info.gid, info.branch_id, info.op, method, value)
            if method in self.fail:
                raise DtmFailure(self.fail[method])

        await AsyncBranchBarrier.from_grpc(context).call_with_db(self.pool, work)
        if method == "TransInTry" and self.nest:
            await agrpc.Tcc.from_grpc(context).call_branch(
                amount(value), self.url("HopTry"), self.url("HopConfirm"), self.url("HopCancel"))
        return None

    def handlers(self) -> grpc.GenericRpcHandler:
        return raw_handlers(SERVICE, METHODS, self.kind, self.handle, self.ahandle)


@contextlib.contextmanager
def serve(bank: Bank) -> Iterator[Bank]:
    """Start ``bank`` on 127.0.0.1 with dtmcli's interceptor (sync, or grpc.aio with an asyncpg pool)."""

    async def open_pool() -> None:
        import asyncpg

        bank.pool = await asyncpg.create_pool(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                                              database=POSTGRES["dbname"], min_size=1, max_size=8)

    async def close_pool() -> None:
        await bank.pool.close()

    aio = bank.kind != "sync"
    with grpc_service(bank.kind, bank.handlers(), start=open_pool if aio else None,
                      stop=close_pool if aio else None) as target:
        bank.target = target
        yield bank


# -- client flavours and the combinations run -----------------------------------------------------------------


@dataclass(frozen=True)
class Combo:
    client: Flavour
    server: str  # "sync" (grpc.server, MariaDB) or "aio" (grpc.aio, PostgreSQL)

    @property
    def id(self) -> str:
        return f"{self.client.name}-client-{self.server}-server"


PAIRS = [Combo(SYNC, "sync"), Combo(ASYNC, "aio")]
CROSSED = [*PAIRS, Combo(SYNC, "aio"), Combo(ASYNC, "sync")]


@dataclass
class Env:
    flavour: Flavour
    m: Any  # dtmcli.grpc or dtmcli.asyncio.grpc
    dtm: DtmFacade
    client: Any  # DtmGrpcClient or AsyncDtmGrpcClient, with the HTTP API for queries
    bank: Bank

    def run(self, x: Any) -> Any:
        return self.flavour.run(x)

    def wait(self, gid: str, *statuses: str) -> str:
        return self.dtm.wait_status(gid, statuses or ("succeed", "failed"), timeout=30).status


@pytest.fixture(params=PAIRS, ids=[c.id for c in PAIRS])
def combo(request: pytest.FixtureRequest) -> Combo:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
def env(combo: Combo, dtm_grpc: DtmFacade) -> Iterator[Env]:
    bank = Bank(combo.server)
    require(bank.db)
    _prepare(bank.db)
    assert dtm_grpc.grpc_target is not None
    sgrpc.set_grpc_dtm_servers(dtm_grpc.grpc_target)  # nested TCC and XA registration trust this dtm-dtm only
    try:
        with serve(bank):
            if combo.client.is_async:
                client: Any = agrpc.AsyncDtmGrpcClient(dtm_grpc.grpc_target, http=dtm_grpc.url)
                yield Env(combo.client, agrpc, dtm_grpc, client, bank)
                combo.client.run(client.aclose())
            else:
                with sgrpc.DtmGrpcClient(dtm_grpc.grpc_target, http=dtm_grpc.url) as client:
                    yield Env(combo.client, sgrpc, dtm_grpc, client, bank)
    finally:
        sgrpc.set_grpc_dtm_servers()


# -- saga -----------------------------------------------------------------------------------------------------


def transfer_saga(env: Env, value: int = 30, **options: Any) -> Any:
    b = env.bank
    saga = env.m.Saga(env.client, local_gid(), **options)
    saga.add(b.url("TransOut"), b.url("TransOutRevert"), amount(value))
    return saga.add(b.url("TransIn"), b.url("TransInRevert"), amount(value))


@pytest.mark.parametrize("combo", CROSSED, ids=[c.id for c in CROSSED], indirect=True)
def test_saga_success(env: Env) -> None:
    saga = transfer_saga(env)
    env.run(saga.submit())
    assert env.wait(saga.gid) == "succeed"
    assert env.bank.calls(saga.gid) == [("TransOut", "01", "action"), ("TransIn", "02", "action")]
    assert env.bank.effects(saga.gid) == [("01", "action", "TransOut", 30), ("02", "action", "TransIn", 30)]
    assert [(b.branch_id, b.op, b.status) for b in env.dtm.query(saga.gid).branches] == [  # type: ignore[union-attr]
        ("01", "compensate", "prepared"), ("01", "action", "succeed"),
        ("02", "compensate", "prepared"), ("02", "action", "succeed"),
    ]


def test_saga_failure_compensates_in_reverse_order(env: Env) -> None:
    env.bank.fail["TransIn"] = "no account 3"
    saga = transfer_saga(env, wait_result=True)
    with pytest.raises(DtmFailure, match="no account 3"):
        env.run(saga.submit())  # wait_result: DTM's answer, settled through the HTTP query
    assert env.wait(saga.gid) == "failed"
    assert env.bank.calls(saga.gid) == [
        ("TransOut", "01", "action"), ("TransIn", "02", "action"),  # Aborted: FAILURE
        ("TransInRevert", "02", "compensate"), ("TransOutRevert", "01", "compensate"),
    ]
    # TransIn's work was rolled back, so its compensation is a null one the barrier skips; TransOut's is undone
    assert env.bank.effects(saga.gid) == [("01", "action", "TransOut", 30), ("01", "compensate", "TransOutRevert", 30)]


# -- TCC ------------------------------------------------------------------------------------------------------


def run_tcc(env: Env, gid: str, **options: Any) -> Any:
    b = env.bank
    if env.flavour.is_async:
        async def body() -> None:
            async with env.m.tcc_global_transaction(env.client, gid, **options) as tcc:
                await tcc.call_branch(amount(10), b.url("TransOutTry"), b.url("TransOutConfirm"),
                                      b.url("TransOutCancel"))
                await tcc.call_branch(amount(10), b.url("TransInTry"), b.url("TransInConfirm"), b.url("TransInCancel"))
        return env.run(body())
    with env.m.tcc_global_transaction(env.client, gid, **options) as tcc:
        tcc.call_branch(amount(10), b.url("TransOutTry"), b.url("TransOutConfirm"), b.url("TransOutCancel"))
        tcc.call_branch(amount(10), b.url("TransInTry"), b.url("TransInConfirm"), b.url("TransInCancel"))


TRIES = [("TransOutTry", "01", "try"), ("TransInTry", "02", "try"), ("HopTry", "0201", "try")]


def test_tcc_with_nested_tcc_confirms_in_reverse_order(env: Env) -> None:
    env.bank.nest = True
    gid = local_gid()
    run_tcc(env, gid, wait_result=True)
    assert env.wait(gid) == "succeed"
    assert env.bank.calls(gid) == [
        *TRIES,  # the nested branch 0201 is registered and tried from TransInTry, over gRPC metadata
        ("HopConfirm", "0201", "confirm"), ("TransInConfirm", "02", "confirm"), ("TransOutConfirm", "01", "confirm"),
    ]
    assert [e[:3] for e in env.bank.effects(gid)] == [
        ("01", "confirm", "TransOutConfirm"), ("01", "try", "TransOutTry"), ("02", "confirm", "TransInConfirm"),
        ("02", "try", "TransInTry"), ("0201", "confirm", "HopConfirm"), ("0201", "try", "HopTry"),
    ]


def test_tcc_nested_failure_cancels_every_branch(env: Env) -> None:
    env.bank.nest = True
    env.bank.fail["HopTry"] = "hop refused"
    gid = local_gid()
    with pytest.raises(DtmFailure, match="hop refused"):
        run_tcc(env, gid)
    assert env.wait(gid) == "failed"
    assert env.bank.calls(gid) == [
        *TRIES,
        ("HopCancel", "0201", "cancel"), ("TransInCancel", "02", "cancel"), ("TransOutCancel", "01", "cancel"),
    ]
    assert env.dtm.query(gid).rollback_reason  # type: ignore[union-attr]
    # HopTry rolled back -> its cancel is a null compensation; the other tries committed and are cancelled
    assert [e[:3] for e in env.bank.effects(gid)] == [
        ("01", "cancel", "TransOutCancel"), ("01", "try", "TransOutTry"),
        ("02", "cancel", "TransInCancel"), ("02", "try", "TransInTry"),
    ]


# -- msg ------------------------------------------------------------------------------------------------------


def transfer_msg(env: Env, gid: str) -> Any:
    b = env.bank
    return env.m.Msg(env.client, gid).add(b.url("TransOut"), amount(20)).add(b.url("TransIn"), amount(20))


ACTIONS = [("TransOut", "01", "action"), ("TransIn", "02", "action")]


def test_msg_prepare_then_submit(env: Env) -> None:
    gid = local_gid()
    msg = transfer_msg(env, gid)
    env.run(msg.prepare(env.bank.url("QueryPrepared")))
    assert env.dtm.query(gid).status == "prepared"  # type: ignore[union-attr]
    assert env.bank.calls(gid) == []
    env.run(msg.submit())
    assert env.wait(gid) == "succeed"
    assert env.bank.calls(gid) == ACTIONS


class LocalError(Exception):
    """A business error that is not a DtmFailure: do_and_submit asks query_prepared what happened."""


def do_and_submit(env: Env, msg: Any, outcome: str) -> None:
    """The msg's local work in the bank's own database, under the msg barrier:
    ``ok`` commits; ``rollback`` raises inside the local transaction; ``lost`` commits, then raises."""
    qp = env.bank.url("QueryPrepared")

    def insert_sql(marks: str) -> str:
        return f"insert into {TABLE} (gid, branch_id, op, method, amount) values ({marks})"

    if env.bank.db == "mysql" and not env.flavour.is_async:
        def work(tx: Any) -> None:
            tx.cursor().execute(insert_sql("%s, %s, %s, %s, %s"), (msg.gid, "00", "local", "Local", 20))
            if outcome == "rollback":
                raise LocalError("local work failed")

        if outcome == "lost":
            def busi(barrier: Any) -> None:
                barrier.call_with_db(mysql_connect, work)
                raise LocalError("answer lost after commit")
            msg.do_and_submit(qp, busi)
        else:
            with contextlib.closing(mysql_connect()) as conn:
                msg.do_and_submit_db(qp, conn, work)
        return

    assert env.bank.db == "postgres" and env.flavour.is_async, "the local work uses the bank's database"

    async def main() -> None:
        import asyncpg

        async def awork(tx: Any) -> None:
            await tx.execute(insert_sql("$1, $2, $3, $4, $5"), msg.gid, "00", "local", "Local", 20)
            if outcome == "rollback":
                raise LocalError("local work failed")

        conn = await asyncpg.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                                     database=POSTGRES["dbname"])
        try:
            if outcome == "lost":
                async def busi(barrier: Any) -> None:
                    await barrier.call(conn, awork)
                    raise LocalError("answer lost after commit")
                await msg.do_and_submit(qp, busi)
            else:
                await msg.do_and_submit_db(qp, conn, awork)
        finally:
            await conn.close()

    env.run(main())


def test_msg_do_and_submit_commits_then_submits(env: Env) -> None:
    msg = transfer_msg(env, local_gid())
    do_and_submit(env, msg, "ok")
    assert env.wait(msg.gid) == "succeed"
    assert env.bank.calls(msg.gid) == ACTIONS  # query_prepared was not needed
    assert ("00", "local", "Local", 20) in env.bank.effects(msg.gid)


def test_msg_do_and_submit_rolled_back_asks_query_prepared_and_aborts(env: Env) -> None:
    msg = transfer_msg(env, local_gid())
    with pytest.raises(LocalError, match="local work failed"):
        do_and_submit(env, msg, "rollback")
    assert env.wait(msg.gid) == "failed"
    # the client asked query_prepared over gRPC (branch 00, op msg): Aborted, so it aborted; no action ran
    assert env.bank.calls(msg.gid) == [("QueryPrepared", "00", "msg")]
    assert env.bank.effects(msg.gid) == []


def test_msg_do_and_submit_committed_but_failed_asks_and_submits(env: Env) -> None:
    msg = transfer_msg(env, local_gid())
    with pytest.raises(LocalError, match="answer lost"):
        do_and_submit(env, msg, "lost")
    assert env.wait(msg.gid) == "succeed"
    assert env.bank.calls(msg.gid) == [("QueryPrepared", "00", "msg"), *ACTIONS]


# -- XA (global side over gRPC; the branch registers itself over gRPC, phase 2 is DTM's gRPC call) -----------


def run_xa(env: Env, gid: str) -> Any:
    b = env.bank
    if env.flavour.is_async:
        async def body() -> None:
            async with env.m.xa_global_transaction(env.client, gid) as xa:
                await xa.call_branch(amount(5), b.url("XaOut"))
                await xa.call_branch(amount(5), b.url("XaIn"))
        return env.run(body())
    with env.m.xa_global_transaction(env.client, gid) as xa:
        xa.call_branch(amount(5), b.url("XaOut"))
        xa.call_branch(amount(5), b.url("XaIn"))


def test_xa_commits_registered_branches(env: Env) -> None:
    gid = local_gid()
    run_xa(env, gid)
    assert env.wait(gid) == "succeed"
    assert env.bank.calls(gid)[:2] == [("XaOut", "01", "action"), ("XaIn", "02", "action")]
    assert sorted(env.bank.calls(gid)[2:]) == [("XaIn", "02", "commit"), ("XaOut", "01", "commit")]


def test_xa_failure_rolls_back_registered_branches(env: Env) -> None:
    env.bank.fail["XaIn"] = "xa refused"
    gid = local_gid()
    with pytest.raises(DtmFailure, match="xa refused"):
        run_xa(env, gid)
    assert env.wait(gid) == "failed"
    # XaIn failed before registering: only XaOut is rolled back
    assert env.bank.calls(gid) == [("XaOut", "01", "action"), ("XaIn", "02", "action"), ("XaOut", "01", "rollback")]


# -- mixed: gRPC and HTTP branches in one saga -----------------------------------------------------------------


@pytest.mark.parametrize("fail", [False, True], ids=["success", "compensated"])
def test_saga_with_a_grpc_and_an_http_branch(env: Env, fail: bool) -> None:
    """DTM calls a URL starting with http:// over HTTP and the others over gRPC (protocol.md §4); an HTTP-protocol
    transaction calls every URL over HTTP, so the HTTP ``dtmcli.Saga`` refuses a gRPC URL and the mixed saga goes
    through the gRPC API, its HTTP step carrying JSON bytes."""
    with pytest.raises(DtmInvalidInput, match="http"):
        dtmcli.Saga(env.dtm.url).add(env.bank.url("TransOut"), "", {"amount": 30})
    with BranchService() as http:
        in_url = http.route("/api/busi/TransIn", Answer(409) if fail else Answer(200))
        in_revert = http.route("/api/busi/TransInRevert")
        http_seen: list[list[str]] = []
        env.bank.on_call = lambda method: http_seen.append([f"{c.path} {c.op}" for c in http.calls()])
        saga = env.m.Saga(env.client, local_gid())
        saga.add(env.bank.url("TransOut"), env.bank.url("TransOutRevert"), amount(30))
        saga.add(in_url, in_revert, b'{"amount":30}')
        env.run(saga.submit())
        assert env.wait(saga.gid) == ("failed" if fail else "succeed")
        calls = http.calls()
    assert all(c.method == "POST" and c.json() == {"amount": 30} and c.branch_id == "02" for c in calls)
    assert [c.op for c in calls] == (["action", "compensate"] if fail else ["action"])
    if not fail:
        assert env.bank.calls(saga.gid) == [("TransOut", "01", "action")]
        return
    assert env.bank.calls(saga.gid) == [("TransOut", "01", "action"), ("TransOutRevert", "01", "compensate")]
    # the gRPC compensation ran after both HTTP calls: reverse order across the two kinds of branch
    assert http_seen == [[], ["/api/busi/TransIn action", "/api/busi/TransInRevert compensate"]]
    assert env.bank.effects(saga.gid) == [("01", "action", "TransOut", 30), ("01", "compensate", "TransOutRevert", 30)]
