"""Local XA branches never report success for work that is lost (blocking drivers; the asyncio ones are
in test_async_xa.py).

PostgreSQL aborts a whole transaction on any error, also one the business code catches; PREPARE
TRANSACTION then quietly rolls it back (command tag ROLLBACK, no error). The action must fail instead
of answering success, and a phase-2 commit that finds neither the prepared transaction nor the
action's committed barrier row must not answer success either. Each test runs in a fresh PostgreSQL
schema (the barrier conftest's ``pg_schema``) with its own barrier and balance tables; registerBranch
is mocked.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest
import responses
from barrier.conftest import pg_schema  # noqa: F401 - fixtures
from services import POSTGRES

from dtmcli import local_gid
from dtmcli.barrier import BarrierDatabaseError, create_schema, xa_handle_phase2, xa_local_transaction

DTM = "http://dtm.test/api/dtmsvr"
URL = "http://busi.test/xa"


class Pg:
    """A fresh schema with a barrier and a balance table, and a factory of ``driver`` connections to it."""

    def __init__(self, driver: str, name: str, admin_connect: Callable[[], Any]) -> None:
        self.driver, self.name = driver, name
        self.barrier, self.balance = f"{name}.barrier", f"{name}.balance"
        self.admin = admin_connect()
        self.admin.autocommit = True
        create_schema(self.admin, table=self.barrier)
        self.run(f"create table {self.balance} (user_id varchar(128) primary key, balance int not null)")
        self.opened: list[Any] = []
        self.gids: list[str] = []

    def connect(self) -> Any:
        if self.driver == "psycopg2":
            import psycopg2

            conn = psycopg2.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                                    dbname=POSTGRES["dbname"], options=f"-c search_path={self.name}")
        else:
            import psycopg

            conn = psycopg.connect(host=POSTGRES["host"], port=POSTGRES["port"], user=POSTGRES["user"],
                                   dbname=POSTGRES["dbname"], options=f"-c search_path={self.name}")
        self.opened.append(conn)
        return conn

    def run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        cur = self.admin.cursor()
        try:
            cur.execute(sql, params)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []
        finally:
            cur.close()

    def new_gid(self) -> str:
        self.gids.append(local_gid())
        return self.gids[-1]

    def prepared(self, gid: str) -> list[str]:
        return [r[0] for r in self.run("select gid from pg_prepared_xacts where gid like %s", (f"{gid}-%",))]

    def close(self) -> None:
        for gid in self.gids:  # a failed test may leave a prepared transaction: it would block the drop
            for xid in self.prepared(gid):
                self.run(f"rollback prepared '{xid}'")
        for conn in self.opened:
            conn.close()
        self.admin.close()


@pytest.fixture(params=["psycopg2", "psycopg"])
def pg(request: pytest.FixtureRequest, pg_schema: tuple[str, Callable[[], Any]]) -> Iterator[Pg]:  # noqa: F811
    name, connect = pg_schema
    db = Pg(str(request.param), name, connect)
    yield db
    db.close()


def action(gid: str) -> dict[str, str]:
    return {"gid": gid, "trans_type": "xa", "branch_id": "01", "op": "action", "dtm": DTM, "phase2_url": URL}


def phase2(gid: str, op: str) -> dict[str, str]:
    return {"gid": gid, "trans_type": "xa", "branch_id": "01", "op": op}


def debit_with_a_swallowed_error(pg: Pg, user: str) -> Callable[[Any], str]:
    """Business code that debits, then makes an "idempotent" ledger insert whose duplicate-key error it catches."""

    def busi(conn: Any) -> str:
        cur = conn.cursor()
        cur.execute(f"update {pg.balance} set balance = balance - 30 where user_id = %s", (user,))
        try:
            cur.execute(f"insert into {pg.balance}(user_id, balance) values (%s, 0)", (user,))
        except Exception:  # "already recorded": exactly the mistake under test
            pass
        return "debited"

    return busi


def test_an_aborted_transaction_is_refused_not_prepared_as_a_rollback(pg: Pg) -> None:
    """C1. Before: the action answered "debited", registered the branch, prepared nothing; phase 2's commit
    answered success, and DTM marked the transfer succeeded with the debit lost."""
    gid = pg.new_gid()
    user = f"{gid}-acct"
    pg.run(f"insert into {pg.balance} values (%s, 100)", (user,))
    conn = pg.connect()
    with responses.RequestsMock() as rsps:  # registerBranch may not be sent: any request would fail
        with pytest.raises(BarrierDatabaseError, match="aborted by a database error the business code caught"):
            xa_local_transaction(action(gid), conn, debit_with_a_swallowed_error(pg, user), table=pg.barrier)
        assert len(rsps.calls) == 0
    assert pg.prepared(gid) == []
    assert pg.run(f"select reason from {pg.barrier} where gid = %s", (gid,)) == []
    assert pg.run(f"select balance from {pg.balance} where user_id = %s", (user,)) == [(100,)]
    cur = conn.cursor()  # the connection is out of the transaction and usable
    cur.execute("select 1")
    assert cur.fetchall() == [(1,)]


def test_a_prepare_the_server_answers_with_rollback_is_an_error(pg: Pg) -> None:
    """C1, belt and braces: business code that ended the transaction itself (a ROLLBACK of its own) leaves
    nothing to prepare; PREPARE TRANSACTION then answers the command tag ROLLBACK, and the action fails."""
    gid = pg.new_gid()
    user = f"{gid}-acct"

    def busi(conn: Any) -> str:
        cur = conn.cursor()
        cur.execute(f"insert into {pg.balance}(user_id, balance) values (%s, 5)", (user,))
        cur.execute("rollback")  # e.g. an error handler of its own
        return "inserted"

    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/registerBranch", json={"dtm_result": "SUCCESS"})
        with pytest.raises(BarrierDatabaseError, match="aborted"):
            xa_local_transaction(action(gid), pg.connect(), busi, table=pg.barrier)
    assert pg.prepared(gid) == [] and pg.run(f"select 1 from {pg.balance} where user_id = %s", (user,)) == []


def test_a_commit_finding_neither_the_prepared_xact_nor_the_action_row_is_an_error(pg: Pg) -> None:
    """C1, phase 2: before, an unknown xid was "already committed" whatever happened to the branch."""
    gid = pg.new_gid()
    with pytest.raises(BarrierDatabaseError, match="no committed action barrier row"):
        xa_handle_phase2(phase2(gid, "commit"), pg.connect, table=pg.barrier)
    # ... while a branch prepared and committed before (its action row committed with it) is done.
    done = pg.new_gid()
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/registerBranch", json={"dtm_result": "SUCCESS"})
        xa_local_transaction(action(done), pg.connect, lambda conn: "ok", table=pg.barrier)
    assert pg.prepared(done) == [f"{done}-01"]
    xa_handle_phase2(phase2(done, "commit"), pg.connect, table=pg.barrier)
    xa_handle_phase2(phase2(done, "commit"), pg.connect, table=pg.barrier)  # DTM's repeat: success
    assert pg.prepared(done) == []
    # A rollback of an unknown xid is still "already done" (and leaves its marker).
    xa_handle_phase2(phase2(gid, "rollback"), pg.connect, table=pg.barrier)
    assert pg.run(f"select reason from {pg.barrier} where gid = %s", (gid,)) == [("rollback",)]
    # After that marker, a commit is an error too: the branch was rolled back.
    with pytest.raises(BarrierDatabaseError, match="no committed action barrier row"):
        xa_handle_phase2(phase2(gid, "commit"), pg.connect, table=pg.barrier)
