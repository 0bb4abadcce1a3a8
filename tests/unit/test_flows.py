"""The sans-I/O core, driven by hand: the effects each flow asks for and the decisions it takes from
the answers it is given. No socket, no event loop: what the sync and async drivers share."""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any, Callable, Optional

import pytest

from dtmcli import DtmClient, DtmConnectError, DtmFailure, DtmInProgress, DtmTimeout, DtmTransportError, Msg, Saga
from dtmcli._flow import Call, Effect, Flow, Request, Sleep, arun, run
from dtmcli._protocol import Response
from dtmcli._retry import ExponentialBackoff, Retry
from dtmcli.errors import DtmInvalidInput, DtmServerError

DTM = "http://dtm.invalid:36789/api/dtmsvr"
OK = Response(200, b'{"dtm_result":"SUCCESS"}')


def query_answer(status: str, reason: str = "") -> Response:
    trans = {"gid": "G", "status": status, "trans_type": "saga", "rollback_reason": reason}
    return Response(200, json.dumps({"transaction": trans, "branches": []}).encode())


class Script:
    """Feeds a flow the scripted result (or exception) of each effect and records the effects."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.effects: list[Effect] = []

    def drive(self, flow: Flow[Any]) -> Any:
        value: Any = None
        failed = False
        while True:
            try:
                effect = flow.throw(value) if failed else flow.send(value)
            except StopIteration as stop:
                return stop.value
            self.effects.append(effect)
            answer = self.answers.pop(0)
            value, failed = answer, isinstance(answer, BaseException)

    def paths(self) -> list[str]:
        return [e.url.rsplit("/", 1)[-1] if isinstance(e, Request) else type(e).__name__ for e in self.effects]


def client(**kwargs: Any) -> DtmClient:
    return DtmClient(DTM, **kwargs)


def saga(**options: Any) -> Saga:
    return Saga(client(retry=Retry(retries=0)), "G", **options).add("http://b/out", "http://b/com", {"a": 1})


# -- DTM calls and retries ---------------------------------------------------------------------------


def test_an_idempotent_call_retries_with_backoff_then_succeeds() -> None:
    c = client(retry=Retry(retries=2, backoff=ExponentialBackoff(0.01, 1.0)))
    script = Script(DtmConnectError("refused"), None, DtmTimeout("slow"), None, Response(200, b'{"gid":"X"}'))
    assert script.drive(c._new_gid_flow()) == "X"
    assert [type(e) for e in script.effects] == [Request, Sleep, Request, Sleep, Request]
    assert [e.seconds for e in script.effects if isinstance(e, Sleep)] == [0.01, 0.02]


def test_a_non_idempotent_call_is_never_retried() -> None:
    c = client(retry=Retry(retries=5))
    script = Script(DtmTimeout("slow"))
    with pytest.raises(DtmTimeout) as e:
        script.drive(c._post_flow("submit", {"gid": "G1"}))
    assert len(script.effects) == 1 and e.value.gid == "G1"


def test_retry_gives_up_when_the_backoff_would_pass_the_deadline() -> None:
    retry = Retry(retries=3, backoff=ExponentialBackoff(1.0, 1.0))
    assert retry.next_delay(0, deadline=None, now=0.0) == 1.0
    assert retry.next_delay(0, deadline=10.0, now=9.5) is None
    assert retry.next_delay(3, deadline=None, now=0.0) is None


def test_a_200_without_success_is_not_an_answer_from_dtm() -> None:
    script = Script(Response(200, b"<html>login</html>"))
    with pytest.raises(DtmServerError):
        script.drive(client()._post_flow("prepare", {"gid": "G"}))


# -- submit outcomes ---------------------------------------------------------------------------------


def test_submit_sends_the_body_once() -> None:
    s = saga()
    script = Script(OK)
    script.drive(s._run_flow("submit", lambda: s._submit_flow(False)))
    (req,) = script.effects
    assert isinstance(req, Request) and req.url == f"{DTM}/submit" and req.body is not None
    assert json.loads(req.body)["steps"] == [{"action": "http://b/out", "compensate": "http://b/com"}]
    assert s.state == "submitted"


@pytest.mark.parametrize(
    ("stored", "expected"),
    [("failed", DtmFailure), ("aborting", DtmFailure), ("submitted", DtmInProgress), ("succeed", None)],
)
def test_wait_result_settles_an_inconclusive_answer_with_query(stored: str, expected: Optional[type]) -> None:
    s = saga(wait_result=True)
    script = Script(Response(409, b'{"message":"FAILURE"}'), query_answer(stored, "no money"))
    flow = s._run_flow("submit", lambda: s._submit_flow(False))
    if expected is None:
        script.drive(flow)
    else:
        with pytest.raises(expected):
            script.drive(flow)
    assert script.paths() == ["submit", "query"]


def test_wait_result_with_an_unknown_gid_raises_the_first_answer() -> None:
    s = saga(wait_result=True)
    script = Script(Response(425, b'{"message":"ONGOING"}'), Response(200, b'{"transaction":null}'))
    with pytest.raises(Exception, match="ONGOING"):
        script.drive(s._run_flow("submit", lambda: s._submit_flow(False)))


def test_recover_resubmits_only_after_a_refused_connection_and_query_shows_nothing() -> None:
    s = saga()
    script = Script(DtmConnectError("refused"), Response(200, b'{"transaction":null}'), OK)
    script.drive(s._run_flow("submit", lambda: s._submit_flow(True)))
    assert script.paths() == ["submit", "query", "submit"]


def test_recover_never_resubmits_after_a_timeout() -> None:
    s = saga()
    script = Script(DtmTimeout("lost"), Response(200, b'{"transaction":null}'))
    with pytest.raises(DtmTransportError, match="outcome unknown"):
        script.drive(s._run_flow("submit", lambda: s._submit_flow(True)))
    assert script.paths() == ["submit", "query"]
    assert s.state == "submitted"  # it may have reached DTM: never sent again


def test_a_refused_submit_goes_back_to_new_and_a_timed_out_one_does_not() -> None:
    refused, lost = saga(), saga()
    with pytest.raises(DtmConnectError):
        Script(DtmConnectError("refused")).drive(refused._run_flow("submit", lambda: refused._submit_flow(False)))
    with pytest.raises(DtmTimeout):
        Script(DtmTimeout("lost")).drive(lost._run_flow("submit", lambda: lost._submit_flow(False)))
    assert (refused.state, lost.state) == ("new", "submitted")


def test_an_operation_in_flight_refuses_any_other_and_content_changes() -> None:
    s = saga()
    first = s._run_flow("submit", lambda: s._submit_flow(False))
    assert isinstance(next(first), Request)  # in flight
    with pytest.raises(DtmInvalidInput, match="a submit of saga G is in progress"):
        next(s._run_flow("submit", lambda: s._submit_flow(False)))
    with pytest.raises(DtmInvalidInput):
        s.add("http://b/x", "", {})
    with pytest.raises(StopIteration):
        first.send(OK)


# -- msg do_and_submit -------------------------------------------------------------------------------


def msg() -> Msg:
    return Msg(client(retry=Retry(retries=0)), "M").add("http://b/in", {"a": 1})


def run_do_and_submit(busi: Callable[[Any], Any], *answers: Any) -> tuple[Script, Any]:
    m = msg()
    script = Script(*answers)
    flow = m._do_and_submit_flow("http://b/qp", busi)
    try:
        return script, script.drive(flow)
    except Exception as exc:  # the business error is always re-raised
        return script, exc


def test_do_and_submit_success_submits() -> None:
    script, result = run_do_and_submit(lambda bb: 7, OK, 7, OK)
    assert result == 7 and script.paths() == ["prepare", "Call", "submit"]


def test_do_and_submit_business_failure_aborts() -> None:
    busi_error = DtmFailure("no money")
    script, result = run_do_and_submit(lambda bb: None, OK, busi_error, OK)
    assert result is busi_error and script.paths() == ["prepare", "Call", "abort"]


@pytest.mark.parametrize(
    ("query_prepared", "then"),
    [(Response(200, b"{}"), ["submit"]), (Response(409, b"FAILURE"), ["abort"]), (DtmTimeout("no answer"), [])],
)
def test_do_and_submit_other_error_asks_query_prepared(query_prepared: Any, then: list[str]) -> None:
    busi_error = RuntimeError("db went away")
    script, result = run_do_and_submit(lambda bb: None, OK, busi_error, query_prepared, OK)
    assert result is busi_error
    assert script.paths() == ["prepare", "Call", "qp", *then]
    qp = script.effects[2]
    assert isinstance(qp, Request) and qp.params is not None
    assert qp.params["branch_id"] == "00" and qp.params["op"] == "msg"


def test_do_and_submit_cancellation_leaves_the_message_prepared() -> None:
    m = msg()
    s = Script(OK, asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        s.drive(m._do_and_submit_flow("http://b/qp", lambda bb: None))
    assert s.paths() == ["prepare", "Call"] and m.state == "prepared"


def test_do_and_submit_hands_the_business_function_the_msg_barrier() -> None:
    m = msg()
    flow = m._do_and_submit_flow("http://b/qp", lambda bb: bb)
    assert isinstance(next(flow), Request)
    call = flow.send(OK)
    assert isinstance(call, Call)
    (barrier,) = call.args
    assert (barrier.gid, barrier.branch_id, barrier.op, barrier.trans_type) == ("M", "00", "msg", "msg")


# -- the drivers ------------------------------------------------------------------------------------


class Recorder:
    """An ``io`` whose transport answers from a script, for both drivers."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.transport = self

    def _next(self) -> Any:
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def request(self, *args: Any, **kwargs: Any) -> Any:
        return self._next()


class AsyncRecorder(Recorder):
    async def request(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        await asyncio.sleep(0)
        return self._next()


def test_both_drivers_reach_the_same_outcome_from_the_same_answers() -> None:
    answers = (Response(409, b"{}"), query_answer("failed", "out of stock"))
    with pytest.raises(DtmFailure, match="out of stock"):
        s = saga(wait_result=True)
        run(s._run_flow("submit", lambda: s._submit_flow(False)), Recorder(*answers))
    with pytest.raises(DtmFailure, match="out of stock"):
        s = saga(wait_result=True)
        asyncio.run(arun(s._run_flow("submit", lambda: s._submit_flow(False)), AsyncRecorder(*answers)))


def test_the_async_driver_throws_a_cancellation_into_the_flow() -> None:
    seen: list[str] = []

    def flow() -> Flow[None]:
        try:
            yield Request("GET", "http://x/")
        except asyncio.CancelledError:
            seen.append("cleanup")
            yield Request("GET", "http://x/cleanup")
            raise

    class Slow:
        transport: Any

        def __init__(self) -> None:
            self.transport = self

        async def request(self, method: str, url: str, **kwargs: Any) -> Response:
            if not url.endswith("cleanup"):
                await asyncio.sleep(10)
            seen.append(url)
            return OK

    async def main() -> None:
        task = asyncio.ensure_future(arun(flow(), Slow()))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert seen == ["cleanup", "http://x/cleanup"]


def test_a_failed_prepare_in_flight_cannot_be_overtaken_by_a_submit() -> None:
    """A submit started while a prepare is in flight is refused; else the prepare's rollback to ``new``
    would reopen a submitted message to a second submit (both would be sent)."""
    m = msg()
    prepare = m._prepare_op("http://b/qp")
    assert isinstance(next(prepare), Request)
    with pytest.raises(DtmInvalidInput, match="a prepare of msg M is in progress"):
        next(m._run_flow("submit", lambda: m._submit_flow(False)))
    with pytest.raises(DtmTimeout):
        prepare.throw(DtmTimeout("lost"))
    assert m.state == "new"
    script = Script(OK)
    script.drive(m._run_flow("submit", lambda: m._submit_flow(False)))  # now it may be sent, once
    assert script.paths() == ["submit"] and m.state == "submitted"


def test_the_sync_msg_refuses_async_local_work_before_sending() -> None:
    async def debit(barrier: Any) -> None:
        raise AssertionError("never run")

    async def debit_stream(barrier: Any) -> Any:  # an async generator: calling it runs nothing either
        yield None

    m = Msg("http://127.0.0.1:9/api/dtmsvr", "M").add("http://b/in", {"a": 1})  # nothing listens: a send would fail
    for work in (debit, debit_stream, functools.partial(debit)):
        with pytest.raises(DtmInvalidInput, match="async function"):
            m.prepare_and_submit("http://b/qp", work)
    assert m.state == "new"


def test_local_work_that_returns_a_coroutine_to_the_sync_driver_aborts() -> None:
    async def debit() -> None:
        raise AssertionError("never run")

    coroutine = debit()
    script, result = run_do_and_submit(lambda bb: coroutine, OK, coroutine, OK)
    assert isinstance(result, DtmInvalidInput) and "did not run" in str(result)
    assert script.paths() == ["prepare", "Call", "abort"]
    assert coroutine.cr_frame is None  # closed: no "never awaited" warning


def test_a_submit_refused_by_the_transport_before_sending_may_be_sent_again() -> None:
    """A transport that refuses the request itself (a closed user session: DtmInvalidInput) sent nothing."""
    s = saga()
    with pytest.raises(DtmInvalidInput):
        Script(DtmInvalidInput("session is closed")).drive(s._run_flow("submit", lambda: s._submit_flow(False)))
    assert s.state == "new"
    script = Script(OK)
    script.drive(s._run_flow("submit", lambda: s._submit_flow(False)))
    assert script.paths() == ["submit"] and s.state == "submitted"
