"""gRPC XA branches running their local XA transaction with one call: ``dtmcli.grpc.xa_local_transaction``
/ ``xa_handle_phase2`` (blocking ``grpc.server``) and ``dtmcli.asyncio.grpc``'s (``grpc.aio``).

End to end on the ``dtm_grpc`` coordinator (in process, or a real DTM with ``--dtm-grpc-server`` and
``--dtm-server``, which must reach 127.0.0.1 of this machine): the global XA transaction is driven over
DTM's gRPC API, each branch service debits or credits a row of MariaDB (PyMySQL, aiomysql) or
PostgreSQL (psycopg2, asyncpg) inside its local XA transaction, and DTM's phase-2 gRPC calls commit or
roll the prepared transactions back. Client and branches reach DTM through a recording gRPC pass-through
(``DtmProxy``), so a test sees which of DTM's gRPC methods were called: the branch registration is a
gRPC ``RegisterBranch``. Each test runs in a fresh MariaDB database / PostgreSQL schema (the barrier
conftest's ``mysql_db`` / ``pg_schema``); prepared transactions a failed test leaves are rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

import pytest
from barrier.conftest import mysql_db, pg_schema, query_all  # noqa: F401 - fixtures
from services import MYSQL, POSTGRES, in_ci

if not in_ci():
    pytest.importorskip("grpc")

import grpc  # CI: the grpc extra must be installed
import grpc.aio
from google.protobuf import wrappers_pb2
from grpc_serving import grpc_service, raw_handlers

import dtmcli.asyncio.grpc as agrpc
import dtmcli.grpc as sgrpc
from dtmcli import DtmClient, DtmFailure, DtmInvalidInput, local_gid
from dtmcli.barrier import create_schema
from dtmcli.branch import BranchRequestError
from dtmcli.grpc._proto import dtmgimp_pb2
from dtmcli.testing import DtmFacade

SERVICE = "bank.Bank"
DTM_PREFIX = "/dtmgimp.Dtm/"
START = 100  # each test's two accounts open with this balance


def amount(value: int) -> wrappers_pb2.Int64Value:
    return wrappers_pb2.Int64Value(value=value)


def wait_for(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(0.05)


# -- a recording pass-through to the coordinator's gRPC API ----------------------------------------------------


class DtmProxy(grpc.GenericRpcHandler):
    """Forwards every ``dtmgimp.Dtm`` call, bytes as they are, to ``upstream`` and records (method, request)."""

    def __init__(self, upstream: str) -> None:
        self.channel = grpc.insecure_channel(upstream)
        self.calls: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.server = grpc.server(ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers((self,))
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def service(self, details: grpc.HandlerCallDetails) -> Optional[grpc.RpcMethodHandler[Any, Any]]:
        method = str(details.method)
        if not method.startswith(DTM_PREFIX):
            return None
        stub = self.channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)

        def forward(request: bytes, context: Any) -> bytes:
            with self._lock:
                self.calls.append((method[len(DTM_PREFIX):], request))
            try:
                reply: bytes = stub(request, timeout=context.time_remaining())
            except grpc.RpcError as err:
                context.abort(err.code(), err.details())  # type: ignore[attr-defined]
            return reply

        return grpc.unary_unary_rpc_method_handler(forward)

    def methods(self, gid: Optional[str] = None) -> list[str]:
        """The methods called (for ``gid``: those whose request carries it), in order."""
        with self._lock:
            calls = list(self.calls)
        return [m for m, body in calls if gid is None or gid.encode() in body]

    def registrations(self, gid: str) -> list[dtmgimp_pb2.DtmBranchRequest]:
        with self._lock:
            bodies = [body for m, body in self.calls if m == "RegisterBranch"]
        found = [dtmgimp_pb2.DtmBranchRequest.FromString(b) for b in bodies]
        return [r for r in found if r.Gid == gid]

    def close(self) -> None:
        self.server.stop(0).wait()
        self.channel.close()


# -- the databases -----------------------------------------------------------------------------------------------

SYNC_DRIVERS = ("pymysql", "psycopg2")  # under grpc.server
ASYNC_DRIVERS = ("aiomysql", "asyncpg")  # under grpc.aio


class Db:
    """A fresh MariaDB database or PostgreSQL schema with its barrier and balance tables, factories of new
    ``driver`` connections for the branches, and a sync connection for the checks."""

    def __init__(self, driver: str, name: str, sync_connect: Callable[[], Any]) -> None:
        self.driver, self.name = driver, name
        self.mysql = driver in ("pymysql", "aiomysql")
        self.barrier, self.balance = f"{name}.barrier", f"{name}.balance"
        self.sync_connect = sync_connect
        self.sync = sync_connect()
        self.gids: list[str] = []
        create_schema(self.sync, table=self.barrier)
        cur = self.sync.cursor()
        cur.execute(f"create table {self.balance} (user_id varchar(128) primary key, balance int not null)")
        self.sync.commit()

    def new_gid(self) -> str:
        """A fresh gid with its two accounts (``<gid>-out``, ``<gid>-in``) opened at START."""
        gid = local_gid()
        self.gids.append(gid)
        cur = self.sync.cursor()
        for user in (f"{gid}-out", f"{gid}-in"):
            cur.execute(f"insert into {self.balance}(user_id, balance) values (%s, %s)", (user, START))
        self.sync.commit()
        return gid

    def connect(self) -> Any:
        """A new blocking connection (the branch's factory: xa_local_transaction closes it)."""
        if self.driver == "pymysql":
            import pymysql

            return pymysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                                   password=MYSQL["password"], database=self.name)
        import psycopg2

        return psycopg2.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                                dbname=POSTGRES["dbname"])

    async def aconnect(self) -> Any:
        """A new asyncio connection (the aio branch's factory)."""
        if self.driver == "aiomysql":
            import aiomysql

            return await aiomysql.connect(host=MYSQL["host"], port=MYSQL["port"], user=MYSQL["user"],
                                          password=MYSQL["password"], db=self.name, autocommit=False)
        import asyncpg

        return await asyncpg.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                                     database=POSTGRES["dbname"])

    def _move_sql(self, method: str) -> str:
        sign = "-" if method == "XaOut" else "+"
        sql = f"update {self.balance} set balance = balance {sign} %s where user_id = %s"
        return sql.replace("%s", "$1", 1).replace("%s", "$2") if self.driver == "asyncpg" else sql

    def move(self, tx: Any, method: str, gid: str, value: int) -> None:
        """The business SQL of a blocking branch: XaOut debits ``<gid>-out``, XaIn credits ``<gid>-in``."""
        user = f"{gid}-out" if method == "XaOut" else f"{gid}-in"
        cur = tx.cursor()
        cur.execute(self._move_sql(method), (value, user))
        assert cur.rowcount == 1
        cur.close()

    async def amove(self, tx: Any, method: str, gid: str, value: int) -> None:
        """The business SQL of an asyncio branch (see :meth:`move`)."""
        user = f"{gid}-out" if method == "XaOut" else f"{gid}-in"
        if self.driver == "asyncpg":
            assert await tx.execute(self._move_sql(method), value, user) == "UPDATE 1"
            return
        async with tx.cursor() as cur:
            assert await cur.execute(self._move_sql(method), (value, user)) == 1

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return query_all(self.sync, sql, params)  # and ends the read's transaction

    def balances(self, gid: str) -> tuple[int, int]:
        got = dict(self.rows(f"select user_id, balance from {self.balance} where user_id in (%s, %s)",
                             (f"{gid}-out", f"{gid}-in")))
        return int(got[f"{gid}-out"]), int(got[f"{gid}-in"])

    def reasons(self, gid: str) -> list[tuple[str, str, str]]:
        """The barrier rows of ``gid``: (branch_id, op, reason)."""
        return sorted((str(b), str(o), str(r)) for b, o, r in
                      self.rows(f"select branch_id, op, reason from {self.barrier} where gid = %s", (gid,)))

    def prepared(self, gid: str) -> list[str]:
        """The xids of ``gid`` still prepared on the server (XA RECOVER / pg_prepared_xacts)."""
        if self.mysql:
            xids = [r[3].decode() if isinstance(r[3], bytes) else str(r[3]) for r in self.rows("xa recover")]
        else:
            xids = [str(r[0]) for r in self.rows("select gid from pg_prepared_xacts")]
        return sorted(x for x in xids if x.startswith(f"{gid}-"))

    def roll_back_prepared(self) -> None:
        """Roll back what a failed test left prepared (it would block the drop and hold locks)."""
        leftover = [x for gid in self.gids for x in self.prepared(gid)]
        if not leftover:
            return
        conn = self.sync_connect()
        if not self.mysql:
            conn.autocommit = True
        cur = conn.cursor()
        for xid in leftover:  # xids are <gid>-<branch_id>: [A-Za-z0-9_-] only
            cur.execute(f"xa rollback '{xid}'" if self.mysql else f"rollback prepared '{xid}'")


# -- the branch services -------------------------------------------------------------------------------------------


class Bank:
    """A gRPC bank whose XaOut / XaIn run their work with xa_local_transaction and phase 2 with
    xa_handle_phase2; ``fail[method] = text`` makes that action's business code raise DtmFailure after its
    update (the local XA transaction then rolls back and the action answers Aborted)."""

    def __init__(self, db: Db) -> None:
        self.db = db
        self.kind = "sync" if db.driver in SYNC_DRIVERS else "aio"
        self.target = ""
        self.fail: dict[str, str] = {}
        self.seen: list[tuple[str, str, str, str, bytes]] = []  # (gid, method, branch_id, op, request)
        self._lock = threading.Lock()

    def url(self, method: str) -> str:
        return f"{self.target}/{SERVICE}/{method}"

    def calls(self, gid: str) -> list[tuple[str, str, str]]:
        with self._lock:
            return [(m, b, o) for g, m, b, o, _ in self.seen if g == gid]

    def requests(self, gid: str, op: str) -> list[bytes]:
        with self._lock:
            return [r for g, _, _, o, r in self.seen if g == gid and o == op]

    def _record(self, method: str, request: bytes, context: Any) -> tuple[Any, int]:
        info = sgrpc.branch_info_from_grpc(context)
        with self._lock:
            self.seen.append((info.gid, method, info.branch_id, info.op, request))
        return info, wrappers_pb2.Int64Value.FromString(request).value

    def handle(self, method: str, request: bytes, context: Any) -> None:
        info, value = self._record(method, request, context)
        if info.op != "action":
            sgrpc.xa_handle_phase2(context, self.db.connect, table=self.db.barrier)
            return

        def busi(tx: Any) -> None:
            self.db.move(tx, method, info.gid, value)
            if method in self.fail:
                raise DtmFailure(self.fail[method])

        sgrpc.xa_local_transaction(context, self.db.connect, busi, table=self.db.barrier)

    async def ahandle(self, method: str, request: bytes, context: Any) -> None:
        info, value = self._record(method, request, context)
        if info.op != "action":
            await agrpc.xa_handle_phase2(context, self.db.aconnect, table=self.db.barrier)
            return

        async def busi(tx: Any) -> None:
            await self.db.amove(tx, method, info.gid, value)
            if method in self.fail:
                raise DtmFailure(self.fail[method])

        await agrpc.xa_local_transaction(context, self.db.aconnect, busi, table=self.db.barrier)

    def handlers(self) -> grpc.GenericRpcHandler:
        return raw_handlers(SERVICE, ("XaOut", "XaIn"), self.kind, self.handle, self.ahandle)


@contextlib.contextmanager
def serve(bank: Bank) -> Iterator[Bank]:
    """Start ``bank`` on 127.0.0.1 with dtmcli's interceptor: ``grpc.server``, or ``grpc.aio`` in a loop thread."""
    with grpc_service(bank.kind, bank.handlers()) as target:
        bank.target = target
        yield bank


@pytest.fixture
def proxy(dtm_grpc: DtmFacade) -> Iterator[DtmProxy]:
    """The recording pass-through to the coordinator's gRPC API, the only DTM target branches trust."""
    assert dtm_grpc.grpc_target is not None
    p = DtmProxy(dtm_grpc.grpc_target)
    sgrpc.set_grpc_dtm_servers(p.target)
    try:
        yield p
    finally:
        sgrpc.set_grpc_dtm_servers()
        p.close()


@pytest.fixture(params=[*SYNC_DRIVERS, *ASYNC_DRIVERS])
def db(request: pytest.FixtureRequest) -> Iterator[Db]:
    driver = str(request.param)
    name, connect = request.getfixturevalue("mysql_db" if driver in ("pymysql", "aiomysql") else "pg_schema")
    database = Db(driver, name, connect)
    try:
        yield database
    finally:
        database.roll_back_prepared()


@pytest.fixture
def bank(db: Db, proxy: DtmProxy) -> Iterator[Bank]:
    with serve(Bank(db)) as b:
        yield b


def transfer(proxy: DtmProxy, dtm: DtmFacade, bank: Bank, gid: str, value: int,
             during: Callable[[], None] = lambda: None) -> None:
    """The global XA transaction over DTM's gRPC API (through the proxy): XaOut then XaIn, ``value`` each;
    ``during`` runs after both actions answered, before submit."""
    with sgrpc.DtmGrpcClient(proxy.target, http=dtm.url) as client:
        with sgrpc.xa_global_transaction(client, gid) as xa:
            xa.call_branch(amount(value), bank.url("XaOut"))
            xa.call_branch(amount(value), bank.url("XaIn"))
            during()


# -- end to end ------------------------------------------------------------------------------------------------------


def test_two_branches_prepare_then_phase2_commits_both(dtm_grpc: DtmFacade, proxy: DtmProxy, db: Db,
                                                       bank: Bank) -> None:
    gid = db.new_gid()
    seen_prepared: list[list[str]] = []

    def during() -> None:  # both actions answered: their work is prepared, not yet committed
        seen_prepared.append(db.prepared(gid))
        assert db.balances(gid) == (START, START)

    transfer(proxy, dtm_grpc, bank, gid, 30, during)
    assert seen_prepared == [[f"{gid}-01", f"{gid}-02"]]
    assert dtm_grpc.wait_status(gid).status == "succeed"
    wait_for(lambda: not db.prepared(gid) and db.balances(gid) == (START - 30, START + 30))
    assert db.reasons(gid) == [("01", "action", "action"), ("02", "action", "action")]
    wait_for(lambda: len(bank.calls(gid)) == 4)
    assert bank.calls(gid)[:2] == [("XaOut", "01", "action"), ("XaIn", "02", "action")]
    assert sorted(bank.calls(gid)[2:]) == [("XaIn", "02", "commit"), ("XaOut", "01", "commit")]
    assert bank.requests(gid, "commit") == [b"", b""]  # phase 2: the same method, an empty message

    # The registration went over gRPC: each branch called RegisterBranch (through the proxy, the dtm-dtm
    # the branches were given, which speaks only gRPC) with the phase-2 URL, and DTM holds exactly that.
    assert proxy.methods(gid) == ["Prepare", "RegisterBranch", "RegisterBranch", "Submit"]
    regs = proxy.registrations(gid)
    assert [(r.BranchID, r.TransType, dict(r.Data)) for r in regs] == [
        ("01", "xa", {"url": bank.url("XaOut")}), ("02", "xa", {"url": bank.url("XaIn")}),
    ]
    trans = dtm_grpc.query(gid)
    assert trans is not None
    assert sorted((b.branch_id, b.url) for b in trans.branches if b.op == "commit") == [
        ("01", bank.url("XaOut")), ("02", bank.url("XaIn")),
    ]


def test_a_failing_branch_rolls_both_back(dtm_grpc: DtmFacade, proxy: DtmProxy, db: Db, bank: Bank) -> None:
    bank.fail["XaIn"] = "account frozen"
    gid = db.new_gid()
    with pytest.raises(DtmFailure, match="account frozen"):
        transfer(proxy, dtm_grpc, bank, gid, 30)
    assert dtm_grpc.wait_status(gid).status == "failed"
    # XaIn rolled its local XA back before registering; XaOut was prepared and phase 2 rolls it back,
    # leaving the rollback marker so a late XaOut action could not run.
    wait_for(lambda: db.reasons(gid) == [("01", "action", "rollback")])
    wait_for(lambda: len(bank.calls(gid)) == 3)
    assert bank.calls(gid) == [("XaOut", "01", "action"), ("XaIn", "02", "action"), ("XaOut", "01", "rollback")]
    assert db.prepared(gid) == []
    assert db.balances(gid) == (START, START)
    assert [r.BranchID for r in proxy.registrations(gid)] == ["01"]


# -- refused before anything runs --------------------------------------------------------------------------------


class Untouched:
    """A connection factory and a business function that record being used (they must not be)."""

    def __init__(self) -> None:
        self.used: list[str] = []

    def connect(self) -> Any:
        self.used.append("connect")
        raise AssertionError("the connection factory was called")

    async def aconnect(self) -> Any:
        self.used.append("connect")
        raise AssertionError("the connection factory was called")

    def busi(self, tx: Any) -> None:
        self.used.append("busi")

    async def abusi(self, tx: Any) -> None:
        self.used.append("busi")


def action_metadata(proxy: DtmProxy, **over: Optional[str]) -> list[tuple[str, str]]:
    values: dict[str, Optional[str]] = {
        "gid": local_gid(), "trans_type": "xa", "branch_id": "01", "op": "action",
        "dtm": proxy.target, "phase2_url": f"{proxy.target}/{SERVICE}/XaOut", **over,
    }
    return [(f"dtm-{k}", v) for k, v in values.items() if v is not None]


BAD_ACTIONS = [
    pytest.param({"op": "commit"}, {}, DtmInvalidInput, "xa action", id="phase2-op"),
    pytest.param({"trans_type": "tcc", "op": "try"}, {}, DtmInvalidInput, "xa action", id="tcc-try"),
    pytest.param({"phase2_url": None}, {}, BranchRequestError, "phase2_url", id="no-phase2-url"),
    pytest.param({"dtm": None}, {}, BranchRequestError, "dtm-dtm", id="no-dtm"),
    pytest.param({"dtm": "127.0.0.1:9"}, {}, BranchRequestError, "not a trusted", id="untrusted-dtm"),
    pytest.param({}, {"table": "barrier; drop table x"}, DtmInvalidInput, "table", id="bad-table"),
    pytest.param({}, {"dtm": "http"}, DtmInvalidInput, "gRPC", id="http-client-as-dtm"),
]


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize(("over", "kwargs", "error", "match"), BAD_ACTIONS)
def test_a_bad_action_is_refused_before_anything_runs(
    dtm_grpc: DtmFacade, proxy: DtmProxy, flavour: str, over: dict[str, Optional[str]], kwargs: dict[str, Any],
    error: type[Exception], match: str,
) -> None:
    untouched = Untouched()
    metadata = action_metadata(proxy, **over)
    if kwargs.get("dtm") == "http":  # a client of the wrong kind for this API
        kwargs = {"dtm": DtmClient(dtm_grpc.url) if flavour == "sync" else sgrpc.DtmGrpcClient(proxy.target)}
    with pytest.raises(error, match=match):
        if flavour == "sync":
            sgrpc.xa_local_transaction(metadata, untouched.connect, untouched.busi, **kwargs)
        else:
            asyncio.run(agrpc.xa_local_transaction(metadata, untouched.aconnect, untouched.abusi, **kwargs))
    assert untouched.used == [] and proxy.calls == []


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_phase2_refuses_an_action_call(proxy: DtmProxy, flavour: str) -> None:
    untouched = Untouched()
    metadata = action_metadata(proxy)  # the action's call routed to the phase-2 handler
    with pytest.raises(DtmInvalidInput, match="commit or rollback"):
        if flavour == "sync":
            sgrpc.xa_handle_phase2(metadata, untouched.connect)
        else:
            asyncio.run(agrpc.xa_handle_phase2(metadata, untouched.aconnect))
    assert untouched.used == []
