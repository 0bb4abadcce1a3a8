"""What TCC and XA global transactions share: client-driven branches, and the prepare → body →
submit / abort runner behind ``tcc_global_transaction`` and ``xa_global_transaction``."""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Generic, Optional, TypeVar

from ._consts import DEFAULT_DTM
from ._ids import BranchIdGenerator
from ._protocol import Response
from ._trans import TransBase
from .client import DtmLike
from .errors import DtmError, DtmInvalidInput, DtmServerError

__all__ = ["BranchReply", "GlobalTransaction", "TwoPhaseTrans", "rollback_reason_of"]

logger = logging.getLogger("dtmcli")

R = TypeVar("R")
T2 = TypeVar("T2", bound="TwoPhaseTrans")

_NEW, _PREPARED, _NESTED, _DONE = "new", "prepared", "nested", "done"


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
        return exc.body
    if isinstance(exc, DtmError):
        return exc.message
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class TwoPhaseTrans(TransBase):
    """Base of :class:`~dtmcli.Tcc` and :class:`~dtmcli.Xa`: branches the client calls itself.

    Branch ids come from a thread-safe generator (``01``, ``02``, ... or ``<parent>01`` when
    nested), so branches may be called from several threads at once. Once a branch call has
    failed after it was sent, the transaction can only be aborted.
    """

    def __init__(self, dtm: DtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)
        self._ids = BranchIdGenerator()
        self._state = _NEW
        self._lock = threading.Lock()
        self._branch_error: Optional[BaseException] = None

    def _nest_under(self, parent_branch_id: str) -> None:
        """Make this a nested transaction object: branches ``<parent>01``..., no prepare/submit/abort."""
        self._ids = BranchIdGenerator(parent_branch_id)
        self._state = _NESTED

    @property
    def nested(self) -> bool:
        """True for a transaction object built inside a branch handler (see ``Tcc.from_request``)."""
        return self._state == _NESTED

    @property
    def branch_error(self) -> Optional[BaseException]:
        """The first error of a branch call that was sent; it dooms the transaction to abort."""
        return self._branch_error

    # -- lifecycle -------------------------------------------------------------------------

    def _transition(self, allowed: tuple[str, ...], new: str, what: str) -> None:
        with self._lock:
            if self._state not in allowed:
                if self._state == _NESTED:
                    raise DtmInvalidInput(
                        f"cannot {what} a nested {self.trans_type}: it belongs to its parent's global transaction",
                        gid=self.gid,
                    )
                raise DtmInvalidInput(f"cannot {what} a {self.trans_type} that is {self._state}", gid=self.gid)
            self._state = new

    def prepare(self) -> None:
        """Create the global transaction on DTM as ``prepared``, with its options (stored only now)."""
        self._transition((_NEW,), _PREPARED, "prepare")
        try:
            self._call_prepare()
        except BaseException:
            with self._lock:
                self._state = _NEW
            raise

    def submit(self) -> None:
        """Submit: DTM confirms/commits every registered branch.

        With ``wait_result`` an unfinished transaction raises DtmInProgress and a failed one
        DtmFailure (checked with ``/query``). Never resubmit a submitted TCC/XA (protocol.md §2).
        """
        self._transition((_PREPARED,), _DONE, "submit")
        self._call_submit()

    def abort(self, reason: Optional[str] = None) -> None:
        """Abort: DTM cancels/rolls back every registered branch. ``reason`` is stored (clipped)."""
        self._transition((_PREPARED,), _DONE, "abort")
        self._call_abort(reason)

    def _check_can_call(self) -> None:
        with self._lock:
            state = self._state
        if state == _NEW:
            raise DtmInvalidInput(f"prepare the {self.trans_type} before calling branches", gid=self.gid)
        if state == _DONE:
            raise DtmInvalidInput(f"the {self.trans_type} is already submitted or aborted", gid=self.gid)

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


class GlobalTransaction(Generic[T2]):
    """A TCC or XA global transaction to run: as a context manager, a decorator, or via :meth:`run`.

    * ``with gt as trans:`` prepares and yields the transaction; a clean exit submits, an exception
      aborts with ``rollback_reason`` and propagates unchanged.
    * ``@gt`` decorates ``func(trans, *args, **kwargs)``; each call runs a new transaction (a new gid
      unless a fixed gid was given).
    * ``gt.run(callback)`` runs ``callback(trans)`` in a new transaction and returns its result.
    """

    def __init__(self, factory: Callable[[], T2]) -> None:
        self._factory = factory
        self._local = threading.local()

    def _stack(self) -> list[T2]:
        stack: Optional[list[T2]] = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    def __enter__(self) -> T2:
        trans = self._factory()
        trans.prepare()
        self._stack().append(trans)
        return trans

    def __exit__(
        self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self._stack().pop()._finish(exc)

    def run(self, callback: Callable[[T2], R]) -> R:
        """Run ``callback(trans)`` in a new global transaction; return what it returns."""
        with self as trans:
            return callback(trans)

    def __call__(self, func: Callable[..., R]) -> Callable[..., R]:
        """Decorate ``func(trans, ...)`` so each call runs in its own global transaction."""

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> R:
            return self.run(lambda trans: func(trans, *args, **kwargs))

        return wrapper
