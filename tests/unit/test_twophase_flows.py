"""The TCC/XA decisions as flows, driven by hand: no sockets, no database, no event loop.

Each test feeds a flow the answers of its effects (``Request``, ``Call``, ``StoreOp``) and checks
what it asks for next and what it decides: the finish (submit, or abort with the rollback reason),
the branch calls and their id allocation, the runner's prepare → body → finish, and the local XA
statements of protocol.md §9. The sync and asyncio classes run exactly these flows.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import logging
from typing import Any, Callable, Optional

import pytest

from dtmcli import BranchInfo, DtmError, DtmFailure, DtmInvalidInput, DtmOngoing, DtmTransportError
from dtmcli._barrier.xa import local_transaction_flow, phase2_flow, preflight_flow
from dtmcli._flow import Call, Effect, Flow, Request, StoreOp
from dtmcli._protocol import Response
from dtmcli._twophase import BranchReply, RunnerCore, _BodyExit, rollback_reason_of
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


class Group(Exception):
    """An exception group as anyio's backport or Python 3.11's ``ExceptionGroup`` hold their errors."""

    def __init__(self, *exceptions: BaseException) -> None:
        super().__init__(f"unhandled errors in a TaskGroup ({len(exceptions)} sub-exception)")
        self.exceptions = exceptions


def test_an_exception_group_around_the_branch_error_aborts_with_the_branch_reason() -> None:
    """m4: a TaskGroup raises an ExceptionGroup; the reason is the branch's answer (as with gather)."""
    tcc = prepared()
    failure = DtmFailure("insufficient balance")
    tcc._record(failure)
    groups: list[BaseException] = [Group(failure), Group(Group(KeyError("k"), failure))]
    if hasattr(builtins, "ExceptionGroup"):  # Python 3.11+
        groups.append(builtins.ExceptionGroup("tg", [failure]))
    for group in groups:
        effects, _ = drive(tcc._finish_flow(group), lambda e: None)
        assert [describe(e) for e in effects] == [("call", "_cleanup_abort", "insufficient balance")]
    other = Group(KeyError("k"))  # the group is about something else: its own text
    effects, _ = drive(tcc._finish_flow(other), lambda e: None)
    assert [describe(e) for e in effects] == [("call", "_cleanup_abort", rollback_reason_of(other))]


def test_a_body_that_caught_an_interrupted_branch_call_raises_a_dtm_error_not_the_cancellation() -> None:
    """M1: the cancellation of one branch call (``wait_for``) is noted as a DtmError naming the branch; after
    the clean body the transaction is aborted and that DtmError is raised, not a stray CancelledError."""
    tcc = prepared()
    cancelled = asyncio.CancelledError()
    _, outcome = drive(tcc._call_branch_flow({}, f"{BUSI}/try", "", ""), lambda e: Raise(cancelled))
    assert outcome is cancelled  # the call itself still ends cancelled (wait_for turns it into its TimeoutError)
    effects, outcome = drive(tcc._finish_flow(None), lambda e: False if e.fn == tcc._cancel_requested else None)  # type: ignore[attr-defined]
    assert type(outcome) is DtmError and outcome.__cause__ is cancelled
    assert "branch 01 try call was interrupted by CancelledError" in str(outcome)
    assert describe(effects[0])[:2] == ("call", "_cleanup_abort") and "interrupted" in describe(effects[0])[2]
    # A cancellation of the task itself that the body swallowed (still pending) is raised again.
    _, outcome = drive(tcc._finish_flow(None), lambda e: True if e.fn == tcc._cancel_requested else None)  # type: ignore[attr-defined]
    assert outcome is cancelled


@pytest.mark.parametrize("interruption", [asyncio.CancelledError(), KeyboardInterrupt()])
def test_an_interrupted_submit_is_followed_by_an_abort(
    interruption: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """m5: DTM may hold the transaction prepared with nobody left to finish it; an abort is safe whatever
    reached DTM (a submitted transaction is not aborted: 409)."""
    tcc = prepared()
    effects, outcome = drive(tcc._finish_flow(None), lambda e: Raise(interruption) if e.fn == tcc.submit else None)  # type: ignore[attr-defined]
    reason = rollback_reason_of(interruption)
    assert [describe(e) for e in effects] == [("call", "submit"), ("call", "_unsure_abort", reason)]
    assert outcome is interruption and "submit interrupted" in caplog.text
    # DTM took the submit (409): logged, the interruption propagates.
    effects, outcome = drive(tcc._finish_flow(None),
                             lambda e: Raise(interruption if e.fn == tcc.submit else DtmFailure("cannot abort")))  # type: ignore[attr-defined]
    assert outcome is interruption and len(effects) == 2
    # An answer from DTM (an error the submit flow already judged) is no interruption: no abort.
    effects, outcome = drive(tcc._finish_flow(None), lambda e: Raise(DtmTransportError("reset")))
    assert [describe(e) for e in effects] == [("call", "submit")] and isinstance(outcome, DtmTransportError)


def test_an_interrupted_prepare_is_followed_by_an_abort_and_the_body_never_runs() -> None:
    runner = RunnerCore(lambda: Tcc(DTM, "G1"), "tcc_global_transaction")
    cancelled = asyncio.CancelledError()
    effects, outcome = drive(runner._run_flow(body_fn),
                             lambda e: Raise(cancelled) if describe(e)[1] == "prepare" else None)
    assert [describe(e)[1:] for e in effects] == [("prepare",), ("_unsure_abort", "CancelledError")]
    assert outcome is cancelled


def test_the_unsure_abort_posts_an_abort_whatever_the_state() -> None:
    tcc = prepared()
    tcc._state = "submitted"  # a cancelled submit "may have been sent"
    effects, outcome = drive(tcc._unsure_abort_flow("CancelledError"), lambda e: OK)
    assert outcome is None and tcc.state == "aborted"
    assert describe(effects[0])[:2] == ("request", f"{DTM}/abort")
    assert describe(effects[0])[3]["rollback_reason"] == "CancelledError"
    tcc._state = "submitted"
    _, outcome = drive(tcc._unsure_abort_flow("x"), lambda e: Response(409, b'{"dtm_result":"FAILURE"}'))
    assert isinstance(outcome, DtmFailure) and tcc.state == "submitted"  # DTM took the submit first


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
    assert type(outcome) is error
    if isinstance(outcome, asyncio.CancelledError):  # propagates; noted as a DtmError (M1, below)
        noted = tcc.branch_error
        assert type(noted) is DtmError and noted.__cause__ is outcome
        assert (noted.gid, noted.branch_id, noted.op) == ("G1", "01", "try")
    else:
        assert tcc.branch_error is outcome
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


def test_run_aborts_after_a_generator_exit_the_body_raised() -> None:
    """m3: the sync driver tags a GeneratorExit raised by the body (as 0.3 did, it aborts); an untagged one
    is the async driver's coroutine being closed, and nothing more may be awaited then."""
    runner = RunnerCore(lambda: Tcc(DTM, "G1"), "tcc_global_transaction")
    exit_ = GeneratorExit()
    effects, outcome = drive(runner._run_flow(body_fn), lambda e: Raise(_BodyExit(exit_)) if e.fn is body_fn else None)  # type: ignore[attr-defined]
    assert [describe(e)[1:] for e in effects][2:] == [("_cleanup_abort", "GeneratorExit")]
    assert outcome is exit_
    effects, outcome = drive(runner._run_flow(body_fn), lambda e: Raise(GeneratorExit()) if e.fn is body_fn else None)  # type: ignore[attr-defined]
    assert len(effects) == 2 and isinstance(outcome, GeneratorExit)


def test_run_refuses_an_async_generator_before_the_submit() -> None:
    """m1: the body returned an async generator, whose code never runs: abort instead of an empty submit."""

    async def agen() -> Any:  # pragma: no cover - its body never runs
        yield None

    runner = RunnerCore(lambda: Tcc(DTM, "G1"), "tcc_global_transaction")
    effects, outcome = drive(runner._run_flow(body_fn), lambda e: agen() if e.fn is body_fn else None)  # type: ignore[attr-defined]
    assert isinstance(outcome, DtmInvalidInput) and "async generator" in str(outcome)
    assert describe(effects[-1])[1] == "_cleanup_abort"


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
    assert steps[:3] == [("store", "set_autocommit", False), ("store", "exec_shielded", "xa start 'G1-01'"),
                         ("store", "execute", f"insert ignore into {TABLE}(trans_type, gid, branch_id, op, barrier_id, "
                          "reason) values(%s, %s, %s, %s, %s, %s)", barrier_row("action"))]
    assert steps[3] == ("call", "busi", "the-conn")
    assert steps[4][:2] == ("request", f"{DTM}/registerBranch")
    assert steps[5:] == [("store", "exec", "xa end 'G1-01'"), ("store", "exec", "xa prepare 'G1-01'")]


def test_local_xa_postgres_statements_restore_autocommit() -> None:
    effects, outcome = drive(local_flow("postgres"), xa_answers(saved=False))
    steps = [describe(e) for e in effects]
    assert steps[0] == ("store", "set_autocommit", True) and steps[1] == ("store", "exec_shielded", "begin")
    assert "on conflict (gid, branch_id, op, barrier_id) do nothing" in steps[2][2]
    assert steps[-2:] == [("store", "exec", "prepare transaction 'G1-01'"), ("store", "set_autocommit", False)]
    assert outcome == "done"


def test_local_xa_business_error_rolls_back_without_registering() -> None:
    boom = ValueError("no")
    effects, outcome = drive(local_flow("mysql"), xa_answers(busi_error=boom, saved=True))
    steps = [describe(e) for e in effects]
    assert not any(s[0] == "request" for s in steps)
    assert steps[-3:] == [("store", "exec_shielded", "xa end 'G1-01'"),
                          ("store", "exec_shielded", "xa rollback 'G1-01'"), ("store", "set_autocommit", True)]
    assert outcome is boom


def test_local_xa_refused_registration_rolls_back() -> None:
    effects, outcome = drive(local_flow("postgres"), xa_answers(register=Response(409, b'{"dtm_result":"FAILURE"}')))
    assert isinstance(outcome, DtmFailure)
    assert [describe(e) for e in effects][-1] == ("store", "exec_shielded", "rollback")


def test_local_xa_after_phase2_rollback_refuses_without_running_busi() -> None:
    effects, outcome = drive(local_flow("mysql"), xa_answers(affected=0))
    assert isinstance(outcome, DtmFailure) and "already rolled back" in str(outcome)
    assert not any(isinstance(e, (Call, Request)) for e in effects)
    assert describe(effects[-1]) == ("store", "exec_shielded", "xa rollback 'G1-01'")


def test_local_xa_cancellation_rolls_back_and_propagates() -> None:
    effects, outcome = drive(local_flow("mysql"), xa_answers(busi_error=asyncio.CancelledError()))
    assert isinstance(outcome, asyncio.CancelledError)
    assert [describe(e) for e in effects][-2:] == [("store", "exec_shielded", "xa end 'G1-01'"),
                                                   ("store", "exec_shielded", "xa rollback 'G1-01'")]


def test_local_xa_postgres_refuses_an_aborted_transaction_before_registering() -> None:
    """C1: a database error the business code caught aborts a PostgreSQL transaction; PREPARE would then be a
    quiet ROLLBACK. The check comes after the business function and before registerBranch."""
    aborted = BarrierDatabaseError("the transaction was aborted by a database error the business code caught")

    def answer(effect: Effect) -> Any:
        if isinstance(effect, StoreOp) and effect.name == "refuse_aborted":
            return Raise(aborted)
        return xa_answers()(effect)

    effects, outcome = drive(local_flow("postgres"), answer)
    steps = [describe(e) for e in effects]
    assert outcome is aborted
    assert steps[3:] == [("call", "busi", "the-conn"), ("store", "refuse_aborted"),
                         ("store", "exec_shielded", "rollback")]  # not registered, nothing prepared
    assert ("store", "refuse_aborted") not in [describe(e) for e in drive(local_flow("mysql"), xa_answers())[0]]


@pytest.mark.parametrize("tag", ["ROLLBACK", "rollback", ""])
def test_local_xa_postgres_prepare_answered_rollback_is_an_error(tag: str) -> None:
    """C1, belt and braces: PREPARE TRANSACTION that answers another command tag prepared nothing."""

    def answer(effect: Effect) -> Any:
        if describe(effect)[1:] == ("exec", "prepare transaction 'G1-01'"):
            return tag
        return xa_answers()(effect)

    effects, outcome = drive(local_flow("postgres"), answer)
    assert isinstance(outcome, BarrierDatabaseError) and "aborted" in str(outcome)
    steps = [describe(e) for e in effects]
    assert steps[-3:] == [("store", "exec", "prepare transaction 'G1-01'"), ("store", "exec_shielded", "rollback"),
                          ("store", "exec_shielded", "rollback prepared 'G1-01'")]
    _, outcome = drive(local_flow("postgres"), lambda e: "PREPARE TRANSACTION" if describe(e)[1] == "exec"
                       else xa_answers()(e))
    assert outcome == "done"


def test_local_xa_postgres_abort_after_the_prepare_was_sent_rolls_the_prepared_xact_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """m6: a cancellation (or error) once PREPARE was sent may find it done on the server: a plain ROLLBACK
    cannot remove a prepared transaction, ROLLBACK PREPARED can; "no such xid" there is quiet."""
    caplog.set_level(logging.DEBUG, "dtmcli")

    def answer(effect: Effect) -> Any:
        step = describe(effect)[1:]
        if step == ("exec", "prepare transaction 'G1-01'"):
            return Raise(asyncio.CancelledError())
        if step == ("exec_shielded", "rollback prepared 'G1-01'"):
            return Raise(FakePgError("42704"))
        return xa_answers()(effect)

    effects, outcome = drive(local_flow("postgres"), answer)
    assert isinstance(outcome, asyncio.CancelledError)
    assert [describe(e) for e in effects][-2:] == [("store", "exec_shielded", "rollback"),
                                                   ("store", "exec_shielded", "rollback prepared 'G1-01'")]
    assert "during abort failed" not in caplog.text and "nothing was prepared" in caplog.text
    # Before the PREPARE was sent (here: registerBranch refused), a plain ROLLBACK is all there is.
    effects, _ = drive(local_flow("postgres"), xa_answers(register=Response(409, b'{"dtm_result":"FAILURE"}')))
    assert not any("rollback prepared" in str(describe(e)) for e in effects)


def test_local_xa_abort_runs_every_step_when_cancelled_again() -> None:
    """M2: a second cancellation arriving during one abort statement (which itself runs to its end, shielded)
    does not skip the next: XA END without XA ROLLBACK would leave the XA open, holding its locks."""
    second = asyncio.CancelledError("again")

    def answer(effect: Effect) -> Any:
        if describe(effect)[1:] == ("exec_shielded", "xa end 'G1-01'"):
            return Raise(second)
        return xa_answers(busi_error=asyncio.CancelledError("first"), saved=True)(effect)

    effects, outcome = drive(local_flow("mysql"), answer)
    assert outcome is second
    assert [describe(e) for e in effects][-3:] == [("store", "exec_shielded", "xa end 'G1-01'"),
                                                   ("store", "exec_shielded", "xa rollback 'G1-01'"),
                                                   ("store", "set_autocommit", True)]


def test_local_xa_refuses_an_async_generator_business_function() -> None:
    """m1: an async generator's body never runs: preparing it would report work that was never done."""

    async def agen(tx: Any) -> Any:  # pragma: no cover - its body never runs
        yield tx

    register = register_xa_branch_flow(Xa(DTM).client, xa_registration(ACTION))
    effects, outcome = drive(local_transaction_flow(ACTION, "mysql", TABLE, agen, "the-conn", register), xa_answers())
    assert isinstance(outcome, DtmInvalidInput) and "async generator" in str(outcome)
    assert not any(isinstance(e, Request) for e in effects)
    assert describe(effects[-1]) == ("store", "exec_shielded", "xa rollback 'G1-01'")


def test_local_xa_rejects_an_xid_the_server_cannot_hold() -> None:
    info = BranchInfo.from_query({**ACTION.query(), "gid": "g" * 62})
    with pytest.raises(DtmInvalidInput, match="at most 64"):
        local_transaction_flow(info, "mysql", TABLE, busi, None, iter(()))  # type: ignore[arg-type]


class FakeDbError(Exception):
    """A driver error as the error mapping reads it (module pymysql, errno first)."""


FakeDbError.__module__ = "pymysql.err"


class FakePgError(Exception):
    """A PostgreSQL driver error as the error mapping reads it (module psycopg, ``sqlstate``)."""

    def __init__(self, sqlstate: str) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


FakePgError.__module__ = "psycopg.errors"


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


def unknown_xid_answers(unknown: BaseException, *, held: bool = False,
                        reason: Optional[str] = "action") -> Callable[[Effect], Any]:
    """Phase 2 finding no xid: XA RECOVER lists it (``held``) or not; the action's barrier row has ``reason``."""
    def a(e: Effect) -> Any:
        if describe(e)[1] == "exec":
            return Raise(unknown)
        if describe(e)[1] == "fetch_all":
            return [(1, 5, 0, b"G1-01" if held else b"other")]
        if describe(e)[1] == "fetch_one" and "pg_prepared_xacts" not in describe(e)[2]:
            return None if reason is None else (reason,)
        return None

    return a


def test_phase2_unknown_xid_is_done_unless_still_held() -> None:
    unknown = FakeDbError(1397, "XAER_NOTA: Unknown XID")
    effects, outcome = drive(phase2_flow(phase2("commit"), "mysql", TABLE), unknown_xid_answers(unknown))
    assert outcome is None
    assert describe(effects[-1]) == ("store", "fetch_one", f"select reason from {TABLE} where gid = %s and "
                                     "branch_id = %s and op = %s and barrier_id = %s", ("G1", "01", "action", "01"))
    _, outcome = drive(phase2_flow(phase2("commit"), "mysql", TABLE), unknown_xid_answers(unknown, held=True))
    assert isinstance(outcome, BarrierConflict) and outcome.__cause__ is unknown
    _, outcome = drive(phase2_flow(phase2("commit"), "mysql", TABLE),
                       lambda e: Raise(FakeDbError(1205, "lock wait")) if describe(e)[1] == "exec" else None)
    assert type(outcome).__name__ == "BarrierConflict"  # a retryable error, mapped


@pytest.mark.parametrize("dialect", ["mysql", "postgres"])
@pytest.mark.parametrize("reason", [None, "rollback"])
def test_phase2_commit_of_work_never_prepared_is_an_error_not_success(
    dialect: str, reason: Optional[str], caplog: pytest.LogCaptureFixture
) -> None:
    """No xid and no committed action row: the branch's work is lost (e.g. PostgreSQL turned the PREPARE into
    a ROLLBACK). Answering success would let DTM mark the global transaction succeeded."""
    unknown = FakeDbError(1397, "XAER_NOTA") if dialect == "mysql" else FakePgError("42704")
    _, outcome = drive(phase2_flow(phase2("commit"), dialect, TABLE), unknown_xid_answers(unknown, reason=reason))
    assert isinstance(outcome, BarrierDatabaseError) and "no committed action barrier row" in str(outcome)
    assert outcome.__cause__ is unknown and (outcome.gid, outcome.branch_id, outcome.op) == ("G1", "01", "commit")
    assert "the branch's work is lost" in caplog.text
    _, outcome = drive(phase2_flow(phase2("rollback"), dialect, TABLE),  # a rollback has nothing to lose
                       lambda e: Raise(unknown) if describe(e)[1] == "exec" else 1)
    assert outcome is None


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

