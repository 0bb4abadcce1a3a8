"""asyncio TCC end to end over real HTTP: dtmcli.asyncio → coordinator → branch services.

Runs against the in-process coordinator, or a real DTM with ``--dtm-server`` (the same fixtures as
tests/e2e/test_tcc_xa_e2e.py). Covers the three runner shapes, concurrent branches with
``asyncio.gather``, nested TCC from an ``async def`` try handler (Starlette under uvicorn), typed
errors and wait_result as in the sync API, and a cancelled body: aborted (shielded), then re-raised.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Awaitable, Callable, Optional, TypeVar

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import Route
from web_servers import serve_asgi

from dtmcli import (
    BranchInfo,
    DtmConnectError,
    DtmError,
    DtmFailure,
    DtmInProgress,
    DtmInvalidInput,
    DtmOngoing,
    local_gid,
)
from dtmcli import tcc_global_transaction as sync_tcc_global_transaction
from dtmcli.asyncio import AsyncDtmClient
from dtmcli.asyncio.tcc import Tcc, tcc_global_transaction
from dtmcli.contrib.starlette import branch_endpoint
from dtmcli.testing import Answer, BranchService, DtmFacade

R = TypeVar("R")


def run(main: Callable[[], Awaitable[R]]) -> R:
    """``asyncio.run(main())``: each test body gets its own event loop (no pytest-asyncio)."""
    return asyncio.run(main())  # type: ignore[arg-type]


def tcc_urls(svc: BranchService, prefix: str, n: int, **answers: Any) -> dict[str, str]:
    """try/confirm/cancel routes 1..n under ``prefix``; ``answers`` scripts some of them by name."""
    names = [f"{kind}{i}" for i in range(1, n + 1) for kind in ("try", "confirm", "cancel")]
    return {name: svc.route(f"{prefix}/{name}", *([answers[name]] if name in answers else [])) for name in names}


def branch(urls: dict[str, str], i: int) -> tuple[str, str, str]:
    return urls[f"try{i}"], urls[f"confirm{i}"], urls[f"cancel{i}"]


def ops(svc: BranchService, op: str) -> list[tuple[str, str]]:
    return [(c.path, c.branch_id) for c in svc.calls() if c.op == op]


def refused_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/dtmsvr"


# -- success, failure, typed errors ------------------------------------------------------------------


def test_gathered_branches_are_confirmed(dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    # Slow tries: both requests are in flight at once, so the branches really overlap.
    urls = tcc_urls(svc, "/g", 2, try1=Answer(delay=0.2), try2=Answer(delay=0.2))
    gid = local_gid()

    async def main() -> list[str]:
        async with tcc_global_transaction(dtm.url, gid, timeout_to_fail=30) as tcc:
            replies = await asyncio.gather(*(tcc.call_branch({"amount": i}, *branch(urls, i)) for i in (1, 2)))
        assert tcc.state == "submitted"
        return [r.branch_id for r in replies]

    assert run(main) == ["01", "02"]
    assert dtm.wait_status(gid).status == "succeed"
    svc.wait_calls(1, "/g/confirm1")
    svc.wait_calls(1, "/g/confirm2")
    assert sorted(ops(svc, "confirm")) == [("/g/confirm1", "01"), ("/g/confirm2", "02")]
    (try1,) = svc.calls("/g/try1")
    assert try1.query["dtm"] == dtm.url and try1.json() == {"amount": 1}
    assert not ops(svc, "cancel")


def test_many_concurrent_branches_get_distinct_ids(dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    try_url = svc.route("/m/try")
    gid = local_gid()

    async def main() -> None:
        async with tcc_global_transaction(dtm.url, gid) as tcc:
            await asyncio.gather(*(tcc.call_branch({"i": i}, try_url, "", "") for i in range(20)))

    run(main)
    assert dtm.wait_status(gid).status == "succeed"
    tried = sorted(c.branch_id for c in svc.calls("/m/try"))
    assert tried == [f"{i:02d}" for i in range(1, 21)]
    trans = dtm.query(gid)
    assert trans is not None and {b.branch_id for b in trans.branches} == set(tried)


def test_try_failure_cancels_every_branch_with_the_sync_error(dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    urls = tcc_urls(svc, "/f", 2, try2=(409, {"error": "insufficient balance"}))
    gid = local_gid()

    async def main() -> None:
        async with tcc_global_transaction(dtm.url, gid) as tcc:
            await tcc.call_branch({"n": 1}, *branch(urls, 1))
            await tcc.call_branch({"n": 2}, *branch(urls, 2))
            pytest.fail("the second try must raise")

    with pytest.raises(DtmFailure) as e:
        run(main)
    assert (e.value.gid, e.value.branch_id, e.value.op) == (gid, "02", "try")
    trans = dtm.wait_status(gid)
    assert trans.status == "failed" and "insufficient balance" in trans.rollback_reason
    svc.wait_calls(1, "/f/cancel1")
    assert ops(svc, "cancel") == [("/f/cancel2", "02"), ("/f/cancel1", "01")]
    assert not ops(svc, "confirm")


def test_body_error_aborts_with_reason_and_propagates(dtm: DtmFacade, branch_service: BranchService) -> None:
    urls = tcc_urls(branch_service, "/b", 1)
    gid = local_gid()
    seen: list[Tcc] = []

    async def main() -> None:
        async with tcc_global_transaction(dtm.url, gid) as tcc:
            seen.append(tcc)
            await tcc.call_branch({}, *branch(urls, 1))
            raise LookupError("missing row")

    with pytest.raises(LookupError, match="missing row"):
        run(main)
    assert seen[0].state == "aborted"
    trans = dtm.wait_status(gid)
    assert trans.status == "failed" and trans.rollback_reason == "LookupError: missing row"
    branch_service.wait_calls(1, "/b/cancel1")


def test_a_caught_branch_error_still_aborts(dtm: DtmFacade, branch_service: BranchService) -> None:
    urls = tcc_urls(branch_service, "/o", 1, try1=425)
    gid = local_gid()

    async def main() -> None:
        async with tcc_global_transaction(dtm.url, gid) as tcc:
            try:
                await tcc.call_branch({}, *branch(urls, 1))
            except DtmOngoing:
                pass  # swallowed; confirming a branch whose try is unknown would be wrong

    with pytest.raises(DtmOngoing):
        run(main)
    assert dtm.wait_status(gid).status == "failed"
    assert not ops(branch_service, "confirm")


def test_wait_result_set_inside_the_body_reports_an_unfinished_submit(
    dtm: DtmFacade, branch_service: BranchService
) -> None:
    """As the sync test_wait_result_may_be_set_between_prepare_and_submit: a confirm failing once
    makes the waiting submit raise DtmInProgress, and the transaction is never submitted twice."""
    gid = local_gid()
    confirm = branch_service.route("/w/confirm", 500, 200)
    seen: list[Tcc] = []

    async def main() -> None:
        async with tcc_global_transaction(dtm.url, gid) as tcc:
            seen.append(tcc)
            await tcc.call_branch({}, branch_service.route("/w/try"), confirm, "")
            tcc.wait_result = True

    with pytest.raises(DtmInProgress):
        run(main)
    assert seen[0].state == "submitted" and len(branch_service.calls("/w/confirm")) == 1


def test_prepare_failure_never_enters_the_body() -> None:
    entered: list[bool] = []

    async def main() -> None:
        client = AsyncDtmClient(refused_url(), timeout=2)
        async with tcc_global_transaction(client, local_gid()):
            entered.append(True)

    with pytest.raises(DtmConnectError):
        run(main)
    assert not entered



@pytest.mark.parametrize(
    "answer", [409, 425, (500, "db down"), (200, "no stock FAILURE"), Answer(400, {"message": "bad amount"})],
    ids=["409", "425", "500", "200-FAILURE", "400"],
)
def test_sync_and_async_fail_alike(dtm: DtmFacade, branch_service: BranchService, answer: Any) -> None:
    """The same failed try raises the same typed error, and aborts with the same reason, in both APIs."""
    try_url = branch_service.route("/same/try", answer)

    def outcome(use_async: bool) -> tuple[Any, ...]:
        gid = local_gid()
        with pytest.raises(Exception) as e:
            if use_async:

                async def callback(tcc: Tcc) -> None:
                    await tcc.call_branch({"n": 1}, try_url, "", "")

                run(lambda: tcc_global_transaction(dtm.url, gid, callback))
            else:
                sync_tcc_global_transaction(dtm.url, gid, lambda tcc: tcc.call_branch({"n": 1}, try_url, "", ""))
        exc = e.value
        trans = dtm.wait_status(gid)
        shown = str(exc).replace(gid, "<gid>")
        return type(exc), exc.branch_id, exc.op, shown, trans.status, trans.rollback_reason  # type: ignore[attr-defined]

    assert outcome(use_async=True) == outcome(use_async=False)

# -- the three shapes and their checks ----------------------------------------------------------------


def test_decorator_runs_a_new_transaction_per_call(dtm: DtmFacade, branch_service: BranchService) -> None:
    urls = tcc_urls(branch_service, "/d", 1)

    @tcc_global_transaction(dtm.url, timeout_to_fail=9)
    async def transfer(tcc: Tcc, amount: int) -> str:
        await tcc.call_branch({"amount": amount}, *branch(urls, 1))
        return tcc.gid

    async def main() -> list[str]:
        return [await transfer(1), await transfer(2)]

    gids = run(main)
    assert len(set(gids)) == 2
    for gid in gids:
        assert dtm.wait_status(gid).status == "succeed"


def test_callback_form_returns_the_result(dtm: DtmFacade, branch_service: BranchService) -> None:
    reserved = branch_service.route("/c/try1", (200, {"dtm_result": "SUCCESS", "reserved": 3}))
    gid = local_gid()

    async def callback(tcc: Tcc) -> Any:
        reply = await tcc.call_branch({"n": 1}, reserved, "", "")
        return reply.data["reserved"]

    async def main() -> Any:
        return await tcc_global_transaction(dtm.url, gid, callback)

    assert run(main) == 3
    assert dtm.wait_status(gid).status == "succeed"


def test_plain_functions_are_refused_before_anything_is_sent() -> None:
    """Nothing may be sent: every request to this address would raise DtmConnectError instead."""
    url = refused_url()

    def plain(tcc: Any) -> None:  # pragma: no cover - never called
        pass

    async def coroutine_body(tcc: Any) -> None:  # pragma: no cover - never called
        pass

    async def generator_body(tcc: Any) -> Any:  # pragma: no cover - never called
        yield tcc

    with pytest.raises(DtmInvalidInput, match=r"tcc_global_transaction .*plain.*async def"):
        tcc_global_transaction(url, None, plain)
    with pytest.raises(DtmInvalidInput, match="async def"):
        tcc_global_transaction(url)(plain)
    # m1: an async generator function's code would never run (the transaction was submitted empty).
    with pytest.raises(DtmInvalidInput, match=r"async generator function .*generator_body"):
        tcc_global_transaction(url, None, generator_body)
    with pytest.raises(DtmInvalidInput, match="async generator function"):
        tcc_global_transaction(url)(generator_body)
    # ... and the sync runner keeps refusing coroutine functions.
    with pytest.raises(DtmInvalidInput, match="coroutine function"):
        sync_tcc_global_transaction(url)(coroutine_body)
    with pytest.raises(DtmInvalidInput):
        tcc_global_transaction(url, "bad gid")
    with pytest.raises(DtmInvalidInput, match="AsyncDtmClient"):
        from dtmcli import DtmClient

        tcc_global_transaction(DtmClient(url))


def test_a_lambda_returning_a_coroutine_runs_and_one_returning_anything_else_aborts(
    dtm: DtmFacade, branch_service: BranchService
) -> None:
    """m1: ``run(lambda t: work(t))`` is awaited like an async def body (it used to be refused); a lambda
    returning something that is not awaitable is refused before the submit, and the transaction aborted."""
    try_url = branch_service.route("/l/try")
    gids: list[str] = []

    async def transfer(tcc: Tcc, amount: int) -> int:
        gids.append(tcc.gid)
        await tcc.call_branch({"amount": amount}, try_url, "", "")
        return amount

    async def main() -> tuple[int, int]:
        ran = await tcc_global_transaction(dtm.url).run(lambda tcc: transfer(tcc, 30))
        called = await tcc_global_transaction(dtm.url, None, lambda tcc: transfer(tcc, 40))
        return ran, called

    assert run(main) == (30, 40)
    assert [dtm.wait_status(g).status for g in gids] == ["succeed", "succeed"]

    async def not_awaitable() -> None:
        await tcc_global_transaction(dtm.url).run(lambda tcc: gids.append(tcc.gid))

    with pytest.raises(DtmInvalidInput, match="returned NoneType, not an awaitable"):
        run(not_awaitable)
    trans = dtm.wait_status(gids[-1])
    assert trans.status == "failed" and "not an awaitable" in trans.rollback_reason


def test_one_runner_entered_by_concurrent_tasks(dtm: DtmFacade, branch_service: BranchService) -> None:
    """Each task's exit finishes the transaction its own task entered (the shared ContextVar logic)."""
    try_url = branch_service.route("/r/try")
    runner = tcc_global_transaction(dtm.url)
    gids: dict[int, str] = {}

    async def work(i: int) -> None:
        async with runner as tcc:
            gids[i] = tcc.gid
            await asyncio.sleep(0.05 * (3 - i))  # exits in another order than the enters
            await tcc.call_branch({"i": i}, try_url, "", "")
            if i == 1:
                raise KeyError("one")

    async def main() -> list[Any]:
        return await asyncio.gather(*(work(i) for i in range(3)), return_exceptions=True)

    outcomes = run(main)
    assert [type(o).__name__ for o in outcomes] == ["NoneType", "KeyError", "NoneType"]
    assert [dtm.wait_status(gids[i]).status for i in range(3)] == ["succeed", "failed", "succeed"]


# -- nested TCC from an async try handler -------------------------------------------------------------


def test_nested_tcc_from_an_async_try_handler(dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    child_urls = [svc.route(f"/n/{n}") for n in ("try3", "confirm3", "cancel3")]

    @branch_endpoint
    async def nested_try(request: Request, info: BranchInfo) -> dict[str, str]:
        child = Tcc.from_request(request)  # the dtm URL comes from the query
        assert child.nested and child.gid == info.gid
        reply = await child.call_branch({"nested": True}, *child_urls)
        return {"child": reply.branch_id}

    app = Starlette(routes=[Route("/try2", nested_try, methods=["POST"])])
    gid = local_gid()
    urls = tcc_urls(svc, "/n", 2)
    with serve_asgi(app) as base:

        async def main() -> Any:
            async with tcc_global_transaction(dtm.url, gid) as tcc:
                await tcc.call_branch({"n": 1}, *branch(urls, 1))
                reply = await tcc.call_branch({"n": 2}, f"{base}/try2", urls["confirm2"], urls["cancel2"])
            return reply.data

        assert run(main) == {"dtm_result": "SUCCESS", "child": "0201"}
        assert dtm.wait_status(gid).status == "succeed"
    svc.wait_calls(1, "/n/confirm1")
    assert [b for _, b in ops(svc, "confirm")] == ["0201", "02", "01"]
    trans = dtm.query(gid)
    assert trans is not None and {b.branch_id for b in trans.branches} == {"01", "02", "0201"}


# -- cancellation --------------------------------------------------------------------------------------


class SlowAbort:
    """Wraps an async transport: an ``/abort`` waits ``delay`` seconds before it is sent, so a test
    can cancel the task again while the abort is under way."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay = inner, delay
        self.abort_started: Optional[asyncio.Event] = None
        self.aborted: Optional[asyncio.Event] = None

    async def request(self, method: str, url: str, **kwargs: Any) -> Any:
        if url.endswith("/abort"):
            assert self.abort_started is not None and self.aborted is not None
            self.abort_started.set()
            await asyncio.sleep(self.delay)
            resp = await self.inner.request(method, url, **kwargs)
            self.aborted.set()
            return resp
        return await self.inner.request(method, url, **kwargs)

    def __getattr__(self, name: str) -> Any:  # timeout, aclose
        return getattr(self.inner, name)


def test_cancelled_body_aborts_shielded_and_reraises(dtm: DtmFacade, branch_service: BranchService) -> None:
    """A CancelledError in the middle of the body aborts the global transaction, and a second
    cancellation while the abort is under way does not stop it; the CancelledError propagates."""
    svc = branch_service
    urls = tcc_urls(svc, "/x", 2, try2=Answer(delay=3))  # the second try is still running when cancelled
    gid = local_gid()
    slow = SlowAbort(AsyncDtmClient(dtm.url).transport, delay=0.3)
    client = AsyncDtmClient(dtm.url, transport=slow)
    seen: list[Tcc] = []

    async def main() -> None:
        slow.abort_started, slow.aborted = asyncio.Event(), asyncio.Event()
        in_body = asyncio.Event()

        async def body() -> None:
            async with tcc_global_transaction(client, gid, timeout_to_fail=60) as tcc:
                seen.append(tcc)
                await tcc.call_branch({"n": 1}, *branch(urls, 1))
                in_body.set()
                await tcc.call_branch({"n": 2}, *branch(urls, 2))

        task = asyncio.ensure_future(body())
        await in_body.wait()
        await asyncio.sleep(0.3)  # the second branch is registered and its try in flight
        task.cancel()
        await asyncio.wait_for(slow.abort_started.wait(), 5)
        task.cancel()  # again, while the abort waits to be sent
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(slow.aborted.wait(), 5)  # the abort still went out

    run(main)
    assert seen[0].state == "aborted"
    trans = dtm.wait_status(gid, ["failed"])
    assert trans.rollback_reason == "CancelledError"
    svc.wait_calls(1, "/x/cancel1")
    assert sorted(ops(svc, "cancel")) == [("/x/cancel1", "01"), ("/x/cancel2", "02")]
    assert not ops(svc, "confirm")


def test_a_branch_call_cut_off_by_a_timeout_the_body_caught_aborts_with_a_dtm_error(
    dtm: DtmFacade, branch_service: BranchService
) -> None:
    """M1. ``wait_for`` cancels the slow try and the body catches its TimeoutError. The transaction is aborted,
    and what is raised is a DtmError naming the branch, not the inner CancelledError: that one, raised in a
    task nobody cancelled, escaped ``except Exception`` and a TaskGroup counted it as a cancelled child."""
    svc = branch_service
    urls = tcc_urls(svc, "/m1", 2, try2=Answer(delay=2))
    gid = local_gid()
    caught: list[str] = []

    async def transfer() -> None:
        async with tcc_global_transaction(dtm.url, gid) as tcc:
            await tcc.call_branch({"n": 1}, *branch(urls, 1))
            try:
                await asyncio.wait_for(tcc.call_branch({"n": 2}, *branch(urls, 2)), 0.3)
            except asyncio.TimeoutError:
                caught.append("timeout")  # e.g. "try again later"

    with pytest.raises(DtmError, match="tcc branch 02 try call was interrupted by CancelledError") as e:
        run(transfer)
    assert caught == ["timeout"] and isinstance(e.value.__cause__, asyncio.CancelledError)
    assert (e.value.gid, e.value.branch_id, e.value.op) == (gid, "02", "try")
    trans = dtm.wait_status(gid, ["failed"])
    assert "branch 02 try call was interrupted" in trans.rollback_reason
    svc.wait_calls(1, "/m1/cancel1")

    if not hasattr(asyncio, "TaskGroup"):  # Python < 3.11
        return
    gid = local_gid()

    async def in_a_task_group() -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(transfer())

    with pytest.raises(BaseExceptionGroup) as group_error:  # noqa: F821 - Python 3.11+
        run(in_a_task_group)
    assert [type(x) for x in group_error.value.exceptions] == [DtmError]  # a failure, not a "cancelled child"
    assert dtm.wait_status(gid, ["failed"]).status == "failed"


@pytest.mark.skipif(not hasattr(asyncio.Task, "cancelling"), reason="Task.cancelling is Python 3.11+")
def test_a_cancellation_of_its_own_task_the_body_swallowed_is_still_raised(
    dtm: DtmFacade, branch_service: BranchService
) -> None:
    """M1: only a cancellation of the branch call alone becomes a DtmError; one of the task itself (pending:
    ``Task.cancelling()``), which the body caught, is re-raised after the abort, so the task still ends cancelled."""
    urls = tcc_urls(branch_service, "/m1c", 2, try2=Answer(delay=2))
    gid = local_gid()

    async def main() -> None:
        async with tcc_global_transaction(dtm.url, gid) as tcc:
            await tcc.call_branch({"n": 1}, *branch(urls, 1))
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().call_later(0.3, task.cancel)
            try:
                await tcc.call_branch({"n": 2}, *branch(urls, 2))
            except asyncio.CancelledError:
                pass  # a bug of the body's, which the runner does not make worse

    with pytest.raises(asyncio.CancelledError):
        run(main)
    assert dtm.wait_status(gid, ["failed"]).status == "failed"


@pytest.mark.skipif(not hasattr(asyncio, "TaskGroup"), reason="asyncio.TaskGroup is Python 3.11+")
def test_branches_in_a_task_group_abort_with_the_branch_answer_as_reason(
    dtm: DtmFacade, branch_service: BranchService
) -> None:
    """m4: the rollback_reason is the failed branch's answer, as with gather, not the ExceptionGroup's text."""
    urls = tcc_urls(branch_service, "/m4", 2, try2=(409, {"error": "insufficient balance"}))
    reasons = {}
    for form in ("gather", "TaskGroup"):
        gid = local_gid()

        async def main(form: str = form, gid: str = gid) -> None:
            async with tcc_global_transaction(dtm.url, gid) as tcc:
                calls = [tcc.call_branch({}, *branch(urls, 1)), tcc.call_branch({}, *branch(urls, 2))]
                if form == "gather":
                    await asyncio.gather(*calls)
                else:
                    async with asyncio.TaskGroup() as group:
                        for call in calls:
                            group.create_task(call)

        with pytest.raises((DtmFailure, BaseExceptionGroup)):  # noqa: F821 - Python 3.11+
            run(main)
        reasons[form] = dtm.wait_status(gid, ["failed"]).rollback_reason
    assert reasons["TaskGroup"] == reasons["gather"] and "insufficient balance" in reasons["gather"]


class FailingAbort(SlowAbort):
    """An ``/abort`` that fails after ``delay`` seconds."""

    async def request(self, method: str, url: str, **kwargs: Any) -> Any:
        if url.endswith("/abort"):
            assert self.abort_started is not None and self.aborted is not None
            self.abort_started.set()
            await asyncio.sleep(self.delay)
            self.aborted.set()
            raise DtmConnectError("injected: abort lost")
        return await self.inner.request(method, url, **kwargs)


@pytest.mark.parametrize("outcome", ["loop_shut_down", "abort_failed"])
def test_an_abort_outliving_its_cancelled_caller_is_logged(
    dtm: DtmFacade, branch_service: BranchService, outcome: str, caplog: pytest.LogCaptureFixture
) -> None:
    """m2. A body cancelled twice leaves its shielded abort running on its own. When ``asyncio.run`` returns
    (or a server stops) before DTM answered, the loop cancels that abort: this used to go unlogged, with
    the transaction ``aborted`` here and ``prepared`` on DTM until timeout_to_fail."""
    urls = tcc_urls(branch_service, "/m2", 1)
    gid = local_gid()
    if outcome == "loop_shut_down":
        transport: SlowAbort = SlowAbort(AsyncDtmClient(dtm.url).transport, delay=5)
    else:
        transport = FailingAbort(AsyncDtmClient(dtm.url).transport, delay=0.2)
    client = AsyncDtmClient(dtm.url, transport=transport)

    async def main() -> None:
        transport.abort_started, transport.aborted = asyncio.Event(), asyncio.Event()
        in_body = asyncio.Event()

        async def body() -> None:
            async with tcc_global_transaction(client, gid, timeout_to_fail=60) as tcc:
                await tcc.call_branch({"n": 1}, *branch(urls, 1))
                in_body.set()
                await asyncio.Event().wait()

        task = asyncio.ensure_future(body())
        await in_body.wait()
        task.cancel()
        await asyncio.wait_for(transport.abort_started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if outcome == "abort_failed":
            await asyncio.wait_for(transport.aborted.wait(), 5)
            await asyncio.sleep(0.05)  # the done callback

    run(main)
    if outcome == "loop_shut_down":
        assert f"abort of tcc {gid} was cancelled before DTM answered" in caplog.text
        assert "timeout_to_fail" in caplog.text
    else:
        assert f"abort of tcc {gid} finished after its caller was cancelled, and failed" in caplog.text
    trans = dtm.query(gid)
    assert trans is not None and trans.status == "prepared"


class Gate:
    """Wraps an async transport: the first request to a URL ending with ``suffix`` is held (and can be
    cancelled) before it is sent (``before``), or after its answer came (``after``)."""

    def __init__(self, inner: Any, suffix: str, when: str) -> None:
        self.inner, self.suffix, self.when = inner, suffix, when
        self.hit: Optional[asyncio.Event] = None
        self.used = False

    async def request(self, method: str, url: str, **kwargs: Any) -> Any:
        if self.used or not url.split("?")[0].endswith(self.suffix):
            return await self.inner.request(method, url, **kwargs)
        self.used = True
        assert self.hit is not None
        if self.when == "before":
            self.hit.set()
            await asyncio.Event().wait()
        resp = await self.inner.request(method, url, **kwargs)
        self.hit.set()
        await asyncio.Event().wait()
        return resp

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize(
    ("suffix", "when", "status"),
    [("/prepare", "after", "failed"), ("/prepare", "before", None),
     ("/submit", "before", "failed"), ("/submit", "after", "succeed")],
)
def test_a_cancelled_prepare_or_submit_is_followed_by_an_abort(
    dtm: DtmFacade, branch_service: BranchService, suffix: str, when: str, status: Optional[str]
) -> None:
    """m5. A prepare or submit cancelled before DTM answered: DTM may hold the transaction prepared, with
    nobody left to finish it (the tries' reservations held until timeout_to_fail). An abort follows; it
    is safe whatever reached DTM: a submitted transaction is not aborted (409), an unknown one is not (500)."""
    urls = tcc_urls(branch_service, f"/m5{suffix}{when}", 1)
    gid = local_gid()
    gate = Gate(AsyncDtmClient(dtm.url).transport, suffix, when)
    client = AsyncDtmClient(dtm.url, transport=gate)
    seen: list[Tcc] = []

    async def main() -> None:
        gate.hit = asyncio.Event()

        async def body() -> None:
            async with tcc_global_transaction(client, gid, timeout_to_fail=60) as tcc:
                seen.append(tcc)
                await tcc.call_branch({"n": 1}, *branch(urls, 1))

        task = asyncio.ensure_future(body())
        await asyncio.wait_for(gate.hit.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main)
    if status is None:
        assert dtm.query(gid) is None and not seen
        return
    trans = dtm.wait_status(gid, [status])
    assert trans.status == status
    if suffix == "/submit":
        assert seen[0].state == ("aborted" if status == "failed" else "submitted")
        kind = "cancel" if status == "failed" else "confirm"
        branch_service.wait_calls(1, f"/m5{suffix}{when}/{kind}1")
