"""The barrier's sans-I/O flows driven by hand: every effect they yield, every decision, every error path.

No database: each test feeds results into the generator (``send``) or throws errors in at a step
(``throw``) and checks the next effect or the outcome. The drivers are checked too: the blocking one
refuses an async business function, the asyncio one rolls back on cancellation and finishes a
shielded rollback however often it is cancelled.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Generator, Optional

import pytest

from dtmcli import DtmDuplicated, DtmError, DtmFailure, DtmInvalidInput
from dtmcli._barrier import core
from dtmcli._barrier import redis as barrier_redis
from dtmcli._barrier.sql import SqlStoreBase, rollback_quietly_flow
from dtmcli._flow import Call, StoreOp
from dtmcli.asyncio._barrier_common import shielded
from dtmcli.barrier import BarrierConflict, BarrierDatabaseError, BranchBarrier, Decision

Flow = Generator[Any, Any, Any]


class Errors:
    """The pure part of a store: its tx and error mapping."""

    tx = "the-tx"

    def map_error(self, exc: BaseException, what: str) -> DtmError:
        return BarrierDatabaseError(f"{what}: {exc}")

    def busi_error(self, exc: Exception) -> Optional[DtmError]:
        return BarrierConflict("retry") if isinstance(exc, TimeoutError) else None


def op_of(effect: Any) -> tuple[Any, ...]:
    """An effect as a comparable tuple: ('begin',), ('insert_if_absent', ...), ('call', tx), ('rollback', ExcType)."""
    if isinstance(effect, Call):
        return ("call", *effect.args)
    assert isinstance(effect, StoreOp), effect
    if effect.name == "rollback" and effect.args:
        return ("rollback", type(effect.args[0]))
    return (effect.name, *effect.args)


def start(op: str, busi: Callable[[Any], Any] = lambda tx: None, trans_type: str = "saga",
          decisions: Optional[list[Decision]] = None) -> tuple[Flow, Any]:
    bb = BranchBarrier(trans_type, "g1", "00" if op == "msg" else "01", op)
    flow = core.barrier_flow(Errors(), bb, busi, decisions.append if decisions is not None else None)
    return flow, next(flow)


def finish(flow: Flow, value: Any = None) -> Any:
    with pytest.raises(StopIteration) as stop:
        flow.send(value)
    return stop.value.value


# -- the happy paths -----------------------------------------------------------------------------------------------

def test_forward_op_runs_the_business_function_between_the_insert_and_the_commit() -> None:
    decisions: list[Decision] = []
    flow, effect = start("action", decisions=decisions)
    assert op_of(effect) == ("begin",)
    assert op_of(flow.send(None)) == ("insert_if_absent", "saga", "g1", "01", "action", "01", "action")
    call = flow.send(1)
    assert op_of(call) == ("call", "the-tx")
    assert op_of(flow.send("busi result")) == ("commit",)
    assert finish(flow) == "busi result"
    assert decisions == [Decision.RUN]


def test_compensation_inserts_the_origin_op_first_and_a_null_compensation_skips_the_business() -> None:
    decisions: list[Decision] = []
    flow, _ = start("compensate", decisions=decisions)
    assert op_of(flow.send(None)) == ("insert_if_absent", "saga", "g1", "01", "action", "01", "compensate")
    assert op_of(flow.send(1)) == ("insert_if_absent", "saga", "g1", "01", "compensate", "01", "compensate")
    assert op_of(flow.send(1)) == ("commit",)  # no Call: the forward op never ran
    assert finish(flow) is None
    assert decisions == [Decision.NULL_COMPENSATION]


@pytest.mark.parametrize("op,origin,expected", [
    ("cancel", "try", Decision.RUN), ("rollback", "action", Decision.RUN), ("action", None, Decision.DUPLICATE),
])
def test_compensation_after_its_forward_op_runs_and_a_repeat_is_a_duplicate(
    op: str, origin: Optional[str], expected: Decision
) -> None:
    decisions: list[Decision] = []
    flow, _ = start(op, trans_type="tcc" if op == "cancel" else "workflow", decisions=decisions)
    effect = flow.send(None)
    if origin is not None:
        assert op_of(effect)[4] == origin
        effect = flow.send(0)  # the forward op's row exists
    assert op_of(effect)[4] == op
    effect = flow.send(1 if expected is Decision.RUN else 0)
    if expected is Decision.RUN:
        assert op_of(effect) == ("call", "the-tx")
        effect = flow.send("done")
    assert op_of(effect) == ("commit",)
    assert finish(flow) == ("done" if expected is Decision.RUN else None)
    assert decisions == [expected]


def test_repeated_msg_rolls_back_and_raises_duplicated() -> None:
    flow, _ = start("msg", trans_type="msg")
    assert op_of(flow.send(None)) == ("insert_if_absent", "msg", "g1", "00", "msg", "01", "msg")
    assert op_of(flow.send(0)) == ("rollback", DtmDuplicated)
    with pytest.raises(DtmDuplicated):
        flow.send(None)


def test_barrier_ids_count_per_barrier_object() -> None:
    bb = BranchBarrier("saga", "g1", "01", "action")
    for expected in ("01", "02"):
        flow = core.barrier_flow(Errors(), bb, lambda tx: None)
        next(flow)
        assert op_of(flow.send(None))[5] == expected


# -- errors thrown in at each step -----------------------------------------------------------------------------------

def test_begin_failure_is_mapped_without_a_rollback() -> None:
    flow, _ = start("action")
    with pytest.raises(BarrierDatabaseError, match="begin: refused") as info:
        flow.throw(OSError("refused"))
    assert isinstance(info.value.__cause__, OSError)


def test_typed_begin_error_passes_through() -> None:
    flow, _ = start("action")
    with pytest.raises(DtmInvalidInput, match="open transaction"):
        flow.throw(DtmInvalidInput("open transaction"))


def test_cancelled_begin_rolls_back_then_propagates() -> None:
    flow, _ = start("action")
    assert op_of(flow.throw(asyncio.CancelledError())) == ("rollback", asyncio.CancelledError)
    with pytest.raises(asyncio.CancelledError):
        flow.send(None)


@pytest.mark.parametrize("at", [0, 1])
def test_insert_failure_rolls_back_and_is_mapped(at: int) -> None:
    flow, _ = start("compensate")
    flow.send(None)  # origin insert
    if at == 1:
        flow.send(1)  # current insert
    assert op_of(flow.throw(OSError("gone"))) == ("rollback", OSError)
    with pytest.raises(BarrierDatabaseError, match="insert: gone"):
        flow.send(None)


def test_cancelled_insert_rolls_back_and_stays_a_cancellation() -> None:
    flow, _ = start("action")
    flow.send(None)
    assert op_of(flow.throw(asyncio.CancelledError())) == ("rollback", asyncio.CancelledError)
    with pytest.raises(asyncio.CancelledError):
        flow.send(None)


@pytest.mark.parametrize("error,expected", [
    (ValueError("business says no"), ValueError),
    (DtmFailure("no money"), DtmFailure),  # typed errors are never re-mapped
    (TimeoutError("lock wait"), BarrierConflict),  # the store maps its own failures raised in the business
    (asyncio.CancelledError(), asyncio.CancelledError),
    (KeyboardInterrupt(), KeyboardInterrupt),
])
def test_business_error_rolls_back_first(error: BaseException, expected: type[BaseException]) -> None:
    flow, _ = start("action")
    flow.send(None)
    flow.send(1)  # -> Call
    assert op_of(flow.throw(error)) == ("rollback", type(error))
    with pytest.raises(expected):
        flow.send(None)


def test_commit_failure_rolls_back_and_is_mapped() -> None:
    flow, _ = start("action")
    flow.send(None)
    flow.send(1)
    flow.send("r")  # -> commit
    assert op_of(flow.throw(OSError("disk"))) == ("rollback", OSError)
    with pytest.raises(BarrierDatabaseError, match="commit: disk"):
        flow.send(None)


def test_cancelled_commit_rolls_back_and_stays_a_cancellation() -> None:
    flow, _ = start("action")
    flow.send(None)
    flow.send(0)  # duplicate -> commit
    assert op_of(flow.throw(asyncio.CancelledError())) == ("rollback", asyncio.CancelledError)
    with pytest.raises(asyncio.CancelledError):
        flow.send(None)


def test_closing_an_abandoned_flow_does_not_yield_a_rollback() -> None:
    """A flow closed by its owner (GeneratorExit) must just end: yielding would raise RuntimeError."""
    for steps in (0, 1, 2):
        flow, _ = start("action")
        for value in (None, 1)[:steps]:
            flow.send(value)
        flow.close()


# -- the msg query_prepared flow --------------------------------------------------------------------------------------

def prepared(reason: Optional[str]) -> tuple[list[tuple[Any, ...]], Flow]:
    flow = core.prepared_flow(Errors(), "msg", "g1")
    seen = [op_of(next(flow))]
    seen.append(op_of(flow.send(None)))
    seen.append(op_of(flow.send(1)))
    seen.append(op_of(flow.send(reason)))
    return seen, flow


def test_query_prepared_effects_and_committed_answer() -> None:
    seen, flow = prepared("msg")
    assert seen == [("begin",), ("insert_if_absent", "msg", "g1", "00", "msg", "01", "rollback"),
                    ("read_reason", "g1", "00", "msg", "01"), ("commit",)]
    assert finish(flow) is None


def test_query_prepared_rolled_back_and_missing_row() -> None:
    _, flow = prepared("rollback")
    with pytest.raises(DtmFailure):
        flow.send(None)
    _, flow = prepared(None)
    with pytest.raises(BarrierDatabaseError, match="missing"):
        flow.send(None)


def test_query_prepared_errors_at_each_step() -> None:
    flow = core.prepared_flow(Errors(), "msg", "g1")
    next(flow)
    with pytest.raises(BarrierDatabaseError, match="query_prepared: down"):
        flow.throw(OSError("down"))  # begin: nothing to roll back
    for at in (1, 2, 3):
        flow = core.prepared_flow(Errors(), "msg", "g1")
        next(flow)
        for value in (None, 1, "msg")[:at]:
            flow.send(value)
        assert op_of(flow.throw(OSError("lost"))) == ("rollback", OSError)
        with pytest.raises(BarrierDatabaseError, match="query_prepared: lost"):
            flow.send(None)
    flow = core.prepared_flow(Errors(), "msg", "g1")
    next(flow)
    flow.send(None)
    flow.send(1)
    flow.send("msg")  # -> commit
    assert op_of(flow.throw(BarrierDatabaseError("aborted"))) == ("rollback", BarrierDatabaseError)
    with pytest.raises(BarrierDatabaseError, match=r"^aborted"):
        flow.send(None)
    flow = core.prepared_flow(Errors(), "msg", "g1")
    next(flow)
    flow.send(None)
    assert op_of(flow.throw(asyncio.CancelledError())) == ("rollback", asyncio.CancelledError)
    with pytest.raises(asyncio.CancelledError):
        flow.send(None)


# -- the SQL store's steps -------------------------------------------------------------------------------------------

class FakeRaw:
    def __init__(self, charset: Optional[str]) -> None:
        self._charset = charset

    def character_set_name(self) -> Optional[str]:
        return self._charset


class FakeAdapter:
    def __init__(self, dialect: str, charset: Optional[str] = "utf8mb4", target: str = "t1") -> None:
        self.dialect, self.raw, self._target = dialect, FakeRaw(charset), target

    def dbapi_connection(self) -> Any:
        return self.raw if self.raw._charset is not None else object()

    def target(self) -> tuple[str, ...]:
        return ("fake", self._target)


def test_sql_begin_checks_the_table_once_per_target() -> None:
    adapter = FakeAdapter("postgres", target=f"pg-{id(object())}")
    store = SqlStoreBase("conn", adapter, "dtm_barrier.barrier", {"gid": "g1"})
    flow = store.begin_flow()
    assert op_of(next(flow)) == ("begin",)
    check = flow.send(None)
    assert check.name == "fetch_all" and "pg_attribute" in check.args[0]
    assert check.args[1] == ("dtm_barrier.barrier", "dtm_barrier.barrier")
    rows = [(k, "C", True, "varchar", True) for k in ("gid", "branch_id", "op", "barrier_id")]
    with pytest.raises(StopIteration):
        flow.send(rows)
    flow = store.begin_flow()  # the same target again: no check
    next(flow)
    with pytest.raises(StopIteration):
        flow.send(None)


def test_sql_begin_refuses_a_narrow_charset_after_rolling_back() -> None:
    store = SqlStoreBase("conn", FakeAdapter("mysql", charset="utf8"), "dtm_barrier.barrier", {"gid": "g1"})
    flow = store.begin_flow()
    next(flow)
    assert op_of(flow.send(None)) == ("rollback",)
    with pytest.raises(BarrierDatabaseError, match="'utf8', not utf8mb4"):
        flow.send(None)


def test_sql_begin_reads_an_unknown_drivers_charset() -> None:
    store = SqlStoreBase("conn", FakeAdapter("mysql", charset=None, target=f"my-{id(object())}"), "x.barrier", {})
    flow = store.begin_flow()
    next(flow)
    read = flow.send(None)
    assert op_of(read) == ("fetch_one", "select @@character_set_connection", ())
    assert op_of(flow.send(("latin1",))) == ("rollback",)
    with pytest.raises(BarrierDatabaseError, match="'latin1'"):
        flow.send(None)


def test_sql_statements_come_from_one_template() -> None:
    from dtmcli._barrier.sql import numbered

    pg = SqlStoreBase("c", FakeAdapter("postgres"), "s.t", {})
    sql, params = pg.insert_statement("saga", "g", "01", "action", "01", "action")
    assert sql == ("insert into s.t(trans_type, gid, branch_id, op, barrier_id, reason) values(%s, %s, %s, %s, %s, %s)"
                   " on conflict (gid, branch_id, op, barrier_id) do nothing")
    assert params == ("saga", "g", "01", "action", "01", "action")
    assert numbered(sql) == sql.replace("values(%s, %s, %s, %s, %s, %s)", "values($1, $2, $3, $4, $5, $6)")
    my = SqlStoreBase("c", FakeAdapter("mysql"), "s.t", {})
    assert my.insert_statement("saga", "g", "01", "action", "01", "action")[0].startswith("insert ignore into s.t(")


def test_quiet_rollback_logs_instead_of_raising(caplog: pytest.LogCaptureFixture) -> None:
    flow = rollback_quietly_flow("barrier g1")
    assert op_of(next(flow)) == ("rollback",)
    with pytest.raises(StopIteration):
        flow.throw(OSError("connection gone"))
    assert "rollback failed too: connection gone" in caplog.text


# -- the Redis flows --------------------------------------------------------------------------------------------------

def test_redis_adjust_flow_effects_and_answers() -> None:
    def flow() -> Flow:
        return barrier_redis.adjust_flow("acct", -5, trans_type="saga", gid="g1", branch_id="01", op="compensate",
                                         barrier_id="01", expire=60)

    f = flow()
    call = next(f)
    assert op_of(call) == ("evalsha", barrier_redis.ADJUST_SCRIPT.sha, 3, "acct", "g1-01-compensate-01",
                           "g1-01-action-01", -5, "action", 60)
    assert finish(f, b"NULL_COMPENSATION") is Decision.NULL_COMPENSATION
    for answer, expected in ((b"APPLIED", Decision.RUN), (b"DUPLICATE", Decision.DUPLICATE)):
        f = flow()
        next(f)
        assert finish(f, answer) is expected
    f = flow()
    next(f)
    with pytest.raises(DtmFailure):
        f.send(b"FAILURE")


def test_redis_noscript_loads_the_script_and_checks_its_sha() -> None:
    from redis.exceptions import NoScriptError

    script = barrier_redis.QUERY_PREPARED_SCRIPT
    f = barrier_redis.prepared_flow("g1", expire=60)
    assert op_of(next(f))[0] == "evalsha"
    assert op_of(f.throw(NoScriptError("NOSCRIPT"))) == ("script_load", script.text)
    assert op_of(f.send(script.sha))[0] == "evalsha"
    with pytest.raises(DtmFailure):
        f.send(b"rollback")
    f = barrier_redis.prepared_flow("g1", expire=60)
    next(f)
    f.throw(NoScriptError("NOSCRIPT"))
    with pytest.raises(BarrierDatabaseError, match="redis returned sha"):
        f.send("0" * 40)


def test_redis_bad_input_is_refused_before_any_effect() -> None:
    with pytest.raises(DtmInvalidInput):
        next(barrier_redis.adjust_flow("acct", 2**63, trans_type="saga", gid="g1", branch_id="01", op="action",
                                       barrier_id="01"))
    with pytest.raises(DtmInvalidInput):
        next(barrier_redis.prepared_flow("g1", expire=0))


# -- the drivers ------------------------------------------------------------------------------------------------------

class MemoryStore(Errors):
    """A blocking store recording its calls."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def begin(self) -> None:
        self.events.append("begin")

    def insert_if_absent(self, *row: str) -> int:
        self.events.append("insert")
        return 1

    def commit(self) -> None:
        self.events.append("commit")

    def rollback(self, cause: BaseException) -> None:
        self.events.append(f"rollback:{type(cause).__name__}")


def test_blocking_driver_refuses_an_async_business_function() -> None:
    """Before: the coroutine was never awaited and the barrier committed its rows as if the work was done."""
    store = MemoryStore()

    async def busi(tx: Any) -> str:
        return "never runs"

    with pytest.raises(DtmInvalidInput, match="awaitable"):
        core.run_barrier(store, BranchBarrier("saga", "g1", "01", "action"), busi)
    assert store.events == ["begin", "insert", "rollback:DtmInvalidInput"]


class AsyncMemoryStore(Errors):
    """An asyncio store whose rollback takes a while (and is shielded like the real ones)."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.in_rollback = asyncio.Event()

    async def begin(self) -> None:
        self.events.append("begin")

    async def insert_if_absent(self, *row: str) -> int:
        self.events.append("insert")
        return 1

    async def commit(self) -> None:
        self.events.append("commit")

    async def _rollback(self, cause: BaseException) -> None:
        self.in_rollback.set()
        await asyncio.sleep(0.05)
        self.events.append(f"rollback:{type(cause).__name__}")

    async def rollback(self, cause: BaseException) -> None:
        await shielded(self._rollback(cause))


def test_asyncio_driver_rolls_back_a_cancelled_business_call_and_finishes_the_rollback() -> None:
    async def scenario() -> list[str]:
        store = AsyncMemoryStore()
        busy = asyncio.Event()

        async def busi(tx: Any) -> None:
            busy.set()
            await asyncio.sleep(10)

        task = asyncio.ensure_future(core.arun_barrier(store, BranchBarrier("saga", "g1", "01", "action"), busi))
        await busy.wait()
        task.cancel()
        await store.in_rollback.wait()
        task.cancel()  # cancelled again while rolling back: the rollback still finishes
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return store.events

    assert asyncio.run(scenario()) == ["begin", "insert", "rollback:CancelledError"]


def test_shielded_waits_for_its_step_through_cancellations() -> None:
    """Without the loop around asyncio.shield, the first cancellation returns while the step still runs."""
    async def scenario() -> list[str]:
        done: list[str] = []

        async def step() -> None:
            await asyncio.sleep(0.05)
            done.append("step finished")

        async def caller() -> None:
            await shielded(step())
            done.append("caller went on")  # never: the cancellation is re-raised after the step

        task = asyncio.ensure_future(caller())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        done.append("caller cancelled")
        return done

    assert asyncio.run(scenario()) == ["step finished", "caller cancelled"]


def test_asyncio_barrier_follows_the_one_default_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """``dtmcli.barrier.BranchBarrier.default_table`` moves every barrier, asyncio ones too, unless the
    asyncio class sets its own; both flavours share the identity rules and barrier ids."""
    from dtmcli.asyncio.barrier import BranchBarrier as AsyncBarrier

    assert AsyncBarrier("saga", "g1", "01", "action").table == "dtm_barrier.barrier"
    monkeypatch.setattr(BranchBarrier, "default_table", "app.barrier")
    bb = AsyncBarrier.from_query({"trans_type": "saga", "gid": "g1", "branch_id": "01", "op": "action"})
    assert isinstance(bb, AsyncBarrier) and bb.table == "app.barrier"
    monkeypatch.setattr(AsyncBarrier, "default_table", "async_only.barrier")
    assert AsyncBarrier.for_msg("g1").table == "async_only.barrier"
    assert BranchBarrier.for_msg("g1").table == "app.barrier"
    assert [bb.next_barrier_id(), bb.next_barrier_id()] == ["01", "02"]
    assert repr(bb) == "BranchBarrier('saga', 'g1', '01', 'action')"
    with pytest.raises(DtmInvalidInput):
        AsyncBarrier("saga", "g1", "01", "a;b")
