"""A database error the business code swallows inside the barrier's transaction (real PostgreSQL/MariaDB).

PostgreSQL aborts the transaction and psycopg turns the barrier's COMMIT into a silent ROLLBACK: the
barrier must not answer SUCCESS for work that was not kept (DTM would never call again). MariaDB only
rolls back the failed statement, so the rest of the work commits as usual.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from conftest import BALANCE_TABLE, execute, query_all

from dtmcli import BarrierDatabaseError, BranchBarrier, local_gid


def _busi(driver: str, user: str) -> Callable[[Any], str]:
    def busi(tx: Any) -> str:
        cur = tx.cursor()
        cur.execute(f"insert into {BALANCE_TABLE} (user_id, balance) values (%s, 1)", (user,))
        try:
            cur.execute(f"insert into {BALANCE_TABLE} (user_id, balance) values (%s, 1)", (user,))  # duplicate key
        except Exception:
            pass  # "already there, fine": the bug this test is about
        cur.close()
        return "done"

    return busi


def test_a_swallowed_error_is_never_answered_success(connect: Callable[[], Any], driver: str) -> None:
    conn, user, gid = connect(), f"swallow-{local_gid()}", local_gid()
    bb = BranchBarrier("saga", gid, "01", "action")
    if driver == "pymysql":
        assert bb.call(conn, _busi(driver, user)) == "done"
        assert query_all(conn, f"select count(*) from {BALANCE_TABLE} where user_id = %s", (user,)) == [(1,)]
        execute(conn, f"delete from {BALANCE_TABLE} where user_id = %s", (user,))
        return
    with pytest.raises(BarrierDatabaseError, match="aborted by a database error the business code caught"):
        bb.call(conn, _busi(driver, user))
    assert query_all(conn, f"select count(*) from {BALANCE_TABLE} where user_id = %s", (user,)) == [(0,)]
    assert query_all(conn, "select count(*) from dtm_barrier.barrier where gid = %s", (gid,)) == [(0,)]
    # DTM retries after the 500; once the business code is fixed, the retry runs the work.
    assert BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: "again") == "again"
