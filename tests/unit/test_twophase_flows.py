"""The TCC/XA decisions as flows, driven by hand: no sockets, no database, no event loop.

Each test feeds a flow the answers of its effects (``Request``, ``Call``, ``StoreOp``) and checks
what it asks for next and what it decides: the finish (submit, or abort with the rollback reason),
the branch calls and their id allocation, the runner's prepare → body → finish, and the local XA
statements of protocol.md §9. The sync and asyncio classes run exactly these flows.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable, Optional

import pytest

from dtmcli import BranchInfo, DtmFailure, DtmInvalidInput, DtmOngoing, DtmTransportError
from dtmcli._barrier.xa import local_transaction_flow, phase2_flow, preflight_flow
from dtmcli._flow import Call, Effect, Flow, Request, StoreOp
from dtmcli._protocol import Response
from dtmcli._twophase import BranchReply, RunnerCore, rollback_reason_of
from dtmcli.errors import BarrierConflict, BarrierDatabaseError, DtmServerError
from dtmcli.tcc import Tcc, TccCore
from dtmcli.xa import Xa, register_xa_branch_flow, xa_registration

DTM = "http://dtm.test/api/dtmsvr"
BUSI = "http://busi.test/api"
OK = Response(200, b'{"dtm_result":"SUCCESS"}')


class Raise:
    """An answer that is thrown into the flow instead of sent."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def drive(flow: Flow[Any], answer: Callable[[Effect], Any]) -> tuple[list[Effect], Any]:
    """Run ``flow`` to its end, answering each effect with ``answer(effect)``; return (effects, outcome).

    The outcome is the flow's return value, or the exception it raised (returned, not raised).
    """
    effects: list[Effect] = []
    value: Any = None
    throw = False
    while True:
        try:
            effect = flow.throw(value) if throw else flow.send(value)
        except StopIteration as stop:
            return effects, stop.value
        except BaseException as exc:
            return effects, exc
        effects.append(effect)
        got = answer(effect)
        throw = isinstance(got, Raise)
        value = got.exc if throw else got


def describe(effect: Effect) -> tuple[Any, ...]:
    """A comparable summary of an effect."""
    if isinstance(effect, Request):
        body = json.loads(effect.body) if effect.body and effect.body[:1] == b"{" else effect.body
        return ("request", effect.url, dict(effect.params or {}), body)
    if isinstance(effect, Call):
        return ("call", getattr(effect.fn, "__name__", effect.fn), *effect.args)
    if isinstance(effect, StoreOp):
        return ("store", effect.name, *effect.args)
    raise AssertionError(effect)


def prepared(cls: Any = Tcc, gid: str = "G1") -> Any:
    trans = cls(DTM, gid)
    trans._state = "prepared"  # as after prepare(): no round trip here
    return trans


# -- the finish decision -----------------------------------------------------------------------------


def test_clean_body_submits() -> None:
    tcc = prepared()
    effects, outcome = drive(tcc._finish_flow(None), lambda e: None)
    assert [describe(e) for e in effects] == [("call", "submit")]
    assert effects[0].fn == tcc.submit and outcome is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ValueError("out of stock"), "ValueError: out of stock"),
        (DtmFailure("insufficient balance"), "insufficient balance"),
        (DtmServerError("try failed", status=500, body='{"error":"db down"}\n'), '{"error":"db down"}'),
        (asyncio.CancelledError(), "CancelledError"),
        (KeyboardInterrupt(), "KeyboardInterrupt"),
    ],
)
def test_body_error_aborts_with_its_reason_and_leaves_raising_to_the_caller(error: BaseException, reason: str) -> None:
    tcc = prepared()
    effects, outcome = drive(tcc._finish_flow(error), lambda e: None)
    assert [describe(e) for e in effects] == [("call", "_cleanup_abort", reason)]
    assert outcome is None  # the runner re-raises the body's own error
    assert rollback_reason_of(error) == reason


def test_a_failed_branch_the_body_swallowed_still_aborts_and_is_raised() -> None:
    tcc = prepared()
    ongoing = DtmOngoing("later", gid="G1", branch_id="01", op="try")
    tcc._record(ongoing)
    tcc._record(ValueError("second"))  # only the first one counts
    effects, outcome = drive(tcc._finish_flow(None), lambda e: None)
    assert [describe(e) for e in effects] == [("call", "_cleanup_abort", "later")]
    assert outcome is ongoing


def test_a_failed_abort_is_logged_never_raised_over_the_cause(caplog: pytest.LogCaptureFixture) -> None:
    tcc = prepared()
    _, outcome = drive(tcc._finish_flow(KeyError("k")), lambda e: Raise(DtmTransportError("abort lost")))
    assert outcome is None and "abort after KeyError('k') failed: abort lost" in caplog.text
    tcc._record(DtmFailure("try failed"))
    _, outcome = drive(tcc._finish_flow(None), lambda e: Raise(DtmTransportError("abort lost")))
    assert isinstance(outcome, DtmFailure)  # the branch error, not the abort's


def test_a_cancellation_during_the_abort_propagates() -> None:
    """A second cancellation is no Exception: it is not logged away (the async driver shields the abort)."""
    tcc = prepared()
    _, outcome = drive(tcc._finish_flow(asyncio.CancelledError()), lambda e: Raise(asyncio.CancelledError()))
    assert isinstance(outcome, asyncio.CancelledError)


# -- branch calls -----------------------------------------------------------------------------------


def test_tcc_branch_registers_then_tries() -> None:
    tcc = prepared()
    answers = iter([OK, Response(200, b'{"dtm_result":"SUCCESS","n":1}')])
    flow = tcc._call_branch_flow({"a": 1}, f"{BUSI}/try", f"{BUSI}/confirm", "")
    effects, reply = drive(flow, lambda e: next(answers))
    assert [describe(e) for e in effects] == [
        ("request", f"{DTM}/registerBranch", {}, {"gid": "G1", "trans_type": "tcc", "branch_id": "01",
                                                 "data": '{"a":1}', "confirm": f"{BUSI}/confirm", "cancel": ""}),
        ("request", f"{BUSI}/try", {"dtm": DTM, "gid": "G1", "branch_id": "01", "trans_type": "tcc", "op": "try"},
         {"a": 1}),
    ]
    assert isinstance(reply, BranchReply) and reply.branch_id == "01"
    assert reply.data == {"dtm_result": "SUCCESS", "n": 1}
    assert tcc.branch_error is None


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (Response(409, b'{"dtm_result":"FAILURE"}'), DtmFailure),
        (Response(425, b'{"dtm_result":"ONGOING"}'), DtmOngoing),
        (Response(500, b"db down"), DtmServerError),
        (Raise(DtmTransportError("reset")), DtmTransportError),
        (Raise(asyncio.CancelledError()), asyncio.CancelledError),
    ],
)
def test_a_failed_try_is_typed_labelled_and_dooms_the_transaction(answer: Any, error: type) -> None:
    tcc = prepared()
    answers = iter([OK, answer])
    _, outcome = drive(tcc._call_branch_flow({}, f"{BUSI}/try", "", ""), lambda e: next(answers))
    assert type(outcome) is error and tcc.branch_error is outcome
    if not isinstance(outcome, asyncio.CancelledError):
        assert (outcome.gid, outcome.branch_id, outcome.op) == ("G1", "01", "try")


def test_a_refused_registration_sends_no_try_and_dooms_the_transaction() -> None:
    tcc = prepared()
    effects, outcome = drive(
        tcc._call_branch_flow({}, f"{BUSI}/try", "", ""), lambda e: Response(409, b'{"dtm_result":"FAILURE"}')
    )
    assert len(effects) == 1 and isinstance(outcome, DtmFailure) and tcc.branch_error is outcome


def test_bad_input_is_refused_before_any_effect_and_takes_no_id() -> None:
    tcc = prepared()
    for bad in (
        lambda: tcc._call_branch_flow({}, "/relative", "", ""),
        lambda: tcc._call_branch_flow({}, f"{BUSI}/t", "ftp://x", ""),
        lambda: tcc._call_branch_flow({"x": object()}, f"{BUSI}/t", "", ""),
    ):
        with pytest.raises(DtmInvalidInput):
            bad()  # raised when the flow is built: no effect was asked for
    effects, _ = drive(tcc._call_branch_flow({}, f"{BUSI}/t", "", ""), lambda e: OK)
    assert json.loads(effects[0].body)["branch_id"] == "01"  # type: ignore[attr-defined]
    assert tcc.branch_error is None


@pytest.mark.parametrize("state", ["new", "submitted", "aborted"])
def test_branches_need_a_prepared_or_nested_transaction(state: str) -> None:
    tcc = Tcc(DTM, "G1")
    tcc._state = state
    with pytest.raises(DtmInvalidInput, match="prepare" if state == "new" else "already"):
        tcc._call_branch_flow({}, f"{BUSI}/t", "", "")


def test_interleaved_branch_calls_get_distinct_ids() -> None:
    """What asyncio.gather does: every flow is started before any answer comes back."""
    tcc = prepared()
    flows = [tcc._call_branch_flow({"i": i}, f"{BUSI}/t", "", "") for i in range(12)]
    registered = [json.loads(f.send(None).body)["branch_id"] for f in flows]  # type: ignore[attr-defined]
    assert registered == [f"{i:02d}" for i in range(1, 13)]
    tried = [f.send(OK).params["branch_id"] for f in reversed(flows)]  # type: ignore[attr-defined]
    assert sorted(tried) == registered


def test_nested_ids_and_no_lifecycle() -> None:
    query = {"dtm": DTM, "gid": "G1", "branch_id": "03", "trans_type": "tcc", "op": "try"}
    child = Tcc.from_query(query)
    assert child.nested and isinstance(child, TccCore)
    effects, _ = drive(child._call_branch_flow("raw", f"{BUSI}/sub", "", ""), lambda e: OK)
    assert json.loads(effects[0].body)["branch_id"] == "0301"  # type: ignore[attr-defined]
    effects, outcome = drive(child._run_flow("submit", child._submit_flow), lambda e: OK)
    assert not effects and isinstance(outcome, DtmInvalidInput) and "nested" in str(outcome)


def test_xa_branch_is_one_action_call_with_phase2_url() -> None:
    xa = prepared(Xa)
    effects, reply = drive(xa._call_branch_flow({"amount": 3}, f"{BUSI}/xa"), lambda e: OK)
    assert [describe(e) for e in effects] == [
        ("request", f"{BUSI}/xa", {"dtm": DTM, "gid": "G1", "branch_id": "01", "trans_type": "xa", "op": "action",
                                   "phase2_url": f"{BUSI}/xa"}, {"amount": 3}),
    ]
    assert reply.branch_id == "01"
    _, outcome = drive(xa._call_branch_flow({}, f"{BUSI}/xa"), lambda e: Response(409, b"no FAILURE"))
    assert isinstance(outcome, DtmFailure) and outcome.op == "action" and xa.branch_error is outcome


def test_xa_registration_body() -> None:
    info = BranchInfo.from_query({"dtm": DTM, "gid": "G1", "branch_id": "02", "trans_type": "xa", "op": "action",
                                  "phase2_url": f"{BUSI}/xa"})
    body = xa_registration(info)
    xa = Xa(DTM)
    effects, _ = drive(register_xa_branch_flow(xa.client, body), lambda e: OK)
    assert [describe(e) for e in effects] == [
        ("request", f"{DTM}/registerBranch", {}, {"gid": "G1", "trans_type": "xa", "branch_id": "02",
                                                 "url": f"{BUSI}/xa"}),
    ]


# -- the runner ------------------------------------------------------------------------------------


def body_fn(trans: Any) -> str:
    return "result"


def test_run_prepares_calls_the_body_then_submits() -> None:
    made: list[Tcc] = []
    runner = RunnerCore(lambda: made.append(Tcc(DTM, "G1")) or made[-1], "tcc_global_transaction")
    effects, outcome = drive(runner._run_flow(body_fn), lambda e: "result" if e.fn is body_fn else None)  # type: ignore[attr-defined]
    (tcc,) = made
    assert [(e.fn, e.args) for e in effects] == [  # type: ignore[attr-defined]
        (tcc.prepare, ()), (body_fn, (tcc,)), (tcc.submit, ()),
    ]
    assert outcome == "result"


def test_run_aborts_after_a_body_error_and_reraises_it() -> None:
    runner = RunnerCore(lambda: Tcc(DTM, "G1"), "tcc_global_transaction")
    boom = RuntimeError("no")
    effects, outcome = drive(runner._run_flow(body_fn), lambda e: Raise(boom) if e.fn is body_fn else None)  # type: ignore[attr-defined]
    assert [describe(e)[1:] for e in effects] == [("prepare",), ("body_fn", effects[1].args[0]),  # type: ignore[attr-defined]
                                                  ("_cleanup_abort", "RuntimeError: no")]
    assert outcome is boom


def test_run_does_not_call_the_body_when_prepare_fails() -> None:
    runner = RunnerCore(lambda: Tcc(DTM, "G1"), "tcc_global_transaction")
    effects, outcome = drive(runner._run_flow(body_fn), lambda e: Raise(DtmFailure("cannot prepare")))
    assert len(effects) == 1 and isinstance(outcome, DtmFailure)


# -- local XA (branch side) -------------------------------------------------------------------------

ACTION = BranchInfo.from_query({"dtm": DTM, "gid": "G1", "branch_id": "01", "trans_type": "xa", "op": "action",
                                "phase2_url": f"{BUSI}/xa"})
TABLE = "dtm_barrier.barrier"


def busi(tx: Any) -> str:
    return "done"


def xa_answers(*, affected: int = 1, busi_error: Optional[BaseException] = None,
               register: Any = OK, saved: Optional[bool] = None) -> Callable[[Effect], Any]:
    def answer(effect: Effect) -> Any:
        if isinstance(effect, StoreOp):
            return {"set_autocommit": saved, "execute": affected}.get(effect.name)
        if isinstance(effect, Call):
            return Raise(busi_error) if busi_error else effect.fn(*effect.args)
        return register

    return answer


def local_flow(dialect: str) -> Flow[Any]:
    register = register_xa_branch_flow(Xa(DTM).client, xa_registration(ACTION))
    return local_transaction_flow(ACTION, dialect, TABLE, busi, "the-conn", register)


def barrier_row(reason: str) -> tuple[Any, ...]:
    return ("xa", "G1", "01", "action", "01", reason)


def test_local_xa_mysql_statements() -> None:
    effects, outcome = drive(local_flow("mysql"), xa_answers())
    assert outcome == "done"
    steps = [describe(e) for e in effects]
    assert steps[:3] == [("store", "set_autocommit", False), ("store", "exec", "xa start 'G1-01'"),
                         ("store", "execute", f"insert ignore into {TABLE}(trans_type, gid, branch_id, op, barrier_id, "
                          "reason) values(%s, %s, %s, %s, %s, %s)", barrier_row("action"))]
    assert steps[3] == ("call", "busi", "the-conn")
    assert steps[4][:2] == ("request", f"{DTM}/registerBranch")
    assert steps[5:] == [("store", "exec", "xa end 'G1-01'"), ("store", "exec", "xa prepare 'G1-01'")]


def test_local_xa_postgres_statements_restore_autocommit() -> None:
    effects, outcome = drive(local_flow("postgres"), xa_answers(saved=False))
    steps = [describe(e) for e in effects]
    assert steps[0] == ("store", "set_autocommit", True) and steps[1] == ("store", "exec", "begin")
    assert "on conflict (gid, branch_id, op, barrier_id) do nothing" in steps[2][2]
    assert steps[-2:] == [("store", "exec", "prepare transaction 'G1-01'"), ("store", "set_autocommit", False)]
    assert outcome == "done"


def test_local_xa_business_error_rolls_back_without_registering() -> None:
    boom = ValueError("no")
    effects, outcome = drive(local_flow("mysql"), xa_answers(busi_error=boom, saved=True))
    steps = [describe(e) for e in effects]
    assert not any(s[0] == "request" for s in steps)
    assert steps[-3:] == [("store", "exec", "xa end 'G1-01'"), ("store", "exec", "xa rollback 'G1-01'"),
                          ("store", "set_autocommit", True)]
    assert outcome is boom


def test_local_xa_refused_registration_rolls_back() -> None:
    effects, outcome = drive(local_flow("postgres"), xa_answers(register=Response(409, b'{"dtm_result":"FAILURE"}')))
    assert isinstance(outcome, DtmFailure)
    assert [describe(e) for e in effects][-1] == ("store", "exec", "rollback")


def test_local_xa_after_phase2_rollback_refuses_without_running_busi() -> None:
    effects, outcome = drive(local_flow("mysql"), xa_answers(affected=0))
    assert isinstance(outcome, DtmFailure) and "already rolled back" in str(outcome)
    assert not any(isinstance(e, (Call, Request)) for e in effects)
    assert describe(effects[-1]) == ("store", "exec", "xa rollback 'G1-01'")


def test_local_xa_cancellation_rolls_back_and_propagates() -> None:
    effects, outcome = drive(local_flow("mysql"), xa_answers(busi_error=asyncio.CancelledError()))
    assert isinstance(outcome, asyncio.CancelledError)
    assert [describe(e) for e in effects][-2:] == [("store", "exec", "xa end 'G1-01'"),
                                                   ("store", "exec", "xa rollback 'G1-01'")]


def test_local_xa_rejects_an_xid_the_server_cannot_hold() -> None:
    info = BranchInfo.from_query({**ACTION.query(), "gid": "g" * 62})
    with pytest.raises(DtmInvalidInput, match="at most 64"):
        local_transaction_flow(info, "mysql", TABLE, busi, None, iter(()))  # type: ignore[arg-type]


class FakeDbError(Exception):
    """A driver error as the error mapping reads it (module pymysql, errno first)."""


FakeDbError.__module__ = "pymysql.err"


def phase2(op: str) -> BranchInfo:
    return BranchInfo.from_query({"gid": "G1", "branch_id": "01", "trans_type": "xa", "op": op})


def test_phase2_commit_and_rollback_marker() -> None:
    effects, outcome = drive(phase2_flow(phase2("commit"), "mysql", TABLE), lambda e: None)
    assert outcome is None
    assert [describe(e) for e in effects] == [("store", "set_autocommit", True), ("store", "exec", "xa commit 'G1-01'")]
    effects, _ = drive(phase2_flow(phase2("rollback"), "postgres", TABLE), lambda e: 1 if e.name == "execute" else None)  # type: ignore[attr-defined]
    steps = [describe(e) for e in effects]
    assert steps[1] == ("store", "exec", "rollback prepared 'G1-01'")
    assert steps[2][:2] == ("store", "execute") and steps[2][3] == barrier_row("rollback")
    assert steps[3] == ("store", "commit")


def test_phase2_unknown_xid_is_done_unless_still_held() -> None:
    unknown = FakeDbError(1397, "XAER_NOTA: Unknown XID")

    def answer(held: bool) -> Callable[[Effect], Any]:
        def a(e: Effect) -> Any:
            if describe(e)[1] == "exec":
                return Raise(unknown)
            if describe(e)[1] == "fetch_all":
                return [(1, 5, 0, b"G1-01" if held else b"other")]
            return None

        return a

    _, outcome = drive(phase2_flow(phase2("commit"), "mysql", TABLE), answer(False))
    assert outcome is None
    _, outcome = drive(phase2_flow(phase2("commit"), "mysql", TABLE), answer(True))
    assert isinstance(outcome, BarrierConflict) and outcome.__cause__ is unknown
    _, outcome = drive(phase2_flow(phase2("commit"), "mysql", TABLE),
                       lambda e: Raise(FakeDbError(1205, "lock wait")) if describe(e)[1] == "exec" else None)
    assert type(outcome).__name__ == "BarrierConflict"  # a retryable error, mapped


def test_phase2_failing_marker_is_rolled_back_and_typed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "dtmcli")

    def answer(e: Effect) -> Any:
        name = describe(e)[1]
        if name == "execute":
            return Raise(FakeDbError(1146, "no table"))
        if name == "rollback":
            return Raise(FakeDbError(2013, "lost"))
        return None

    effects, outcome = drive(phase2_flow(phase2("rollback"), "mysql", TABLE), answer)
    assert isinstance(outcome, BarrierDatabaseError) and "rollback marker" in str(outcome)
    assert describe(effects[-1]) == ("store", "rollback") and "rollback of the barrier insert failed" in caplog.text


def test_preflight_explains_postgres_without_prepared_transactions() -> None:
    effects, outcome = drive(preflight_flow("postgres"), lambda e: ("0",) if describe(e)[1] == "fetch_one" else None)
    assert isinstance(outcome, BarrierDatabaseError) and "max_prepared_transactions" in str(outcome)
    assert [describe(e) for e in effects] == [("store", "set_autocommit", True),
                                              ("store", "fetch_one", "show max_prepared_transactions", ())]

