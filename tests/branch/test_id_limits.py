"""One source of truth for the id and op limits: the barrier table's columns (dtmcli/sql/*.sql)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dtmcli import BranchInfo, BranchRequestError
from dtmcli._consts import MAX_BRANCH_ID_LEN, MAX_GID_LEN, MAX_OP_LEN
from dtmcli.barrier import BranchBarrier
from dtmcli.branch import handle_query

SQL_DIR = Path(__file__).resolve().parents[2] / "dtmcli" / "sql"


@pytest.mark.parametrize("dialect", ["mysql", "postgres"])
def test_limits_are_the_barrier_columns(dialect: str) -> None:
    ddl = (SQL_DIR / f"barrier.{dialect}.sql").read_text()
    width = {name: int(n) for name, n in re.findall(r"^\s*(\w+)\s+varchar\((\d+)\)", ddl, re.M)}
    assert width["gid"] == MAX_GID_LEN and width["branch_id"] == MAX_BRANCH_ID_LEN
    assert width["op"] == MAX_OP_LEN and width["reason"] >= MAX_OP_LEN  # reason holds an op


def wf(op: str) -> dict[str, str]:
    return {"gid": "G-lim", "trans_type": "workflow", "branch_id": "01", "op": op}


def test_an_op_the_barrier_cannot_store_is_400_at_parse_time() -> None:
    longest = "w" * MAX_OP_LEN
    bb = BranchBarrier.from_info(BranchInfo.from_query(wf(longest)))
    assert bb.op == longest
    with pytest.raises(BranchRequestError, match=f"at most {MAX_OP_LEN}"):
        BranchInfo.from_query(wf(longest + "w"))
    called: list[BranchInfo] = []
    answer = handle_query(wf(longest + "w"), called.append)
    assert answer.status == 400 and called == []
