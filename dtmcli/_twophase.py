"""What TCC and XA global transactions share, sync and async alike: client-driven branches, the
finish decision (submit or abort), and the prepare → body → finish runner behind
``tcc_global_transaction`` and ``xa_global_transaction``.

Every decision is a flow (:mod:`dtmcli._flow`): :meth:`TwoPhaseCore._finish_flow` decides between
submit and abort, :meth:`TwoPhaseCore._recording` dooms the transaction on a failed branch call,
:meth:`RunnerCore._run_flow` is the whole ``run(callback)``. The submit and abort themselves are
``Call`` effects on the driver's own methods, so the sync driver keeps serialising them with its
lock and the async driver shields an abort from cancellation.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from contextvars import ContextVar, Token
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, ClassVar, Generic, Optional, TypeVar

from ._consts import DEFAULT_DTM
from ._flow import Call, Flow, discard_awaitable, run
from ._flow import is_async_function as _is_async
from ._flow import is_async_generator_function as _is_async_gen
from ._ids import BranchIdGenerator
from ._protocol import Response, go_trim
from ._trans import ABORTED, NESTED, NEW, PREPARED_STATE, TransBase, TransCore
from .client import DtmLike
from .errors import DtmError, DtmInvalidInput, DtmServerError

__all__ = [
    "BranchReply",
    "GlobalTransaction",
    "RunnerCore",
    "TwoPhaseCore",
    "TwoPhaseTrans",
    "global_transaction",
    "refuse_not_awaitable",
    "refuse_sync",
    "rollback_reason_of",
]

logger = logging.getLogger("dtmcli")

R = TypeVar("R")
V = TypeVar("V")
T2 = TypeVar("T2", bound="TwoPhaseCore")


@dataclass(frozen=True)
class BranchReply(Response):
    """A successful answer of a TCC try or XA action: ``status``, raw ``content``, ``text``,
    ``json()``, plus the ``branch_id`` it was called with."""

    branch_id: str = ""

    @property
    def data(self) -> Any:
        """The body parsed as JSON, or its text when it is not JSON (``None`` when empty)."""
        if not self.content:
            return None
        value = self.json()
        return value if value is not None or self.content.strip() == b"null" else self.text


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside an exception group (``TaskGroup``, anyio), recursively; ``[exc]`` for any other."""
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple) and all(isinstance(e, BaseException) for e in inner):
        return [leaf for e in inner for leaf in _leaves(e)]
    return [exc]


class _BodyExit(Exception):
    """A GeneratorExit raised by a ``run()`` body itself (blocking driver). It must abort like any other
    error; a GeneratorExit that reaches a flow untagged is its driver being closed (nothing more may run)."""

    def __init__(self, exc: GeneratorExit) -> None:
        super().__init__("GeneratorExit")
        self.exc = exc


def rollback_reason_of(exc: BaseException) -> str:
    """The ``rollback_reason`` for an error, as the Go client writes it.

    A branch FAILURE reads ``<body> FAILURE``, a branch's other error answer is its raw body,
    other errors are their message (``Type: message`` for non-dtmcli exceptions).
    """
    if isinstance(exc, DtmServerError) and exc.body:
        return go_trim(exc.body)
    if isinstance(exc, DtmError):
        return exc.message
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class TwoPhaseCore(TransCore):
    """Branches the client calls itself and the finish decision, shared by TCC and XA, sync and async.

    Branch ids come from a thread-safe generator (``01``, ``02``, ... or ``<parent>01`` when
    nested), so branches may be called from several threads or tasks at once. Once a branch call
    has failed after it was sent, the transaction can only be aborted. Lifecycle: ``new`` →
    ``prepare()`` → ``prepared`` → ``submit()``/``abort()`` (see :class:`~dtmcli._trans.TransCore`).
    """

    _submit_from: ClassVar[tuple[str, ...]] = (PREPARED_STATE,)
    _abort_from: ClassVar[tuple[str, ...]] = (PREPARED_STATE,)

    def __init__(self, dtm: Any = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)
        self._ids = BranchIdGenerator()
        self._branch_error: Optional[BaseException] = None
        self._branch_interrupt: Optional[BaseException] = None  # the cancellation behind _branch_error

    def _nest_under(self, parent_branch_id: str) -> None:
        """Make this a nested transaction object: branches ``<parent>01``..., no prepare/submit/abort."""
        self._ids = BranchIdGenerator(parent_branch_id)
        self._state = NESTED

    @property
    def nested(self) -> bool:
        """True for a transaction object built inside a branch handler (see ``Tcc.from_request``)."""
        return self._state == NESTED

    @property
    def branch_error(self) -> Optional[BaseException]:
        """The first error of a branch call that was sent; it dooms the transaction to abort.

        A branch call interrupted by a cancellation (e.g. ``asyncio.wait_for`` around it) is noted as
        a DtmError whose ``__cause__`` is that cancellation.
        """
        return self._branch_error

    def _check_can_call(self) -> None:
        state = self._state
        if state == NEW:
            raise DtmInvalidInput(f"prepare the {self.trans_type} before calling branches", gid=self.gid)
        if state not in (PREPARED_STATE, NESTED):
            raise DtmInvalidInput(f"the {self.trans_type} is already {state}", gid=self.gid)

    def _record(self, exc: BaseException, interrupt: Optional[BaseException] = None) -> None:
        with self._lock:
            if self._branch_error is None:
                self._branch_error, self._branch_interrupt = exc, interrupt

    def _recording(self, flow: Flow[V], branch_id: str = "", op: str = "") -> Flow[V]:
        """Run ``flow`` (a branch call under way), noting its error as the transaction's doom.

        A cancellation is noted as a DtmError: the body may catch what it became (``wait_for``'s
        TimeoutError) and exit cleanly, and the transaction is then aborted and that error raised;
        raising the cancellation itself would look like a cancellation of a task nobody cancelled.
        """
        try:
            return (yield from flow)
        except GeneratorExit:
            raise
        except BaseException as exc:
            if isinstance(exc, Exception):
                self._record(exc)
            else:
                error = DtmError(
                    f"{self.trans_type} branch {branch_id} {op} call was interrupted by {type(exc).__name__} "
                    "(a timeout around it?): its outcome is unknown, so the global transaction is aborted",
                    gid=self.gid, branch_id=branch_id, op=op,
                )
                error.__cause__ = exc
                self._record(error, exc)
            raise

    def _branch_flow(
        self, url: str, body: str, branch_id: str, op: str, phase2_url: Optional[str] = None
    ) -> Flow[BranchReply]:
        """POST a client-originated branch call and wrap its successful answer."""
        resp = yield from self._request_branch("POST", url, branch_id, op, body=body.encode(), phase2_url=phase2_url)
        return BranchReply(resp.status, resp.content, branch_id=branch_id)

    # -- finishing -------------------------------------------------------------------------

    def prepare(self) -> Any:
        """Prepare (the driver's; see :meth:`TwoPhaseTrans.prepare`)."""
        raise NotImplementedError

    def submit(self) -> Any:
        """Submit (the driver's; see :meth:`TwoPhaseTrans.submit`)."""
        raise NotImplementedError

    def _cleanup_abort(self, reason: str) -> Any:
        """The driver's abort after a failed body (the async one shields it from cancellation)."""
        raise NotImplementedError

    def _unsure_abort(self, reason: str) -> Any:
        """The driver's abort after an interrupted prepare or submit: :meth:`_unsure_abort_flow`,
        shielded from cancellation by the async driver."""
        raise NotImplementedError

    def _cancel_requested(self) -> bool:
        """Whether the current task has a cancellation pending (asyncio only; see ``Task.cancelling``)."""
        return False

    def _unsure_abort_flow(self, reason: str) -> Flow[None]:
        """Abort whatever the lifecycle state says (after an interrupted prepare or submit).

        DTM may hold the transaction prepared without anyone left to finish it, so the abort spares
        waiting for timeout_to_fail. It is safe whatever reached DTM: a transaction DTM already took
        the submit of is not aborted (409), one it never got is unknown (500).
        """
        yield from self._abort_flow(reason)
        with self._lock:
            self._state = ABORTED

    def _interrupted_flow(self, what: str, exc: BaseException) -> Flow[None]:
        """After ``what`` (prepare or submit) was interrupted before DTM answered (a cancellation,
        Ctrl-C): abort (:meth:`_unsure_abort_flow`); a failure of that abort is only logged."""
        if isinstance(exc, Exception):
            return  # DTM answered, or the flow already decided what the error means
        try:
            yield Call(self._unsure_abort, rollback_reason_of(exc))
        except Exception as abort_exc:  # 409: DTM took the submit; 500: it never got the prepare
            logger.info("%s %s: abort after an interrupted %s not done: %s", self.trans_type, self.gid, what, abort_exc)
        else:
            logger.warning("%s %s: %s interrupted by %s; aborted", self.trans_type, self.gid, what, type(exc).__name__)

    def _finish_flow(self, exc: Optional[BaseException]) -> Flow[None]:
        """Submit after a clean body; abort after an error (or an earlier failed branch call).

        The body's own exception is left to the caller to propagate; a failed abort is logged,
        never raised over it. After a clean body whose branch call failed (the body caught the
        error), the transaction is aborted and that branch error is raised. A submit interrupted
        before DTM answered is followed by an abort (:meth:`_unsure_abort_flow`).
        """
        cause = exc if exc is not None else self._branch_error
        if cause is None:
            try:
                yield Call(self.submit)
            except GeneratorExit:
                raise
            except BaseException as submit_exc:
                yield from self._interrupted_flow("submit", submit_exc)
                raise
            return
        reason = cause
        if exc is not None and self._branch_error is not None and any(
            leaf is self._branch_error for leaf in _leaves(exc)
        ):
            reason = self._branch_error  # a TaskGroup's ExceptionGroup around the branch's own error
        try:
            yield Call(self._cleanup_abort, rollback_reason_of(reason))
        except Exception as abort_exc:
            logger.error("%s %s: abort after %r failed: %s", self.trans_type, self.gid, cause, abort_exc)
        if exc is None:
            interrupt = self._branch_interrupt
            if interrupt is not None and (yield Call(self._cancel_requested)):
                raise interrupt  # the body swallowed a cancellation of its own task: let it go on
            raise cause


class TwoPhaseTrans(TwoPhaseCore, TransBase):
    """Base of :class:`~dtmcli.Tcc` and :class:`~dtmcli.Xa`: the blocking driver of :class:`TwoPhaseCore`.

    Branch ids come from a thread-safe generator (``01``, ``02``, ... or ``<parent>01`` when
    nested), so branches may be called from several threads at once. Once a branch call has
    failed after it was sent, the transaction can only be aborted. Lifecycle: ``new`` →
    ``prepare()`` → ``prepared`` → ``submit()``/``abort()`` (see :class:`~dtmcli._trans.TransBase`).
    """

    def __init__(self, dtm: DtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)

    def prepare(self) -> None:
        """Create the global transaction on DTM as ``prepared``, with its options (stored only now)."""
        self._run("prepare", self._prepare_flow)

    def submit(self) -> None:
        """Submit: DTM confirms/commits every registered branch.

        With ``wait_result`` an unfinished transaction raises DtmInProgress and a failed one
        DtmFailure (checked with ``/query``). A second submit is refused: DTM marks a resubmitted
        TCC/XA succeeded without confirming it (protocol.md §2).
        """
        self._run("submit", self._submit_flow)

    def abort(self, reason: Optional[str] = None) -> None:
        """Abort: DTM cancels/rolls back every registered branch. ``reason`` is stored (clipped)."""
        self._run("abort", lambda: self._abort_flow(reason))

    def _cleanup_abort(self, reason: str) -> None:
        self.abort(reason)

    def _unsure_abort(self, reason: str) -> None:
        self._drive(self._unsure_abort_flow(reason))


# The global transactions entered (``with``) in the current thread or asyncio task, innermost last.
# A ContextVar, not threading.local: asyncio tasks share a thread but each has its own context. It only
# chooses among the transactions a runner has entered (RunnerCore._entered), which are the truth:
# a framework may run __enter__ and __exit__ in two different copies of one context (FastAPI runs each
# step of a sync ``yield`` dependency through run_in_threadpool), so an entry set here can be lost.
def _same_context(token: Token[Any]) -> bool:
    """True when the current context is the very one ``token`` was set in (a copy of it is not)."""
    try:
        _ACTIVE.reset(token)
    except (ValueError, RuntimeError):
        return False
    return True


_ACTIVE: ContextVar[tuple[tuple[RunnerCore[Any], TwoPhaseCore], ...]] = ContextVar(
    "dtmcli_global_transactions", default=()
)


def _is_lambda(func: Any) -> bool:
    return inspect.isfunction(func) and func.__name__ == "<lambda>"


def _name_of(func: Any) -> str:
    return getattr(func, "__qualname__", None) or type(func).__name__


class RunnerCore(Generic[T2]):
    """What the sync and async runners share: the transactions entered per context (which one an
    exit finishes, see :class:`GlobalTransaction`), and ``run`` as a flow."""

    def __init__(self, factory: Callable[[], T2], kind: str = "global transaction") -> None:
        self._factory = factory
        self._kind = kind
        self._lock = threading.Lock()
        self._entered: list[T2] = []  # entered and not exited yet
        self._tokens: dict[int, Token[Any]] = {}  # id(trans) -> the _ACTIVE token of its enter

    def _entered_now(self, trans: T2) -> T2:
        """Note ``trans`` (just prepared) as entered in the current context."""
        token = _ACTIVE.set((*_ACTIVE.get(), (self, trans)))
        with self._lock:
            self._entered.append(trans)
            self._tokens[id(trans)] = token
        return trans

    def _take_entered(self) -> T2:
        """Remove and return the transaction an exit in the current context belongs to."""
        active = _ACTIVE.get()
        with self._lock:
            entered = self._entered
            # This context's entries of this runner, minus those another context already finished.
            mine = [t for gt, t in active if gt is self and t in entered]
            if mine and _same_context(self._tokens[id(mine[-1])]):
                trans = mine[-1]
            elif len(entered) == 1:
                trans = entered[0]  # entered in another copy of this context (see the class docstring)
            elif not entered:
                raise DtmInvalidInput(f"{self._kind} exited without a matching enter")
            else:
                gids = ", ".join(t.gid for t in entered)
                raise DtmInvalidInput(
                    f"{self._kind} exited in a context that did not enter it, while {len(entered)} of its "
                    f"transactions are open ({gids}): none is finished, since any of them may belong to "
                    "another thread or task; DTM cancels each after timeout_to_fail. Create one runner per "
                    "with-block (e.g. inside the dependency) instead of sharing one"
                )
            entered[:] = [e for e in entered if e is not trans]
            del self._tokens[id(trans)]
        _ACTIVE.set(tuple(a for a in active if a[0] is not self or a[1] in entered))
        return trans

    def _begin_flow(self, trans: T2) -> Flow[None]:
        """Prepare ``trans``; one interrupted before DTM answered is aborted (DTM may hold it)."""
        try:
            yield Call(trans.prepare)
        except GeneratorExit:
            raise
        except BaseException as exc:
            yield from trans._interrupted_flow("prepare", exc)
            raise

    def _run_flow(self, body: Callable[[T2], Any]) -> Flow[Any]:
        """A new transaction: prepare, ``body(trans)``, then submit or abort (:meth:`TwoPhaseCore._finish_flow`).

        The body's error is re-raised after the abort.
        """
        trans = self._factory()  # kept here, not looked up: run never depends on the context
        yield from self._begin_flow(trans)
        try:
            result = yield Call(body, trans)
            if inspect.isasyncgen(result):
                raise DtmInvalidInput(
                    f"{self._kind} body {_name_of(body)} returned an async generator, whose code never "
                    "runs: use async def (await, return) instead", gid=trans.gid,
                )
        except GeneratorExit:
            raise  # the async driver's coroutine is being closed: nothing more may be awaited
        except _BodyExit as body_exit:
            yield from trans._finish_flow(body_exit.exc)
            raise body_exit.exc from None
        except BaseException as exc:
            yield from trans._finish_flow(exc)
            raise
        yield from trans._finish_flow(None)
        return result

    def run(self, callback: Callable[[T2], Any]) -> Any:
        """Run ``callback(trans)`` in a new global transaction (the driver's; see :meth:`GlobalTransaction.run`)."""
        raise NotImplementedError


class GlobalTransaction(RunnerCore[T2]):
    """A TCC or XA global transaction to run: as a context manager, a decorator, or via :meth:`run`.

    * ``with gt as trans:`` prepares and yields the transaction; a clean exit submits, an exception
      aborts with ``rollback_reason`` and propagates unchanged.
    * ``@gt`` decorates ``func(trans, *args, **kwargs)``; each call runs a new transaction (a new gid
      unless a fixed gid was given).
    * ``gt.run(callback)`` runs ``callback(trans)`` in a new transaction and returns its result.

    The decorator and :meth:`run` always finish the transaction they started. One object may also
    be entered with ``with`` by several threads or asyncio tasks at once, and nested: each exit
    finishes the innermost transaction entered in its own context (:mod:`contextvars`). An exit
    that runs in another copy of the context than its enter (a sync FastAPI ``yield`` dependency)
    finishes the transaction when it is the only one open on this object; an entry the exit's
    context inherited from an enclosing ``with`` (a copy of its context, not the context itself)
    is never taken for its own. When several are open, it cannot tell which one is its own and
    raises DtmInvalidInput without finishing any: they stay prepared and DTM cancels them after
    ``timeout_to_fail``. Create the runner inside such a dependency
    (``with tcc_global_transaction(...) as tcc: yield tcc``) and this never happens. An exit
    without an enter of its own (a double exit, ``ExitStack.push``) is a bug this cannot detect
    when one transaction is open: it finishes that one.

    The body must be synchronous: ``async def`` functions are refused with DtmInvalidInput
    before anything is sent, since the transaction would be submitted before the coroutine runs.
    Use :mod:`dtmcli.asyncio` (``async with``) for coroutines. Inside a running event loop (an
    ``async def`` handler) this blocking API stalls the loop for every round trip, and a branch
    served by that same loop hangs until the timeout: use :mod:`dtmcli.asyncio` there too.

    A prepare or submit interrupted before DTM answered (Ctrl-C; in asyncio, a cancellation) is
    followed by an abort, since DTM may hold the transaction prepared with nobody to finish it.
    """

    def _refuse_async(self, func: Any, *, returned: bool = False) -> None:
        if returned or _is_async(func):
            what = "a callback that returns an awaitable" if returned else "the coroutine function"
            raise DtmInvalidInput(
                f"{self._kind} cannot run {what} {_name_of(func)}: the transaction would be finished before "
                "the coroutine runs. Use a plain def, or the async form from dtmcli.asyncio"
            )

    def __enter__(self) -> T2:
        trans = self._factory()
        run(self._begin_flow(trans))
        return self._entered_now(trans)

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        run(self._take_entered()._finish_flow(exc))

    def _checked(self, callback: Callable[[T2], R]) -> Callable[[T2], R]:
        def body(trans: T2) -> R:
            try:
                result = callback(trans)
            except GeneratorExit as exc:  # the body's own: it aborts, as any error does
                raise _BodyExit(exc) from None
            if discard_awaitable(result):
                self._refuse_async(callback, returned=True)  # raised before the submit: aborts
            return result

        body.__qualname__ = _name_of(callback)
        return body

    def run(self, callback: Callable[[T2], R]) -> R:
        """Run ``callback(trans)`` in a new global transaction; return what it returns."""
        self._refuse_async(callback)
        result: R = run(self._run_flow(self._checked(callback)))
        return result

    def __call__(self, func: Callable[..., R]) -> Callable[..., R]:
        """Decorate ``func(trans, ...)`` so each call runs in its own global transaction."""
        self._refuse_async(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            return self.run(lambda trans: func(trans, *args, **kwargs))

        return wrapper


Runner = TypeVar("Runner", bound=RunnerCore[Any])


def global_transaction(
    runner: Callable[[Callable[[], T2], str], Runner],
    trans_type: Callable[..., T2],
    kind: str,
    dtm: Any,
    gid: Optional[str],
    callback: Optional[Callable[[T2], Any]],
    options: dict[str, Any],
) -> Any:
    """``tcc_global_transaction`` / ``xa_global_transaction`` of either flavour: check the arguments
    now (nothing is sent), then return the runner, or run ``callback`` with it."""
    trans_type(dtm, gid, **options)  # validate now
    gt = runner(lambda: trans_type(dtm, gid, **options), kind)
    if callback is None:
        return gt
    return gt.run(callback)


def refuse_sync(kind: str, func: Any) -> None:
    """The async runners take coroutine functions: refuse anything else before anything is sent.

    An async generator function is refused (its code would never run). A lambda passes: it cannot
    be ``async``, and ``lambda t: work(t)`` returning a coroutine is fine; the driver checks that
    what it returns is awaitable, before the submit.
    """
    if _is_async_gen(func):
        raise DtmInvalidInput(
            f"{kind} from dtmcli.asyncio cannot run the async generator function {_name_of(func)}: its code "
            "would never run. Make it async def (await, return)"
        )
    if not _is_async(func) and not _is_lambda(func):
        raise DtmInvalidInput(
            f"{kind} from dtmcli.asyncio runs an async def function, not {_name_of(func)}: a plain def "
            "body would run without awaiting its branch calls. Make it async def, or use the dtmcli form"
        )


def refuse_not_awaitable(kind: str, func: Any, result: Any) -> None:
    """The async runners' check of what a body returned (a lambda may return anything): refuse
    anything that is not awaitable, before the submit (the transaction is aborted)."""
    if not inspect.isawaitable(result):
        raise DtmInvalidInput(
            f"{kind} from dtmcli.asyncio: {_name_of(func)} returned {type(result).__name__}, not an awaitable; "
            "the transaction is aborted. Use an async def body (or a lambda returning a coroutine)"
        )

