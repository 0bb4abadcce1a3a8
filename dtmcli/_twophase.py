"""What TCC and XA global transactions share: client-driven branches, and the prepare → body →
submit / abort runner behind ``tcc_global_transaction`` and ``xa_global_transaction``."""

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
from ._ids import BranchIdGenerator
from ._protocol import Response, go_trim
from ._trans import NESTED, NEW, PREPARED_STATE, TransBase
from .client import DtmLike
from .errors import DtmError, DtmInvalidInput, DtmServerError

__all__ = ["BranchReply", "GlobalTransaction", "TwoPhaseTrans", "rollback_reason_of"]

logger = logging.getLogger("dtmcli")

R = TypeVar("R")
T2 = TypeVar("T2", bound="TwoPhaseTrans")


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


class TwoPhaseTrans(TransBase):
    """Base of :class:`~dtmcli.Tcc` and :class:`~dtmcli.Xa`: branches the client calls itself.

    Branch ids come from a thread-safe generator (``01``, ``02``, ... or ``<parent>01`` when
    nested), so branches may be called from several threads at once. Once a branch call has
    failed after it was sent, the transaction can only be aborted. Lifecycle: ``new`` →
    ``prepare()`` → ``prepared`` → ``submit()``/``abort()`` (see :class:`~dtmcli._trans.TransBase`).
    """

    _submit_from: ClassVar[tuple[str, ...]] = (PREPARED_STATE,)
    _abort_from: ClassVar[tuple[str, ...]] = (PREPARED_STATE,)

    def __init__(self, dtm: DtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)
        self._ids = BranchIdGenerator()
        self._branch_error: Optional[BaseException] = None

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
        """The first error of a branch call that was sent; it dooms the transaction to abort."""
        return self._branch_error

    # -- lifecycle -------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the global transaction on DTM as ``prepared``, with its options (stored only now)."""
        self._run("prepare", self._call_prepare)

    def submit(self) -> None:
        """Submit: DTM confirms/commits every registered branch.

        With ``wait_result`` an unfinished transaction raises DtmInProgress and a failed one
        DtmFailure (checked with ``/query``). A second submit is refused: DTM marks a resubmitted
        TCC/XA succeeded without confirming it (protocol.md §2).
        """
        self._run("submit", self._call_submit)

    def abort(self, reason: Optional[str] = None) -> None:
        """Abort: DTM cancels/rolls back every registered branch. ``reason`` is stored (clipped)."""
        self._run("abort", lambda: self._call_abort(reason))

    def _check_can_call(self) -> None:
        state = self._state
        if state == NEW:
            raise DtmInvalidInput(f"prepare the {self.trans_type} before calling branches", gid=self.gid)
        if state not in (PREPARED_STATE, NESTED):
            raise DtmInvalidInput(f"the {self.trans_type} is already {state}", gid=self.gid)

    def _record(self, exc: BaseException) -> None:
        with self._lock:
            if self._branch_error is None:
                self._branch_error = exc

    def _finish(self, exc: Optional[BaseException]) -> None:
        """Submit after a clean body; abort after an error (or an earlier failed branch call).

        The body's own exception is left to propagate; a failed abort is logged, never raised over it.
        """
        cause = exc if exc is not None else self._branch_error
        if cause is None:
            self.submit()
            return
        try:
            self.abort(rollback_reason_of(cause))
        except Exception as abort_exc:
            logger.error("%s %s: abort after %r failed: %s", self.trans_type, self.gid, cause, abort_exc)
        if exc is None:
            # The body caught a branch error and carried on: the transaction is aborted, say so.
            raise cause

    # -- branch calls ----------------------------------------------------------------------

    def _call_branch(
        self, url: str, body: str, branch_id: str, op: str, phase2_url: Optional[str] = None
    ) -> BranchReply:
        """POST a client-originated branch call and wrap its successful answer."""
        resp = self._request_branch("POST", url, branch_id, op, body=body.encode(), phase2_url=phase2_url)
        return BranchReply(resp.status, resp.content, branch_id=branch_id)


# The global transactions entered (``with``) in the current thread or asyncio task, innermost last.
# A ContextVar, not threading.local: asyncio tasks share a thread but each has its own context. It only
# chooses among the transactions a runner has entered (GlobalTransaction._entered), which are the truth:
# a framework may run __enter__ and __exit__ in two different copies of one context (FastAPI runs each
# step of a sync ``yield`` dependency through run_in_threadpool), so an entry set here can be lost.
def _same_context(token: Token[Any]) -> bool:
    """True when the current context is the very one ``token`` was set in (a copy of it is not)."""
    try:
        _ACTIVE.reset(token)
    except (ValueError, RuntimeError):
        return False
    return True


_ACTIVE: ContextVar[tuple[tuple[GlobalTransaction[Any], TwoPhaseTrans], ...]] = ContextVar(
    "dtmcli_global_transactions", default=()
)


def _is_async(func: Any) -> bool:
    """True for an ``async def`` (or async generator) function, also behind partial or ``__call__``."""
    candidates = (func, func.__call__) if callable(func) else (func,)  # an object's async __call__ counts too
    return any(inspect.iscoroutinefunction(f) or inspect.isasyncgenfunction(f) for f in candidates)


class GlobalTransaction(Generic[T2]):
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
    """

    def __init__(self, factory: Callable[[], T2], kind: str = "global transaction") -> None:
        self._factory = factory
        self._kind = kind
        self._lock = threading.Lock()
        self._entered: list[TwoPhaseTrans] = []  # entered with ``with`` and not exited yet
        self._tokens: dict[int, Token[Any]] = {}  # id(trans) -> the _ACTIVE token of its enter

    def _refuse_async(self, func: Any, *, returned: bool = False) -> None:
        if returned or _is_async(func):
            name = getattr(func, "__qualname__", None) or type(func).__name__
            what = "a callback that returns an awaitable" if returned else "the coroutine function"
            raise DtmInvalidInput(
                f"{self._kind} cannot run {what} {name}: the transaction would be finished before the "
                "coroutine runs. Use a plain def (the async form comes with dtmcli.asyncio)"
            )

    def __enter__(self) -> T2:
        trans = self._factory()
        trans.prepare()
        token = _ACTIVE.set((*_ACTIVE.get(), (self, trans)))
        with self._lock:
            self._entered.append(trans)
            self._tokens[id(trans)] = token
        return trans

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self._take_entered()._finish(exc)

    def _take_entered(self) -> TwoPhaseTrans:
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

    def run(self, callback: Callable[[T2], R]) -> R:
        """Run ``callback(trans)`` in a new global transaction; return what it returns."""
        self._refuse_async(callback)
        trans = self._factory()  # kept here, not looked up: run never depends on the context
        trans.prepare()
        try:
            result = callback(trans)
            if inspect.isawaitable(result):
                close = getattr(result, "close", None)
                if close is not None:
                    close()  # it will never be awaited: no "coroutine was never awaited" warning
                self._refuse_async(callback, returned=True)  # raised before the submit: aborts
        except BaseException as exc:
            trans._finish(exc)
            raise
        trans._finish(None)
        return result

    def __call__(self, func: Callable[..., R]) -> Callable[..., R]:
        """Decorate ``func(trans, ...)`` so each call runs in its own global transaction."""
        self._refuse_async(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            return self.run(lambda trans: func(trans, *args, **kwargs))

        return wrapper
