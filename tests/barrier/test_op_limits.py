"""The longest op a branch call may carry (MAX_OP_LEN) is stored by the SQL barrier, on MariaDB and PostgreSQL."""

from __future__ import annotations

from typing import Any

from conftest import query_all

from dtmcli import BranchInfo, local_gid
from dtmcli._consts import MAX_OP_LEN
from dtmcli.barrier import BranchBarrier


def test_longest_op_is_stored(conn: Any) -> None:
    gid = local_gid()
    op = "w" * MAX_OP_LEN
    info = BranchInfo.from_query({"gid": gid, "trans_type": "workflow", "branch_id": "01", "op": op})
    ran: list[str] = []
    BranchBarrier.from_info(info).call(conn, lambda tx: ran.append("busi"))
    assert ran == ["busi"]
    rows = query_all(conn, "select op, reason from dtm_barrier.barrier where gid = %s", (gid,))
    assert rows == [(op, op)]
