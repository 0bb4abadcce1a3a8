"""Issue 9.4: the TCC/XA runners refuse coroutine functions, and keep their nesting state per
thread and per asyncio task (contextvars), so each ``with`` finishes the transaction it began."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import threading
import warnings
import weakref
from collections.abc import AsyncIterator
from typing import Any, Callable

import pytest

from dtmcli import DtmInvalidInput, Tcc, Xa, local_gid, tcc_global_transaction, xa_global_transaction
from dtmcli.testing import DtmFacade

# Nothing may be sent when a coroutine function is refused: a request here would fail with
# DtmConnectError instead of DtmInvalidInput.
REFUSING = "http://127.0.0.1:9/api/dtmsvr"

RUNNERS = [tcc_global_transaction, xa_global_transaction]


async def async_body(trans: Any) -> None:
    await asyncio.sleep(0)


async def async_gen_body(trans: Any) -> AsyncIterator[None]:
    yield None


class AsyncCallable:
    async def __call__(self, trans: Any) -> None:
        await asyncio.sleep(0)


ASYNC_FUNCS: list[Any] = [async_body, async_gen_body, functools.partial(async_body), AsyncCallable()]
ASYNC_IDS = ["async def", "async generator", "partial", "async __call__"]


@pytest.mark.parametrize("runner", RUNNERS, ids=["tcc", "xa"])
@pytest.mark.parametrize("func", ASYNC_FUNCS, ids=ASYNC_IDS)
def test_decorating_a_coroutine_function_is_refused(runner: Callable[..., Any], func: Any) -> None:
    with pytest.raises(DtmInvalidInput, match="coroutine function"):
        runner(REFUSING)(func)


@pytest.mark.parametrize("runner", RUNNERS, ids=["tcc", "xa"])
@pytest.mark.parametrize("func", ASYNC_FUNCS, ids=ASYNC_IDS)
def test_a_coroutine_callback_is_refused_before_prepare(runner: Callable[..., Any], func: Any) -> None:
    with pytest.raises(DtmInvalidInput, match="coroutine function"):
        runner(REFUSING, None, func)
    with pytest.raises(DtmInvalidInput, match="coroutine function"):
        runner(REFUSING).run(func)


def test_decorator_error_names_the_function() -> None:
    with pytest.raises(DtmInvalidInput, match=r"tcc_global_transaction .*async_body.*plain def"):

        @tcc_global_transaction(REFUSING)
        async def async_body(tcc: Tcc) -> None:
            pass


def test_sync_callback_returning_a_coroutine_aborts(dtm: DtmFacade) -> None:
    """A plain function that returns an awaitable is only detectable after the call: abort, never submit."""
    gid = local_gid()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tcc_global_transaction(dtm.url, gid, lambda tcc: async_body(tcc))
        except DtmInvalidInput as exc:
            assert "returns an awaitable" in str(exc)
        else:
            pytest.fail("a callback returning a coroutine must be refused")
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]  # the coroutine was closed
    trans = dtm.wait_status(gid)
    assert trans.status == "failed" and "awaitable" in trans.rollback_reason


def test_sync_functions_still_work(dtm: DtmFacade) -> None:
    @xa_global_transaction(dtm.url)
    def body(xa: Xa, n: int) -> tuple[str, int]:
        return xa.gid, n

    gid, n = body(7)
    assert n == 7 and dtm.wait_status(gid).status == "succeed"


def test_interleaved_asyncio_tasks_each_finish_their_own_transaction(dtm: DtmFacade) -> None:
    """Two tasks in one thread share a runner. Task ``a`` enters first and fails first; task ``b``
    enters second and succeeds. A per-thread stack would make ``a``'s exit abort ``b``'s transaction
    and ``b``'s exit submit ``a``'s."""
    runner = tcc_global_transaction(dtm.url)
    a_entered, b_entered, a_left = asyncio.Event(), asyncio.Event(), asyncio.Event()
    gids: dict[str, str] = {}

    class Boom(Exception):
        pass

    async def task_a() -> None:
        with pytest.raises(Boom), runner as tcc:
            gids["a"] = tcc.gid
            a_entered.set()
            await b_entered.wait()
            raise Boom("a fails")
        a_left.set()

    async def task_b() -> None:
        await a_entered.wait()
        with runner as tcc:
            gids["b"] = tcc.gid
            b_entered.set()
            await a_left.wait()

    async def main() -> None:
        await asyncio.gather(task_a(), task_b())

    asyncio.run(main())
    assert dtm.wait_status(gids["a"]).status == "failed"
    assert dtm.wait_status(gids["b"]).status == "succeed"


def test_threads_each_finish_their_own_transaction(dtm: DtmFacade) -> None:
    runner = tcc_global_transaction(dtm.url)
    entered = threading.Barrier(2)
    gids: dict[str, str] = {}
    errors: list[BaseException] = []

    def work(name: str, fail: bool) -> None:
        try:
            with runner as tcc:
                gids[name] = tcc.gid
                entered.wait()
                if fail:
                    raise ValueError(name)
                entered.wait()  # the failing thread has left by now
        except ValueError:
            entered.wait()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=("bad", True)), threading.Thread(target=work, args=("ok", False))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert dtm.wait_status(gids["bad"]).status == "failed"
    assert dtm.wait_status(gids["ok"]).status == "succeed"


def test_nested_runs_of_one_runner_finish_innermost_first(dtm: DtmFacade) -> None:
    runner = tcc_global_transaction(dtm.url)
    with runner as outer:
        with pytest.raises(KeyError), runner as inner:
            raise KeyError("inner only")
        assert inner.state == "aborted" and outer.state == "prepared"
    assert outer.state == "submitted"
    assert dtm.wait_status(inner.gid).status == "failed" and dtm.wait_status(outer.gid).status == "succeed"


def test_exit_without_enter_is_refused() -> None:
    runner = tcc_global_transaction(REFUSING)
    with pytest.raises(DtmInvalidInput, match="without a matching enter"):
        runner.__exit__(None, None, None)


# -- enter and exit in different copies of a context (a sync FastAPI yield dependency) ------------


def test_exit_in_another_copy_of_the_context_finishes_the_transaction(dtm: DtmFacade) -> None:
    """What run_in_threadpool does to each step of a sync generator: the exit cannot see the
    ContextVar entry of the enter. The only open transaction is still submitted, or aborted."""
    runner = tcc_global_transaction(dtm.url)
    ok = contextvars.copy_context().run(runner.__enter__)
    contextvars.copy_context().run(runner.__exit__, None, None, None)
    assert ok.state == "submitted" and dtm.wait_status(ok.gid).status == "succeed"

    bad = contextvars.copy_context().run(runner.__enter__)
    error = ValueError("route failed")
    contextvars.copy_context().run(runner.__exit__, ValueError, error, None)
    assert bad.state == "aborted"
    trans = dtm.wait_status(bad.gid)
    assert trans.status == "failed" and trans.rollback_reason == "ValueError: route failed"


def test_ambiguous_exit_finishes_nothing_and_says_why(dtm: DtmFacade) -> None:
    """Two transactions open in contexts the exit cannot see: either may be another task's, still
    in use, so neither is submitted nor aborted; each is still finished by an exit in its own context."""
    runner = tcc_global_transaction(dtm.url)
    ctx_a, ctx_b = contextvars.copy_context(), contextvars.copy_context()
    a, b = ctx_a.run(runner.__enter__), ctx_b.run(runner.__enter__)
    with pytest.raises(DtmInvalidInput, match=f"2 of its transactions are open.*{a.gid}, {b.gid}"):
        contextvars.copy_context().run(runner.__exit__, None, None, None)
    assert a.state == b.state == "prepared"
    assert dtm.client.query(a.gid).status == dtm.client.query(b.gid).status == "prepared"
    ctx_b.run(runner.__exit__, KeyError, KeyError("b"), None)
    ctx_a.run(runner.__exit__, None, None, None)
    assert a.state == "submitted" and b.state == "aborted"
    assert dtm.wait_status(a.gid).status == "succeed" and dtm.wait_status(b.gid).status == "failed"


def test_a_context_entry_finished_elsewhere_is_not_finished_again(dtm: DtmFacade) -> None:
    """The enter ran here and its exit in a copy: the entry left here is stale. It is never
    finished again, and the next exit here drops it (it would keep the transaction alive)."""
    runner = tcc_global_transaction(dtm.url)

    def scenario() -> None:
        first = runner.__enter__()
        contextvars.copy_context().run(runner.__exit__, None, None, None)
        assert first.state == "submitted"
        with pytest.raises(DtmInvalidInput, match="without a matching enter"):
            runner.__exit__(None, None, None)
        with runner as second:
            pass
        assert second.state == "submitted"
        first_ref = weakref.ref(first)
        del first
        gc.collect()
        assert first_ref() is None

    contextvars.copy_context().run(scenario)


def test_decorated_calls_are_not_open_with_blocks(dtm: DtmFacade) -> None:
    """run() and the decorator keep their transaction themselves: a with-block's exit that runs in
    another context during a decorated call finishes the with-block's transaction, not the call's."""
    runner = tcc_global_transaction(dtm.url)
    outer = contextvars.copy_context().run(runner.__enter__)

    @runner
    def body(tcc: Tcc) -> str:
        contextvars.copy_context().run(runner.__exit__, None, None, None)
        assert tcc.state == "prepared" and outer.state == "submitted"
        return tcc.gid

    gid = body()
    assert dtm.wait_status(gid).status == "succeed" and dtm.wait_status(outer.gid).status == "succeed"


def test_an_inherited_entry_is_not_taken_for_the_exits_own(dtm: DtmFacade) -> None:
    """An inner enter/exit of the same runner in copies of the context (a sync FastAPI dependency inside
    an outer ``with``): the inner exit's copy inherits the outer entry, which is not its own. It must
    neither abort the outer transaction nor leave it to be submitted in place of the failed inner one."""
    runner = tcc_global_transaction(dtm.url)
    with runner as outer:
        inner = contextvars.copy_context().run(runner.__enter__)
        with pytest.raises(DtmInvalidInput, match="2 of its transactions are open"):
            contextvars.copy_context().run(runner.__exit__, ValueError, ValueError("inner failed"), None)
        assert outer.state == inner.state == "prepared"
    assert outer.state == "submitted" and dtm.wait_status(outer.gid).status == "succeed"
    assert inner.state == "prepared"  # never submitted: DTM cancels it after timeout_to_fail


# -- what the body raises or returns -----------------------------------------------------------------


def test_a_generator_exit_from_a_run_body_aborts(dtm: DtmFacade) -> None:
    """m3: as in 0.3 (and as the ``with`` form does), a GeneratorExit raised by a run()/decorator body
    aborts the transaction; it was left prepared until timeout_to_fail."""
    gids: list[str] = []

    def body(tcc: Tcc) -> None:
        gids.append(tcc.gid)
        raise GeneratorExit

    with pytest.raises(GeneratorExit):
        tcc_global_transaction(dtm.url, None, body)
    with pytest.raises(GeneratorExit):
        xa_global_transaction(dtm.url)(body)()
    for gid in gids:
        trans = dtm.wait_status(gid)
        assert trans.status == "failed" and trans.rollback_reason == "GeneratorExit"


def test_a_lambda_returning_an_async_generator_aborts(dtm: DtmFacade) -> None:
    """m1: an async generator is not awaitable, so it passed the check for coroutines, and the
    transaction was submitted without its code having run."""
    gids: list[str] = []

    async def agen(tcc: Tcc) -> AsyncIterator[None]:  # pragma: no cover - never runs
        yield None

    with pytest.raises(DtmInvalidInput, match="async generator"):
        tcc_global_transaction(dtm.url).run(lambda tcc: gids.append(tcc.gid) or agen(tcc))
    trans = dtm.wait_status(gids[0])
    assert trans.status == "failed" and "async generator" in trans.rollback_reason


class InterruptedSubmit:
    """Wraps a transport: the first ``/submit`` raises KeyboardInterrupt before anything is sent."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        if url.endswith("/submit"):
            raise KeyboardInterrupt
        return self.inner.request(method, url, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_an_interrupted_submit_is_followed_by_an_abort(dtm: DtmFacade) -> None:
    """m5 (blocking flavour): Ctrl-C while the submit is sent leaves DTM holding the transaction prepared
    (here nothing was sent); the abort that follows spares waiting for timeout_to_fail."""
    from dtmcli import DtmClient

    client = DtmClient(dtm.url, transport=InterruptedSubmit(DtmClient(dtm.url).transport))
    seen: list[Tcc] = []
    with pytest.raises(KeyboardInterrupt), tcc_global_transaction(client) as tcc:
        seen.append(tcc)
    assert seen[0].state == "aborted"
    trans = dtm.wait_status(seen[0].gid)
    assert trans.status == "failed" and trans.rollback_reason == "KeyboardInterrupt"
