"""Local XA branches (protocol.md §9) on MariaDB and PostgreSQL, with registerBranch mocked.

Needs PostgreSQL with max_prepared_transactions > 0: run ``scripts/setup-services.sh`` first.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import responses
from conftest import BALANCE_TABLE, execute, query_all

from dtmcli import DtmFailure, DtmInvalidInput, local_gid
from dtmcli.barrier import BarrierDatabaseError, xa_handle_phase2, xa_local_transaction, xa_preflight

DTM = "http://dtm.test/api/dtmsvr"
URL = "http://busi.test/xa/branch"


def action_query(gid: str, branch_id: str = "01") -> dict[str, str]:
    return {"gid": gid, "trans_type": "xa", "branch_id": branch_id, "op": "action", "dtm": DTM, "phase2_url": URL}


def phase2_query(gid: str, op: str, branch_id: str = "01") -> dict[str, str]:
    return {"gid": gid, "trans_type": "xa", "branch_id": branch_id, "op": op}


def prepared_xids(driver: str, conn: Any) -> set[str]:
    if driver == "pymysql":
        rows = query_all(conn, "xa recover")
        return {str(r[3].decode() if isinstance(r[3], bytes) else r[3]) for r in rows}
    return {r[0] for r in query_all(conn, "select gid from pg_prepared_xacts")}


def add_balance(gid: str, amount: int) -> Callable[[Any], str]:
    def busi(tx: Any) -> str:
        execute(tx, f"insert into {BALANCE_TABLE}(user_id, balance) values (%s, %s)", (gid, amount))
        return "done"

    return busi


def balances(conn: Any, gid: str) -> list[int]:
    return [int(r[0]) for r in query_all(conn, f"select balance from {BALANCE_TABLE} where user_id = %s", (gid,))]


def barrier_reasons(conn: Any, gid: str) -> list[str]:
    return [r[0] for r in query_all(conn, "select reason from dtm_barrier.barrier where gid = %s", (gid,))]


def test_preflight_passes_on_configured_servers(conn: Any) -> None:
    xa_preflight(conn)


def test_action_prepares_and_commit_is_idempotent(driver: str, connect: Callable[[], Any]) -> None:
    xa_conn, other = connect(), connect()
    gid = local_gid()
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/registerBranch", json={"dtm_result": "SUCCESS"})
        assert xa_local_transaction(action_query(gid), xa_conn, add_balance(gid, 10)) == "done"
        xa_conn.close()  # MariaDB: a prepared branch stays bound to its session until it disconnects
        assert json.loads(rsps.calls[0].request.body or b"") == {
            "gid": gid, "trans_type": "xa", "branch_id": "01", "url": URL,
        }
    assert f"{gid}-01" in prepared_xids(driver, other)
    assert balances(other, gid) == []  # prepared, not committed
    xa_handle_phase2(phase2_query(gid, "commit"), other)
    xa_handle_phase2(phase2_query(gid, "commit"), other)  # repeated phase 2: no error
    assert balances(other, gid) == [10]
    assert barrier_reasons(other, gid) == ["action"]
    assert f"{gid}-01" not in prepared_xids(driver, other)


def test_rollback_then_late_action_is_refused(driver: str, connect: Callable[[], Any]) -> None:
    other = connect()
    gid = local_gid()
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/registerBranch", json={"dtm_result": "SUCCESS"})
        xa_local_transaction(action_query(gid), connect, add_balance(gid, 10))  # factory: opened and closed
    xa_handle_phase2(phase2_query(gid, "rollback"), other)
    xa_handle_phase2(phase2_query(gid, "rollback"), other)
    assert balances(other, gid) == []
    assert barrier_reasons(other, gid) == ["rollback"]

    late = local_gid()
    xa_handle_phase2(phase2_query(late, "rollback"), other)  # rollback before the action arrived
    with responses.RequestsMock() as rsps:  # no registerBranch may be sent
        with pytest.raises(DtmFailure):
            xa_local_transaction(action_query(late), connect(), add_balance(late, 10))
        assert len(rsps.calls) == 0
    assert balances(other, late) == []
    assert f"{late}-01" not in prepared_xids(driver, other)


def test_business_error_rolls_back_without_registering(driver: str, connect: Callable[[], Any]) -> None:
    xa_conn, other = connect(), connect()
    gid = local_gid()

    def busi(tx: Any) -> None:
        add_balance(gid, 10)(tx)
        raise ValueError("no")

    with responses.RequestsMock() as rsps:
        with pytest.raises(ValueError):
            xa_local_transaction(action_query(gid), xa_conn, busi)
        assert len(rsps.calls) == 0
    assert balances(other, gid) == []
    assert barrier_reasons(other, gid) == []
    assert f"{gid}-01" not in prepared_xids(driver, other)
    # the connection is usable again
    assert query_all(xa_conn, "select 1") == [(1,)]


def test_register_409_rolls_back(driver: str, connect: Callable[[], Any]) -> None:
    xa_conn, other = connect(), connect()
    gid = local_gid()
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/registerBranch", status=409, json={"dtm_result": "FAILURE", "message": "not prepared"})
        with pytest.raises(DtmFailure):
            xa_local_transaction(action_query(gid), xa_conn, add_balance(gid, 10))
    assert balances(other, gid) == []
    assert f"{gid}-01" not in prepared_xids(driver, other)


@pytest.mark.parametrize("gid", ["a'b", "x');drop", "a b", "é"])
def test_xid_injection_is_rejected(conn: Any, gid: str) -> None:
    with pytest.raises(DtmInvalidInput):
        xa_local_transaction(action_query(gid), conn, lambda tx: None)
    with pytest.raises(DtmInvalidInput):
        xa_handle_phase2(phase2_query(gid, "commit"), conn)


def test_mysql_gtrid_limit(mysql_ready: None) -> None:
    from conftest import mysql_connect

    conn = mysql_connect()
    try:
        with pytest.raises(DtmInvalidInput, match="at most 64"):
            xa_local_transaction(action_query("g" * 62), conn, lambda tx: None)
    finally:
        conn.close()


def test_phase2_rejects_other_ops(conn: Any) -> None:
    with pytest.raises(DtmInvalidInput):
        xa_handle_phase2({"gid": "g1", "trans_type": "xa", "branch_id": "01", "op": "action"}, conn)
    with pytest.raises(DtmInvalidInput):
        xa_local_transaction(phase2_query("g1", "commit"), conn, lambda tx: None)


class _FakeCursor:
    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows
        self.rowcount = 0

    def execute(self, sql: str, params: Any = None) -> None:
        self.sql = sql

    def fetchone(self) -> Any:
        return self.rows[0]

    def close(self) -> None:
        pass


class _NoPreparedPg:
    """A PostgreSQL-like DB-API connection whose server has max_prepared_transactions = 0."""

    def cursor(self) -> _FakeCursor:
        return _FakeCursor([("0",)])

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass


def test_preflight_explains_max_prepared_transactions() -> None:
    with pytest.raises(BarrierDatabaseError, match="max_prepared_transactions"):
        xa_preflight(_NoPreparedPg(), dialect="postgres")


def test_commit_while_another_session_holds_the_prepared_xa_is_retried_not_lost(
    driver: str, connect: Callable[[], Any]
) -> None:
    """MariaDB keeps a prepared XA attached to its session until it disconnects; a commit from
    another session then finds no xid. Answering success there would lose the branch's work."""
    if driver != "pymysql":
        pytest.skip("PostgreSQL prepared transactions are detached from their session")
    from dtmcli import BarrierConflict

    xa_conn, other = connect(), connect()
    gid = local_gid()
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/registerBranch", json={"dtm_result": "SUCCESS"})
        xa_local_transaction(action_query(gid), xa_conn, add_balance(gid, 7))
    try:
        with pytest.raises(BarrierConflict, match="held by another session"):
            xa_handle_phase2(phase2_query(gid, "commit"), other)  # xa_conn still open: like a pooled connection
        assert balances(other, gid) == []
    finally:
        xa_conn.close()
    xa_handle_phase2(phase2_query(gid, "commit"), other)  # DTM's retry, once the session is gone
    assert balances(other, gid) == [7]
