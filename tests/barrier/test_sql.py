"""SQL barrier on real MariaDB (PyMySQL) and PostgreSQL (psycopg2, psycopg 3).

The expected outcome of every call sequence comes from a model written independently of
``dtmcli._barrier.core.decide`` (who "owns" the forward slot), and is checked against a real
balance table and an effect log written by the business functions.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, Optional

import pytest
from conftest import BALANCE_TABLE, EFFECT_TABLE, SERVICE, execute, query_all

from dtmcli import DtmDuplicated, DtmFailure, DtmInvalidInput, local_gid
from dtmcli._barrier import sql as barrier_sql
from dtmcli.barrier import BarrierConflict, BarrierDatabaseError, BranchBarrier, Decision, query_prepared

DELTA = {
    ("saga", "action"): 10, ("saga", "compensate"): -10,
    ("tcc", "try"): -10, ("tcc", "confirm"): 0, ("tcc", "cancel"): 10,
    ("workflow", "action"): 10, ("workflow", "rollback"): -10,
}
FORWARD = {"saga": "action", "tcc": "try", "workflow": "action"}
COMPENSATION = {"saga": "compensate", "tcc": "cancel", "workflow": "rollback"}
START = 100


def open_account(conn: Any, user: str) -> None:
    execute(conn, f"insert into {BALANCE_TABLE}(user_id, balance) values (%s, %s)", (user, START))
    conn.commit()


def balance(conn: Any, user: str) -> int:
    return int(query_all(conn, f"select balance from {BALANCE_TABLE} where user_id = %s", (user,))[0][0])


def effects(conn: Any, gid: str) -> list[str]:
    return sorted(r[0] for r in query_all(conn, f"select op from {EFFECT_TABLE} where gid = %s", (gid,)))


def barrier_rows(conn: Any, gid: str) -> list[tuple[str, ...]]:
    return sorted(
        tuple(r) for r in query_all(
            conn, "select trans_type, branch_id, op, barrier_id, reason from dtm_barrier.barrier where gid = %s", (gid,)
        )
    )


def busi_for(trans_type: str, gid: str, op: str) -> Callable[[Any], str]:
    """The business function of one op: adjust the balance and log the effect."""

    def busi(tx: Any) -> str:
        execute(tx, f"update {BALANCE_TABLE} set balance = balance + %s where user_id = %s",
                (DELTA[(trans_type, op)], gid))
        execute(tx, f"insert into {EFFECT_TABLE}(gid, op) values (%s, %s)", (gid, op))
        return f"did {op}"

    return busi


def call_op(conn: Any, trans_type: str, gid: str, op: str) -> tuple[Optional[str], Optional[Decision]]:
    bb = BranchBarrier(trans_type, gid, "01", op)
    result = bb.call(conn, busi_for(trans_type, gid, op))
    return result, bb.last_decision


def model(trans_type: str, seq: tuple[str, ...]) -> list[str]:
    """Which business functions must run, by who takes the forward op's slot first."""
    forward, compensation = FORWARD[trans_type], COMPENSATION[trans_type]
    slot: Optional[str] = None
    seen: set[str] = set()
    ran: list[str] = []
    for op in seq:
        if op in seen:
            continue
        seen.add(op)
        if op == compensation:
            if slot is None:
                slot = compensation  # null compensation: the forward op may never run now
            else:
                ran.append(op)
        elif op == forward:
            if slot is None:
                slot = forward
                ran.append(op)
        else:
            ran.append(op)
    return ran


def sequences() -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for trans_type in ("saga", "workflow"):
        out += [(trans_type, s) for s in itertools.product((FORWARD[trans_type], COMPENSATION[trans_type]), repeat=3)]
    out += [
        ("tcc", s) for s in itertools.product(("try", "confirm", "cancel"), repeat=3)
        if not ("confirm" in s and "cancel" in s)
    ]
    return out


def test_model_is_not_trivial() -> None:
    assert model("saga", ("compensate", "action")) == []
    assert model("saga", ("action", "action", "compensate")) == ["action", "compensate"]
    assert model("tcc", ("try", "confirm", "confirm")) == ["try", "confirm"]


def test_every_order_with_duplicates(conn: Any) -> None:
    for trans_type, seq in sequences():
        gid = local_gid()
        open_account(conn, gid)
        for op in seq:
            result, decision = call_op(conn, trans_type, gid, op)
            assert (result is not None) == (decision is Decision.RUN)
        expected = model(trans_type, seq)
        assert effects(conn, gid) == sorted(expected), (trans_type, seq)
        assert balance(conn, gid) == START + sum(DELTA[(trans_type, op)] for op in expected), (trans_type, seq)


def test_null_compensation_and_suspended_try_rows(conn: Any) -> None:
    gid = local_gid()
    open_account(conn, gid)
    assert call_op(conn, "tcc", gid, "cancel") == (None, Decision.NULL_COMPENSATION)
    assert call_op(conn, "tcc", gid, "try") == (None, Decision.DUPLICATE)  # suspended try
    assert balance(conn, gid) == START
    # both rows committed (not rolled back) on the null-compensation path, barrier id 01, reason = the op
    assert barrier_rows(conn, gid) == [("tcc", "01", "cancel", "01", "cancel"), ("tcc", "01", "try", "01", "cancel")]


def test_barrier_ids_count_up_within_one_branch_call(conn: Any) -> None:
    gid = local_gid()
    open_account(conn, gid)
    bb = BranchBarrier("saga", gid, "01", "action")
    bb.call(conn, busi_for("saga", gid, "action"))
    bb.call(conn, busi_for("saga", gid, "action"))
    assert [r[3] for r in barrier_rows(conn, gid)] == ["01", "02"]
    assert balance(conn, gid) == START + 20


def test_msg_barrier_duplicate_and_query_prepared(connect: Callable[[], Any]) -> None:
    conn = connect()
    gid = local_gid()
    open_account(conn, gid)
    BranchBarrier.for_msg(gid).call(conn, busi_for("saga", gid, "action"))
    with pytest.raises(DtmDuplicated):
        BranchBarrier.for_msg(gid).call(conn, busi_for("saga", gid, "action"))
    assert balance(conn, gid) == START + 10
    query_prepared({"trans_type": "msg", "gid": gid, "branch_id": "00", "op": "msg"}, conn)  # committed: success
    assert barrier_rows(conn, gid) == [("msg", "00", "msg", "01", "msg")]

    late = local_gid()
    open_account(conn, late)
    with pytest.raises(DtmFailure):
        query_prepared(late, conn)  # nothing committed yet: the rollback marker wins
    with pytest.raises(DtmDuplicated):
        BranchBarrier.for_msg(late).call(conn, busi_for("saga", late, "action"))
    assert balance(conn, late) == START
    with pytest.raises(DtmFailure):
        query_prepared(late, conn)  # stays rolled back
    assert barrier_rows(conn, late) == [("msg", "00", "msg", "01", "rollback")]


def test_business_error_rolls_back_barrier_rows(conn: Any) -> None:
    gid = local_gid()
    open_account(conn, gid)

    def failing(tx: Any) -> None:
        busi_for("saga", gid, "action")(tx)
        raise ValueError("business says no")

    with pytest.raises(ValueError, match="business says no"):
        BranchBarrier("saga", gid, "01", "action").call(conn, failing)
    assert barrier_rows(conn, gid) == []
    assert balance(conn, gid) == START
    # DTM retries the action: it now runs for real
    assert call_op(conn, "saga", gid, "action") == ("did action", Decision.RUN)
    assert balance(conn, gid) == START + 10


def test_failure_error_passes_through_and_rolls_back(conn: Any) -> None:
    gid = local_gid()

    def fail(tx: Any) -> None:
        raise DtmFailure("insufficient balance")

    with pytest.raises(DtmFailure):
        BranchBarrier("saga", gid, "01", "action").call(conn, fail)
    assert barrier_rows(conn, gid) == []


def test_connection_with_open_transaction_is_refused(driver: str, conn: Any) -> None:
    execute(conn, "select 1")
    if driver == "pymysql":
        conn.begin()
    with pytest.raises(DtmInvalidInput, match="open transaction"):
        BranchBarrier("saga", local_gid(), "01", "action").call(conn, lambda tx: None)
    conn.rollback()


def test_autocommit_connection_still_gets_one_transaction(driver: str, conn: Any) -> None:
    if driver == "pymysql":
        conn.autocommit(True)
    else:
        conn.autocommit = True
    gid = local_gid()

    def failing(tx: Any) -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        BranchBarrier("saga", gid, "01", "action").call(conn, failing)
    assert barrier_rows(conn, gid) == []
    assert (conn.get_autocommit() if driver == "pymysql" else conn.autocommit) is True


def _run_with_retries(make_conn: Callable[[], Any], fn: Callable[[Any], Any], errors: list[BaseException]) -> None:
    conn = make_conn()
    for _attempt in range(10):  # what DTM does with a 425: call again
        try:
            fn(conn)
            return
        except BarrierConflict:
            continue
        except BaseException as exc:
            errors.append(exc)
            return
    errors.append(AssertionError("still conflicting after 10 attempts"))


@pytest.mark.parametrize("trans_type", ["saga", "tcc"])
def test_raced_calls_from_threads(connect: Callable[[], Any], trans_type: str) -> None:
    forward, compensation = FORWARD[trans_type], COMPENSATION[trans_type]
    setup = connect()
    for _round in range(3):
        gid = local_gid()
        open_account(setup, gid)
        ops = [forward, compensation] * 3
        start = threading.Barrier(len(ops))
        errors: list[BaseException] = []

        def worker(op: str, gid: str = gid, start: threading.Barrier = start, errors: list[BaseException] = errors
                   ) -> None:
            start.wait()
            _run_with_retries(connect, lambda c: BranchBarrier(trans_type, gid, "01", op).call(
                c, busi_for(trans_type, gid, op)), errors)

        threads = [threading.Thread(target=worker, args=(op,)) for op in ops]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        done = effects(setup, gid)
        # either the forward op won (both ran once) or the compensation did (a null compensation, nothing ran)
        assert done in ([], sorted([forward, compensation]))
        assert balance(setup, gid) == START


def test_raced_duplicates_run_once(connect: Callable[[], Any]) -> None:
    setup = connect()
    gid = local_gid()
    open_account(setup, gid)
    start = threading.Barrier(6)
    errors: list[BaseException] = []

    def worker() -> None:
        start.wait()
        _run_with_retries(connect, lambda c: call_op(c, "saga", gid, "action"), errors)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert effects(setup, gid) == ["action"]
    assert balance(setup, gid) == START + 10


def _backend_id(driver: str, conn: Any) -> int:
    sql = "select connection_id()" if driver == "pymysql" else "select pg_backend_pid()"
    cur = conn.cursor()
    cur.execute(sql)
    value = int(cur.fetchone()[0])
    cur.close()
    return value


def test_connection_killed_inside_busi(driver: str, connect: Callable[[], Any]) -> None:
    victim, killer = connect(), connect()
    victim_id = _backend_id(driver, victim)
    victim.rollback()
    gid = local_gid()
    open_account(killer, gid)

    def busi(tx: Any) -> None:
        busi_for("saga", gid, "action")(tx)
        kill = "kill connection %s" if driver == "pymysql" else "select pg_terminate_backend(%s)"
        execute(killer, kill, (victim_id,))
        killer.commit()
        execute(tx, f"insert into {EFFECT_TABLE}(gid, op, note) values (%s, %s, 'after kill')", (gid, "action"))

    with pytest.raises(BarrierDatabaseError) as info:
        BranchBarrier("saga", gid, "01", "action").call(victim, busi)
    assert info.value.__cause__ is not None
    assert barrier_rows(killer, gid) == []
    assert effects(killer, gid) == []
    assert balance(killer, gid) == START


def test_lock_wait_is_a_retryable_conflict(driver: str, connect: Callable[[], Any]) -> None:
    holder, waiter = connect(), connect()
    gid = local_gid()
    if driver == "pymysql":
        execute(waiter, "set session innodb_lock_wait_timeout = 1")
    else:
        execute(waiter, "set lock_timeout = '300ms'")
    waiter.commit()
    # another transaction holds the very row the barrier inserts, uncommitted
    execute(holder, "insert into dtm_barrier.barrier(trans_type, gid, branch_id, op, barrier_id, reason) "
                    "values ('saga', %s, '01', 'action', '01', 'action')", (gid,))
    with pytest.raises(BarrierConflict) as info:
        BranchBarrier("saga", gid, "01", "action").call(waiter, lambda tx: pytest.fail("must not run"))
    assert info.value.__cause__ is not None
    holder.rollback()
    assert barrier_rows(holder, gid) == []


INJECTIONS = ["x'; drop table dtm_barrier.barrier; --", "a\"b", "1 or 1=1", "a;b", "", "é", "a b", "x" * 129]


@pytest.mark.parametrize("bad", INJECTIONS)
def test_injection_in_identity_is_rejected(bad: str) -> None:
    for args in ((bad, "g1", "01", "action"), ("saga", "g1", bad, "action"), ("saga", "g1", "01", bad)):
        with pytest.raises(DtmInvalidInput):
            BranchBarrier(*args)


# gids DTM stores as they are (it strips only \n, \r and ;): other SDKs create such gids.
ODD_GIDS = ["a\"b", "1 or 1=1", "é", "a b", "x'--", "o'brien) or ('1'='1"]
BAD_GIDS = ["x'; drop table dtm_barrier.barrier; --", "a;b", "", "x" * 129, "new\nline", "nul\x00"]


@pytest.mark.parametrize("bad", BAD_GIDS)
def test_gids_dtm_could_not_store_are_rejected(bad: str) -> None:
    with pytest.raises(DtmInvalidInput):
        BranchBarrier("saga", bad, "01", "action")
    with pytest.raises(DtmInvalidInput):
        BranchBarrier.from_query({"trans_type": "saga", "gid": bad, "branch_id": "01", "op": "action"})


@pytest.mark.parametrize("odd", ODD_GIDS)
def test_odd_gids_are_stored_verbatim_never_executed(odd: str, conn: Any) -> None:
    gid = f"{odd}-{local_gid()}"
    ran: list[str] = []
    BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: ran.append("busi"))
    BranchBarrier("saga", gid, "01", "action").call(conn, lambda tx: ran.append("again"))  # duplicate
    assert ran == ["busi"]
    assert barrier_rows(conn, gid) == [("saga", "01", "action", "01", "action")]
    conn.commit()


@pytest.mark.parametrize("table", ["dtm_barrier.barrier; drop table x", "a.b.c", "a-b", "`x`", "x y", "", "1abc",
                                   "dtm_barrier.barrier--"])
def test_injection_in_table_name_is_rejected(table: str, conn: Any) -> None:
    with pytest.raises(DtmInvalidInput):
        BranchBarrier("saga", "g1", "01", "action", table=table)
    with pytest.raises(DtmInvalidInput):
        barrier_sql.barrier_call(conn, BranchBarrier("saga", "g1", "01", "action"), lambda tx: None, table=table)


class _RawIdentity:
    """An identity that skipped BranchBarrier's validation: its values must still only be bound, never run."""

    def __init__(self, gid: str, op: str) -> None:
        self.trans_type, self.gid, self.branch_id, self.op = "saga'--", gid, "01'); drop table x; --", op
        self.n = 0

    def next_barrier_id(self) -> str:
        self.n += 1
        return f"{self.n:02d}"


def test_hostile_values_are_bound_not_executed(conn: Any) -> None:
    gid = local_gid() + "'; delete from dtm_barrier.barrier; --"
    ident = _RawIdentity(gid, "compensate")
    assert barrier_sql.barrier_call(conn, ident, lambda tx: "ran") is None  # null compensation
    rows = barrier_rows(conn, gid)
    assert rows == [("saga'--", "01'); drop table x; --", "action", "01", "compensate"),
                    ("saga'--", "01'); drop table x; --", "compensate", "01", "compensate")]


def test_custom_table_name(driver: str, conn: Any) -> None:
    table = "dtm_barrier.barrier_custom"
    barrier_sql.create_schema(conn, table=table)
    barrier_sql.create_schema(conn, table=table)
    gid = local_gid()
    bb = BranchBarrier("saga", gid, "01", "compensate", table=table)
    bb.call(conn, lambda tx: None)
    assert bb.last_decision is Decision.NULL_COMPENSATION
    assert query_all(conn, f"select count(*) from {table} where gid = %s", (gid,)) == [(2,)]
    assert barrier_rows(conn, gid) == []


def test_dialect_detection_and_explicit_dialect(driver: str, conn: Any) -> None:
    assert barrier_sql.detect_dialect(conn) == ("mysql" if SERVICE[driver] == "mysql" else "postgres")
    with pytest.raises(DtmInvalidInput, match="dialect"):
        barrier_sql.detect_dialect(object())
    with pytest.raises(DtmInvalidInput, match="unknown barrier dialect"):
        barrier_sql.normalize_dialect("oracle")


def test_ddl_command_prints_the_shipped_ddl(capsys: pytest.CaptureFixture[str]) -> None:
    from dtmcli.barrier import main

    assert main(["ddl", "postgres"]) == 0
    out = capsys.readouterr().out
    assert "CONSTRAINT uniq_barrier UNIQUE (gid, branch_id, op, barrier_id)" in out
    assert main(["ddl", "mysql", "--table", "x;drop"]) == 2
    assert main(["ddl", "mongo"]) == 0
    assert "unique: true" in capsys.readouterr().out


def test_connection_that_cannot_open_a_transaction_is_refused() -> None:
    """An unknown DB-API driver with autocommit would commit barrier rows alone: refuse, write nothing."""
    from dtmcli import DtmInvalidInput
    from dtmcli.barrier import BranchBarrier

    class Cursor:
        rowcount = 1

        def execute(self, sql: str, params: Any = None) -> None:
            raise AssertionError("nothing may be executed")

        def close(self) -> None:
            pass

    class Conn:  # a DB-API connection with autocommit on and neither begin() nor start_transaction()
        autocommit = True

        def cursor(self) -> Cursor:
            return Cursor()

        def commit(self) -> None:
            raise AssertionError("nothing may be committed")

        def rollback(self) -> None:
            pass

    ran: list[int] = []
    with pytest.raises(DtmInvalidInput, match="cannot open a transaction"):
        BranchBarrier("saga", "gidx", "01", "action").call(Conn(), lambda c: ran.append(1), dialect="mysql")
    assert ran == []
