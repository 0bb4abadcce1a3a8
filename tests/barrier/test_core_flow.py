"""The one barrier algorithm (issue 10.10): ``core.run_barrier`` over a store adapter.

The SQL and MongoDB backends are thin adapters (insert-if-absent, begin/commit/rollback, error
mapping) around this flow; these tests drive it with an in-memory store so every branch of the flow
is checked once, independent of any database. The real-database behaviour is in test_sql.py,
test_mongo.py and the model test.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest

from dtmcli import DtmDuplicated, DtmError, DtmFailure
from dtmcli._barrier import core, mongo, sql
from dtmcli.barrier import BarrierConflict, BarrierDatabaseError, BranchBarrier, Decision


class MemoryStore:
    """Rows keyed (gid, branch_id, op, barrier_id); a transaction buffers its inserts until commit."""

    def __init__(self, rows: dict[tuple[str, ...], str], fail_insert: Optional[Exception] = None) -> None:
        self.rows = rows
        self.pending: dict[tuple[str, ...], str] = {}
        self.tx = "the-tx"
        self.events: list[str] = []
        self.fail_insert = fail_insert

    def begin(self) -> None:
        self.events.append("begin")

    def insert_if_absent(self, trans_type: str, gid: str, branch_id: str, op: str, barrier_id: str,
                         reason: str) -> int:
        if self.fail_insert is not None:
            raise self.fail_insert
        key = (gid, branch_id, op, barrier_id)
        if key in self.rows or key in self.pending:
            return 0
        self.pending[key] = reason
        return 1

    def commit(self) -> None:
        self.rows.update(self.pending)
        self.pending.clear()
        self.events.append("commit")

    def rollback(self, cause: BaseException) -> None:
        self.pending.clear()
        self.events.append(f"rollback:{type(cause).__name__}")

    def map_error(self, exc: BaseException, what: str) -> DtmError:
        return BarrierDatabaseError(f"{what}: {exc}")

    def busi_error(self, exc: Exception) -> Optional[DtmError]:
        return BarrierConflict("retry") if isinstance(exc, TimeoutError) else None


def run(rows: dict[tuple[str, ...], str], op: str, busi: Any = None, gid: str = "g1") -> tuple[Any, MemoryStore]:
    store = MemoryStore(rows)
    seen: list[Decision] = []
    result = core.run_barrier(store, BranchBarrier("saga" if op != "msg" else "msg", gid,
                                                   "00" if op == "msg" else "01", op),
                              busi or (lambda tx: f"ran with {tx}"), seen.append)
    store.events.append(seen[0].value)
    return result, store


def test_forward_then_duplicate() -> None:
    rows: dict[tuple[str, ...], str] = {}
    assert run(rows, "action")[0] == "ran with the-tx"
    result, store = run(rows, "action")
    assert result is None and store.events == ["begin", "commit", "duplicate"]


def test_null_compensation_then_suspended_forward_op() -> None:
    rows: dict[tuple[str, ...], str] = {}
    result, store = run(rows, "compensate")
    assert result is None and store.events == ["begin", "commit", "null_compensation"]
    assert rows == {("g1", "01", "action", "01"): "compensate", ("g1", "01", "compensate", "01"): "compensate"}
    assert run(rows, "action")[0] is None  # suspended: the compensation took its row


def test_business_error_rolls_the_markers_back_and_is_raised() -> None:
    rows: dict[tuple[str, ...], str] = {}

    def busi(tx: Any) -> None:
        raise DtmFailure("no money")

    with pytest.raises(DtmFailure):
        run(rows, "action", busi)
    assert rows == {}
    assert run(rows, "action")[0] == "ran with the-tx"  # the redelivery runs


def test_store_failure_in_business_is_mapped_by_the_adapter() -> None:
    def busi(tx: Any) -> None:
        raise TimeoutError("lock wait")

    with pytest.raises(BarrierConflict):
        run({}, "action", busi)


def test_repeated_msg_rolls_back_and_raises_duplicated() -> None:
    rows: dict[tuple[str, ...], str] = {}
    run(rows, "msg")
    store = MemoryStore(rows)
    with pytest.raises(DtmDuplicated):
        core.run_barrier(store, BranchBarrier.for_msg("g1"), lambda tx: None)
    assert store.events == ["begin", "rollback:DtmDuplicated"]


def test_insert_failure_rolls_back_and_is_mapped() -> None:
    store = MemoryStore({}, fail_insert=OSError("gone"))
    with pytest.raises(BarrierDatabaseError, match="insert: gone"):
        core.run_barrier(store, BranchBarrier("saga", "g1", "01", "action"), lambda tx: None)
    assert store.events == ["begin", "rollback:OSError"]


def test_settle_prepared() -> None:
    core.settle_prepared("msg", "g1")
    with pytest.raises(DtmFailure):
        core.settle_prepared("rollback", "g1")
    with pytest.raises(BarrierDatabaseError):
        core.settle_prepared(None, "g1")


@pytest.mark.parametrize("module", [sql, mongo])
def test_backends_hold_no_decision_logic_of_their_own(module: Any) -> None:
    """Before: sql.py and mongo.py each wrote the flow out and called ``decide`` themselves."""
    assert not hasattr(module, "decide") and not hasattr(module, "origin_op")
    assert module.run_barrier is core.run_barrier
    assert not hasattr(mongo, "SqlBarrierIdentity")  # Mongo no longer borrows the SQL identity type


def test_mongo_barrier_is_labelled_experimental() -> None:
    from dtmcli.barrier import BranchBarrier, ddl, query_prepared_mongo

    for doc in (mongo.__doc__, mongo.barrier_call.__doc__, BranchBarrier.mongo_call.__doc__,
                query_prepared_mongo.__doc__):
        assert "experimental" in (doc or "").lower()
    text = ddl("mongo", "app.dtm_barrier_x")
    assert "EXPERIMENTAL" in text and 'getSiblingDB("app")' in text and "db.dtm_barrier_x.createIndex(" in text
