"""Msg.do_and_submit_db on real databases against a mocked DTM (protocol.md §8)."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
import requests
import responses
from conftest import BALANCE_TABLE, execute, query_all

from dtmcli import DtmClient, DtmDuplicated, DtmFailure, Msg, local_gid
from dtmcli.barrier import query_prepared
from dtmcli.branch import handle_query

DTM = "http://dtm.test/api/dtmsvr"
QP = "http://busi.test/msg/qp"


def qp_callback(connect: Callable[[], Any]) -> Callable[[requests.PreparedRequest], tuple[int, dict[str, str], str]]:
    """The query_prepared endpoint of the business service, answering from the barrier table."""

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        from urllib.parse import parse_qs, urlsplit

        query = {k: v[0] for k, v in parse_qs(urlsplit(request.url or "").query).items()}
        conn = connect()
        try:
            # The real handler path: DtmFailure from query_prepared must become 409 (protocol.md §7).
            answer = handle_query(query, lambda info: query_prepared(info.query(), conn))
        finally:
            conn.close()
        return answer.status, {}, json.dumps(answer.body)

    return answer


def paths(rsps: responses.RequestsMock) -> list[str]:
    return [f"{c.request.method} {c.request.url.split('?')[0]}" for c in rsps.calls]


def add_balance(gid: str, amount: int) -> Callable[[Any], str]:
    def busi(tx: Any) -> str:
        execute(tx, f"update {BALANCE_TABLE} set balance = balance + %s where user_id = %s", (amount, gid))
        return "ok"

    return busi


def _open(conn: Any, gid: str) -> None:
    execute(conn, f"insert into {BALANCE_TABLE}(user_id, balance) values (%s, 0)", (gid,))
    conn.commit()


def _balance(conn: Any, gid: str) -> int:
    return int(query_all(conn, f"select balance from {BALANCE_TABLE} where user_id = %s", (gid,))[0][0])


def _msg(gid: str) -> Msg:
    return Msg(DtmClient(DTM), gid).add("http://busi.test/a1", {"amount": 5})


def test_success_prepares_commits_and_submits(connect: Callable[[], Any]) -> None:
    conn, gid = connect(), local_gid()
    _open(conn, gid)
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.post(f"{DTM}/submit", json={"dtm_result": "SUCCESS"})
        assert _msg(gid).do_and_submit_db(QP, conn, add_balance(gid, 5)) == "ok"
        assert paths(rsps) == [f"POST {DTM}/prepare", f"POST {DTM}/submit"]
    assert _balance(conn, gid) == 5
    query_prepared(gid, conn)  # DTM asking later hears "committed"


def test_business_error_queries_then_aborts(connect: Callable[[], Any]) -> None:
    conn, gid = connect(), local_gid()
    _open(conn, gid)

    def busi(tx: Any) -> None:
        add_balance(gid, 5)(tx)
        raise ConnectionResetError("connection reset")

    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.add_callback(responses.GET, QP, callback=qp_callback(connect))
        rsps.post(f"{DTM}/abort", json={"dtm_result": "SUCCESS"})
        with pytest.raises(ConnectionResetError):
            _msg(gid).do_and_submit_db(QP, conn, busi)
        assert paths(rsps) == [f"POST {DTM}/prepare", f"GET {QP}", f"POST {DTM}/abort"]
    assert _balance(conn, gid) == 0


def test_local_transaction_after_rollback_marker_is_duplicated(connect: Callable[[], Any]) -> None:
    conn, gid = connect(), local_gid()
    _open(conn, gid)
    # query_prepared already ran (the local transaction was too slow): the rollback marker wins
    with pytest.raises(DtmFailure):
        query_prepared(gid, connect())
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.add_callback(responses.GET, QP, callback=qp_callback(connect))
        rsps.post(f"{DTM}/abort", json={"dtm_result": "SUCCESS"})
        with pytest.raises(DtmDuplicated):
            _msg(gid).do_and_submit_db(QP, conn, add_balance(gid, 5))
        assert paths(rsps) == [f"POST {DTM}/prepare", f"GET {QP}", f"POST {DTM}/abort"]
    assert _balance(conn, gid) == 0


def test_factory_connection_is_closed(connect: Callable[[], Any]) -> None:
    conn, gid = connect(), local_gid()
    _open(conn, gid)
    made: list[Any] = []

    def factory() -> Any:
        made.append(connect())
        return made[-1]

    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "SUCCESS"})
        rsps.post(f"{DTM}/submit", json={"dtm_result": "SUCCESS"})
        _msg(gid).do_and_submit_db(QP, factory, add_balance(gid, 7))
    assert _balance(conn, gid) == 7
    assert len(made) == 1
    closed = made[0].open is False if hasattr(made[0], "open") else bool(made[0].closed)
    assert closed
