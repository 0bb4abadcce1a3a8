"""2-phase message: local work plus a list of actions DTM will run until they succeed."""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, ClassVar, Optional, TypeVar

from ._barrier.sql_conn import refuse_open_transaction
from ._consts import DEFAULT_DTM, MSG, MSG_BRANCH_ID, OP_MSG
from ._flow import Call, Flow, discard_awaitable, is_async_function
from ._protocol import encode_custom_data, encode_payload
from ._steps import StepTrans
from ._trans import NEW, PREPARED_STATE, TransBase
from ._validate import check_non_negative_int
from .barrier import BranchBarrier
from .client import DtmLike
from .errors import DtmFailure, DtmInvalidInput

__all__ = ["Msg", "MsgCore"]

logger = logging.getLogger("dtmcli")

R = TypeVar("R")
M = TypeVar("M", bound="MsgCore")

_TOPIC_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


class _NotRun(DtmInvalidInput):
    """The local work of a do-and-submit did not run (it was a coroutine given to the sync driver)."""


class MsgCore(StepTrans):
    """A message's actions, options and every decision of its calls, as flows (shared by sync and async).

    Simple message: ``Msg(dtm, gid).add(url, payload).submit()``. Transactional message:
    ``prepare(query_prepared)``, local work, ``submit()`` — or all three with
    :meth:`prepare_and_submit`, which decides exactly as the Go client's ``DoAndSubmit``.
    Actions and options are fixed once it is prepared (DTM keeps the prepared ones); it is
    submitted or aborted once.
    """

    trans_type = MSG
    _submit_from: ClassVar[tuple[str, ...]] = (NEW, PREPARED_STATE)
    _abort_from: ClassVar[tuple[str, ...]] = (NEW, PREPARED_STATE)  # abort also settles a prepare that timed out

    def __init__(self, dtm: Any = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)
        self._query_prepared = ""
        self._delay: Optional[int] = None

    @property
    def query_prepared(self) -> str:
        """The URL DTM asks about the local transaction of a prepared message (set by :meth:`prepare`)."""
        return self._query_prepared

    @query_prepared.setter
    def query_prepared(self, url: str) -> None:
        url = self._check_url(url, "query_prepared URL", allow_empty=True)
        with self._lock:
            self._check_mutable("change query_prepared")
            self._query_prepared = url

    @property
    def delay(self) -> Optional[int]:
        """Seconds DTM waits after submit before the first action (``None``: no delay)."""
        return self._delay

    @delay.setter
    def delay(self, seconds: Optional[int]) -> None:
        delay = None if seconds is None else check_non_negative_int(seconds, "delay")
        with self._lock:
            self._check_mutable("change the delay")
            self._delay = delay

    def _add_step(self: M, action: str, payload: Any) -> M:
        self._append_step({"action": action}, encode_payload(payload, gid=self.gid))
        return self

    def add(self: M, action: str, payload: Any) -> M:
        """Append an action DTM calls (POST with ``payload``, or GET when it is ``""``)."""
        self._check_url(action, "msg action URL")
        return self._add_step(action, payload)

    def add_topic(self: M, topic: str, payload: Any) -> M:
        """Append a step delivered to every URL subscribed to ``topic`` on DTM."""
        if not isinstance(topic, str) or not _TOPIC_RE.fullmatch(topic):
            raise DtmInvalidInput(f"topic {topic!r} must be 1-128 letters, digits or _.:-", gid=self.gid)
        return self._add_step(f"topic://{topic}", payload)

    def set_delay(self: M, seconds: int) -> M:
        """Let DTM wait this many seconds after submit before the first action."""
        self.delay = seconds
        return self

    def enable_concurrent(self: M) -> M:
        """Run the actions in parallel instead of one after another."""
        self.concurrent = True
        return self

    set_concurrent = enable_concurrent

    def _extra_body(self) -> dict[str, Any]:
        body = super()._extra_body()
        if self._query_prepared:
            body["query_prepared"] = self._query_prepared
        if self._delay:
            body["custom_data"] = encode_custom_data({"delay": self._delay}, gid=self.gid)
        return body

    def build_body(self) -> dict[str, Any]:
        """The prepare/submit/abort body; raises DtmInvalidInput for a message without actions."""
        if not self._steps:
            raise DtmInvalidInput("a msg needs at least one action", gid=self.gid)
        return super().build_body()

    def _prepare_op(self, query_prepared: str) -> Flow[None]:
        self._check_url(query_prepared, "query_prepared URL")

        def check() -> None:
            if self._query_prepared and query_prepared != self._query_prepared:
                self._check_mutable("change query_prepared")

        def send() -> Flow[None]:
            self._query_prepared = query_prepared
            return self._prepare_flow()

        return self._run_flow("prepare", send, check)

    def _query_prepared_flow(self, query_prepared: Optional[str] = None) -> Flow[None]:
        url = query_prepared or self.query_prepared
        self._check_url(url, "query_prepared URL")
        yield from self._request_branch("GET", url, MSG_BRANCH_ID, OP_MSG)

    def _msg_barrier(self) -> Any:
        """The barrier handed to the local work of :meth:`prepare_and_submit` (sync or async)."""
        raise NotImplementedError

    def _do_and_submit_flow(self, query_prepared: str, busi_call: Callable[[Any], Any]) -> Flow[Any]:
        """Go's ``DoAndSubmit`` (protocol.md §8): prepare, the local work, then submit or abort."""
        barrier = self._msg_barrier()
        yield from self._prepare_op(query_prepared)
        try:
            result = yield Call(busi_call, barrier)
            if discard_awaitable(result):  # the sync driver got a coroutine: the local work never ran
                raise _NotRun(
                    f"msg {self.gid}: the local work returned an awaitable, so it did not run; aborted. "
                    "Use dtmcli.asyncio.Msg for async local work",
                    gid=self.gid,
                )
        except (DtmFailure, _NotRun):
            yield from self._after_busi_error(self._run_flow("abort", self._abort_flow))
            raise
        except Exception as busi_error:
            try:
                yield from self._query_prepared_flow()
            except DtmFailure:
                yield from self._after_busi_error(self._run_flow("abort", self._abort_flow))
            except Exception as query_error:
                logger.warning(
                    "msg %s: business call failed (%s) and query_prepared did not answer (%s); "
                    "DTM will ask query_prepared after timeout_to_fail",
                    self.gid,
                    busi_error,
                    query_error,
                )
            else:
                yield from self._after_busi_error(self._run_flow("submit", self._submit_flow))
            raise
        yield from self._run_flow("submit", self._submit_flow)
        return result

    def _after_busi_error(self, call: Flow[None]) -> Flow[None]:
        # The business error is what the caller must see; a failed abort/submit here is logged,
        # and DTM settles the prepared message through query_prepared after timeout_to_fail.
        try:
            yield from call
        except Exception as exc:
            logger.error("msg %s: call to DTM after a business error failed: %s", self.gid, exc)


class Msg(MsgCore, TransBase):
    """A 2-phase message.

    Simple message: ``Msg(dtm, gid).add(url, payload).submit()``. Transactional message:
    ``prepare(query_prepared)``, local work, ``submit()`` — or all three with
    :meth:`prepare_and_submit`, which decides exactly as the Go client's ``DoAndSubmit``.
    Actions and options are fixed once it is prepared (DTM keeps the prepared ones); it is
    submitted or aborted once.
    """

    def __init__(self, dtm: DtmLike = DEFAULT_DTM, gid: Optional[str] = None, **options: Any) -> None:
        super().__init__(dtm, gid, **options)

    def prepare(self, query_prepared: str) -> None:
        """Create the message as ``prepared``; DTM asks ``query_prepared`` if it is never submitted.

        A failed prepare may be retried (DTM's prepare is idempotent).
        """
        flow = self._prepare_op(query_prepared)
        with self._lock:
            self._drive(flow)

    def submit(self, *, recover: bool = False) -> None:
        """Submit the message (prepared or not); DTM then runs the actions until they succeed.

        Allowed once: a second submit raises DtmInvalidInput unless the first one certainly
        never left (DtmConnectError).
        """
        self._run("submit", lambda: self._submit_flow(recover))

    def abort(self, reason: Optional[str] = None) -> None:
        """Abort a prepared message: it becomes ``failed`` and no action runs."""
        self._run("abort", lambda: self._abort_flow(reason))

    def query_prepared_status(self, query_prepared: Optional[str] = None) -> None:
        """Ask the ``query_prepared`` URL what happened to the local transaction, as DTM would.

        Returns on success; raises DtmFailure (roll back), DtmOngoing, or an error.
        """
        self._drive(self._query_prepared_flow(query_prepared))

    def _msg_barrier(self) -> BranchBarrier:
        return BranchBarrier.for_msg(self.gid)

    def prepare_and_submit(self, query_prepared: str, busi_call: Callable[[BranchBarrier], R]) -> R:
        """Prepare, run ``busi_call(barrier)``, then submit or abort (Go's ``DoAndSubmit``).

        The decision follows protocol.md §8: business success → submit; business DtmFailure →
        abort; any other business error → ask ``query_prepared`` and abort on FAILURE, submit on
        success, or leave the message for DTM to query when the answer is unknown. The business
        error is always re-raised.
        """
        if is_async_function(busi_call):
            raise DtmInvalidInput(
                f"msg {self.gid}: {getattr(busi_call, '__qualname__', busi_call)!r} is an async function; the "
                "sync Msg cannot run it (nothing was sent). Use dtmcli.asyncio.Msg",
                gid=self.gid,
            )
        result: R = self._drive(self._do_and_submit_flow(query_prepared, busi_call))
        return result

    do_and_submit = prepare_and_submit

    def do_and_submit_db(self, query_prepared: str, conn: Any, busi_call: Callable[[Any], R]) -> Optional[R]:
        """:meth:`prepare_and_submit` with the local work in a SQL barrier transaction (Go's ``DoAndSubmitDB``).

        ``busi_call(conn)`` runs in one local transaction that also inserts the barrier row
        (gid, 00, msg, 01), so :func:`dtmcli.barrier.query_prepared` can tell DTM whether it
        committed. ``conn`` is anything :meth:`BranchBarrier.call_with_db` accepts; the transaction must be
        the barrier's own, since the submit follows at once: a SQLAlchemy Connection/Session with a
        transaction open, or a Django connection inside ``transaction.atomic()``, is refused
        (DtmInvalidInput); before the prepare when ``conn`` is such an object itself.
        """
        refuse_open_transaction(conn)  # before the prepare: nothing sent for a source that would be refused
        return self.prepare_and_submit(
            query_prepared, lambda barrier: barrier.call_with_db(conn, busi_call, join_transaction=False)
        )
