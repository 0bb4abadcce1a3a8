"""Workflow mode (protocol.md §12): the pure core behind :mod:`dtmcli.workflow` and :mod:`dtmcli.asyncio.workflow`.

A workflow is ordinary code whose steps are recorded as branches with DTM. Every decision lives here
as a flow (:mod:`dtmcli._flow`): ``prepareWorkflow`` and the replay of recorded progress, the
replay-or-execute of each step and its ``registerBranch`` (always with ``"sync":"1"``, so DTM stores
the progress on every store), phase 2 (``on_commit``/``on_rollback`` in reverse registration order)
and the final ``submit`` with ``req_extra``. The sync and async modules only drive these flows.

Rules every execution keeps (the review of issue 12):

- A gid DTM still holds as prepared must be a workflow of this name and input (``custom_data``);
  anything else is refused before a step runs.
- A gid DTM holds finished answers its stored outcome only to the same workflow and input.
- One execution per gid at a time in a process, whatever the registry (:meth:`Registry.running`);
  a second one raises DtmOngoing. When DTM refuses a record or the submit because another process
  finished the gid, this execution is dead (no later step or callback runs) and the other's outcome
  is returned, unless this execution ran phase-2 callbacks of the other phase: WorkflowConflict.
- A failed step raises the same DtmFailure fresh and replayed: the recorded text plus `` FAILURE``.
- HTTP steps are classified by status code only: 409 FAILURE, 425 ONGOING, 2xx success.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json as _json
import logging
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, TypeVar, Union, overload

from ._consts import (
    FAILED,
    MAX_CHILDREN,
    OP_ACTION,
    OP_COMMIT,
    OP_ROLLBACK,
    PREPARED,
    SUCCEED,
    WORKFLOW,
)
from ._flow import Call, Flow, Request, discard_awaitable
from ._options import TransOptions
from ._protocol import Response, dumps, encode_custom_data, parse_json_object, with_failure
from ._trans import clip_reason
from ._validate import check_gid, check_http_url
from .client import ClientBase
from .errors import (
    DtmError,
    DtmFailure,
    DtmInvalidInput,
    DtmOngoing,
    DtmServerError,
    StepFailure,
    WorkflowConflict,
    WorkflowPhase2Error,
)

__all__ = [
    "OP_BUSINESS",
    "Registry",
    "StepFailure",
    "StepResponse",
    "WorkflowConflict",
    "WorkflowCore",
    "WorkflowEntry",
    "WorkflowPhase2Error",
    "check_input",
    "check_name",
    "query_name_gid",
]

logger = logging.getLogger("dtmcli")

OP_BUSINESS = "business"
"""The op of the progress record :meth:`do_xa` writes before its XA prepare (protocol.md §12 DoXa)."""

MAX_RESULT_LEN = 1024
"""DTM's SQL stores keep the base64 workflow result in a varchar(1024) column."""

MAX_STEP_DATA = 65535
"""Bytes of a recorded step result DTM's MySQL store keeps (``trans_branch_op.bin_data`` is a BLOB)."""

_NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,45}")
_RESERVED_NAMES = frozenset({OP_ACTION, OP_COMMIT, OP_ROLLBACK, OP_BUSINESS})
_WORKFLOW_OPTIONS = ("timeout_to_fail", "retry_interval", "request_timeout", "branch_headers")
_BODY_IN_ERRORS = 512

_FAILURE_CLIPPED = " [... {} bytes in all; clipped to fit DTM's store]"

# One set for every registry (sync and asyncio): a gid runs once at a time in this process.
_RUNNING: set[str] = set()
_RUNNING_LOCK = threading.Lock()

W = TypeVar("W", bound="WorkflowCore")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class StepResponse:
    """The answer of a recorded HTTP step (:meth:`Workflow.request`); a replayed step answers the same.

    Only successful (2xx) answers come back (a FAILURE raises DtmFailure, anything else its error).
    :attr:`status_code` is always 200, also for another 2xx: a replay knows only the recorded body.
    """

    status_code: int
    content: bytes

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (undecodable bytes replaced)."""
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON (a ValueError when it is not JSON)."""
        import json

        return json.loads(self.content)


@dataclass
class _StepResult:
    """Go's ``stepResult``: ``status`` is succeed, failed, or "" (not recorded, ``error`` is raised)."""

    status: str
    data: bytes
    error: Optional[BaseException] = None


class _Phase2Item(NamedTuple):
    branch_id: str
    fn: Callable[[Any], Any]


def check_name(name: Any) -> str:
    """Return a workflow name DTM can carry as the resume call's ``op`` and Go encodes as we do."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise DtmInvalidInput(
            f"a workflow name must be 1-45 letters, digits or _.:- (it is the op of DTM's resume call), not {name!r}"
        )
    if name in _RESERVED_NAMES:
        raise DtmInvalidInput(f"{name!r} is a branch op and cannot name a workflow")
    return name


def check_input(data: Any, *, gid: Optional[str] = None) -> bytes:
    """Return the workflow input as bytes; anything but bytes-like is refused."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    hint = " (encode it: data.encode())" if isinstance(data, str) else ""
    raise DtmInvalidInput(f"workflow input must be bytes, not {type(data).__name__}{hint}", gid=gid)


def _transaction(answer: Mapping[str, Any]) -> dict[str, Any]:
    trans = answer.get("transaction")
    return trans if isinstance(trans, dict) else {}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str, gid: str) -> bytes:
    if not text:
        return b""
    try:
        return base64.b64decode(str(text), validate=True)
    except (binascii.Error, ValueError):
        raise DtmServerError(f"prepareWorkflow: {what} is not base64: {str(text)[:80]!r}", status=200,
                             body=str(text), gid=gid) from None


def _record_text(data: bytes, gid: str, branch_id: str, op: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DtmInvalidInput(
            "a workflow step's result must be UTF-8 text: DTM stores registerBranch data as a JSON string "
            "(base64-encode binary results); the step was not recorded", gid=gid, branch_id=branch_id, op=op
        ) from None
    if len(data) > MAX_STEP_DATA:
        raise DtmInvalidInput(
            f"a workflow step's result is {len(data)} bytes; DTM's MySQL store keeps {MAX_STEP_DATA} "
            "(trans_branch_op.bin_data is a BLOB). The step was not recorded: the workflow stays prepared and "
            "the step runs again on every resume. Return less (store big results yourself)",
            gid=gid, branch_id=branch_id, op=op,
        )
    return text


def _failure_data(data: bytes) -> bytes:
    """What a failed step records: its data as UTF-8 text (undecodable bytes replaced), clipped with a
    marker to the 65,535 bytes DTM's MySQL store keeps. Failure data is a message; it must be recorded
    so that the rollback can go on (a remote service's error page can be anything)."""
    raw = data.decode("utf-8", "replace").encode("utf-8")
    if len(raw) <= MAX_STEP_DATA:
        return raw
    marker = _FAILURE_CLIPPED.format(len(raw)).encode("utf-8")
    return raw[: MAX_STEP_DATA - len(marker)].decode("utf-8", "ignore").encode("utf-8") + marker


def _failure_error(data: bytes, gid: str, branch_id: str, op: str) -> DtmFailure:
    """The DtmFailure a failed step raises, fresh or replayed: the recorded text plus `` FAILURE``."""
    return DtmFailure(with_failure(data.decode("utf-8", "replace")), gid=gid, branch_id=branch_id, op=op)


def _custom_matches(custom: Any, name: str, data: bytes) -> bool:
    """Whether a stored ``custom_data`` names workflow ``name`` with input ``data``."""
    try:
        stored = _json.loads(custom)
        stored_data = base64.b64decode(str(stored.get("data") or "").replace("\r", "").replace("\n", ""),
                                       validate=True)
    except (ValueError, TypeError, AttributeError, binascii.Error):
        return False
    return stored.get("name") == name and stored_data == data


def _as_bytes(value: Any, what: str, gid: str, blocking: bool) -> bytes:
    if value is None:
        return b""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if blocking and discard_awaitable(value):
        raise DtmInvalidInput(
            f"{what} returned an awaitable, which the sync workflow cannot await; use dtmcli.asyncio.workflow",
            gid=gid,
        )
    raise DtmInvalidInput(f"{what} must return bytes or None, not {type(value).__name__}", gid=gid)


@dataclass(frozen=True)
class WorkflowEntry:
    """A registered workflow: its function and the options every execution starts with."""

    name: str
    fn: Callable[..., Any]
    options: TransOptions
    compensate_error_branch: bool = False


class Registry:
    """Registered workflows and the DTM address and resume URL they run with; thread-safe.

    ``as_client`` turns what :meth:`init_http` is given into the driver's client; ``blocking``
    registries (the sync module's) refuse ``async def`` workflow functions.
    """

    def __init__(self, as_client: Callable[[Any], ClientBase], *, blocking: bool) -> None:
        self._as_client = as_client
        self.blocking = blocking
        self._lock = threading.Lock()
        self._client: Optional[ClientBase] = None
        self._callback = ""
        self._entries: dict[str, WorkflowEntry] = {}
        self._running = _RUNNING  # shared by every registry (see running())

    @contextlib.contextmanager
    def running(self, gid: str) -> Iterator[None]:
        """Hold ``gid`` as running in this process for the block; DtmOngoing when it already is.

        The set is shared by every registry (sync and asyncio): one name registered in both still
        runs a gid once at a time.

        DTM resumes a prepared workflow ``retry_interval`` (else RetryInterval, 10 s by default) after
        prepareWorkflow and every RetryInterval after that, even while it still runs, so a slower
        workflow is called again in this process; the second call gets
        DtmOngoing (a resume view answers 425) and nothing runs. Released on every exit (also on
        cancellation). Other processes are not excluded: steps must be idempotent (the barrier).
        """
        with _RUNNING_LOCK:
            if gid in _RUNNING:
                raise DtmOngoing(f"workflow {gid} is already running in this process; try again later", gid=gid)
            _RUNNING.add(gid)
        try:
            yield
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(gid)

    def init_http(self, dtm: Any, callback_url: str) -> None:
        """Use DTM at ``dtm`` (a URL or a client) and give DTM ``callback_url`` to resume workflows."""
        callback = check_http_url(callback_url, "workflow callback URL")
        client = self._as_client(dtm)
        with self._lock:
            self._client, self._callback = client, callback

    def register(self, name: str, fn: Callable[..., Any], **options: Any) -> WorkflowEntry:
        """Register ``fn`` under ``name``; a name registered twice is refused (DtmInvalidInput)."""
        check_name(name)
        if not callable(fn):
            raise DtmInvalidInput(f"workflow {name!r}: {fn!r} is not callable")
        if self.blocking:
            from ._flow import is_async_function

            if is_async_function(fn):
                raise DtmInvalidInput(
                    f"workflow {name!r} is an async function; register it with dtmcli.asyncio.workflow"
                )
        compensate = options.pop("compensate_error_branch", False)
        if not isinstance(compensate, bool):
            raise DtmInvalidInput(f"compensate_error_branch must be a bool, not {compensate!r}")
        unknown = sorted(set(options) - set(_WORKFLOW_OPTIONS))
        if unknown:
            raise DtmInvalidInput(
                f"unknown workflow option(s) {', '.join(unknown)}; known: compensate_error_branch, "
                + ", ".join(_WORKFLOW_OPTIONS)
            )
        entry = WorkflowEntry(name, fn, TransOptions.from_mapping(options), compensate)
        with self._lock:
            if name in self._entries:
                raise DtmInvalidInput(f"a workflow named {name!r} is already registered")
            self._entries[name] = entry
        logger.debug("workflow %r registered", name)
        return entry

    @overload
    def decorate(self, name: str, fn: None = None, **options: Any) -> Callable[[F], F]: ...

    @overload
    def decorate(self, name: str, fn: F, **options: Any) -> F: ...

    def decorate(self, name: str, fn: Optional[F] = None, **options: Any) -> Any:
        """Register a workflow function under ``name``, as a decorator or as ``register(name, fn)``.

        Options: ``compensate_error_branch`` (also compensate a branch whose own step FAILED;
        default False), ``retry_interval`` (seconds after prepareWorkflow before DTM first resumes a
        prepared workflow; later calls come every server RetryInterval, 10 s by default, and DTM
        resumes a workflow that is still running: set it above the longest run), ``timeout_to_fail``
        (DTM never fails a workflow by itself; it only brings the first resume forward when below the
        server's RetryInterval), ``request_timeout``, ``branch_headers`` (headers DTM sends to the
        resume URL, also sent with each ``request``). A name registered twice raises DtmInvalidInput.
        """
        if fn is None:

            def decorator(func: F) -> F:
                self.register(name, func, **options)
                return func

            return decorator
        self.register(name, fn, **options)
        return fn

    def is_registered(self, name: str) -> bool:
        """Whether a workflow named ``name`` is registered."""
        return name in self

    def unregister(self, name: str) -> None:
        """Forget the workflow ``name`` (no error when it is not registered)."""
        with self._lock:
            self._entries.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def lookup(self, name: Any) -> tuple[WorkflowEntry, ClientBase, str]:
        """The entry of ``name`` with the client and callback URL, or DtmInvalidInput."""
        with self._lock:
            entry = self._entries.get(name) if isinstance(name, str) else None
            client, callback = self._client, self._callback
        if entry is None:
            raise DtmInvalidInput(f"no workflow named {name!r} is registered; register it at startup")
        if client is None:
            raise DtmInvalidInput("call workflow.init_http(dtm, callback_url) before executing a workflow")
        return entry, client, callback


def query_name_gid(query: Mapping[str, Any]) -> tuple[str, str]:
    """The workflow name (``op``) and ``gid`` of DTM's resume call, or DtmInvalidInput."""
    name, gid = query.get("op"), query.get("gid")
    if not name or not gid or not isinstance(name, str) or not isinstance(gid, str):
        raise DtmInvalidInput(f"a workflow resume query needs op and gid, got op={name!r} gid={gid!r}")
    return name, gid


class WorkflowCore:
    """One execution of a workflow: its progress, branches and callbacks, and every decision as a flow.

    Belongs to one execution (not thread-safe; steps run one after another). The sync
    :class:`dtmcli.workflow.Workflow` and the async :class:`dtmcli.asyncio.workflow.Workflow` add
    the calls that drive the flows.
    """

    _blocking = True

    def __init__(self, entry: WorkflowEntry, client: ClientBase, callback: str, gid: str, data: bytes) -> None:
        self._gid = check_gid(gid)
        self._data = check_input(data, gid=gid)
        self._name = entry.name
        self._entry = entry
        self._client = client
        self._callback = callback
        self.compensate_error_branch = entry.compensate_error_branch
        self.options = TransOptions.from_mapping({n: getattr(entry.options, n) for n in _WORKFLOW_OPTIONS})
        # Checked now, before anything is sent: DTM's SQL stores keep 1,024 characters of custom_data.
        self._custom_data = encode_custom_data({"data": _b64(self._data), "name": self._name}, gid=gid)
        self._progresses: dict[str, _StepResult] = {}
        self._count = 0
        self._branch = ""
        self._op = OP_ACTION
        self._action_added = self._commit_added = self._rollback_added = self._xa_added = False
        self._succeeded: list[_Phase2Item] = []
        self._failed: list[_Phase2Item] = []
        self._final: Optional[dict[str, Any]] = None  # the finished transaction, once DTM refused us for it
        self._refused: Optional[DtmError] = None  # DTM refused a record: this execution is dead
        self._phase2_ran: list[str] = []  # branches whose phase-2 callback this execution ran
        self._pending: set[Any] = set()  # async steps created and not awaited yet (see _check_awaited)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r}, gid={self._gid!r}, branch={self._branch!r})"

    @property
    def gid(self) -> str:
        """The global transaction id of this execution."""
        return self._gid

    @property
    def name(self) -> str:
        """The registered name of the workflow."""
        return self._name

    @property
    def data(self) -> bytes:
        """The workflow's input bytes."""
        return self._data

    @property
    def branch_id(self) -> str:
        """The current branch id (``01``, ``02``, ...; ``""`` before the first :meth:`new_branch`)."""
        return self._branch

    @property
    def op(self) -> str:
        """``action`` while the workflow function runs, ``commit``/``rollback`` during phase 2."""
        return self._op

    # -- building: branches and callbacks --------------------------------------------------

    def new_branch(self: W) -> W:
        """Start the next branch (``01``, ``02``, ...): its step, ``on_rollback`` and ``on_commit`` follow."""
        if self._op != OP_ACTION:
            raise DtmInvalidInput("new_branch() cannot be called in an on_commit/on_rollback callback", gid=self._gid)
        if self._count >= MAX_CHILDREN:
            raise DtmInvalidInput(f"a workflow has at most {MAX_CHILDREN} branches", gid=self._gid)
        self._count += 1
        self._branch = f"{self._count:02d}"
        self._action_added = self._commit_added = self._rollback_added = self._xa_added = False
        return self

    def _current_branch(self, what: str) -> str:
        if not self._branch:
            raise DtmInvalidInput(f"call new_branch() before {what}", gid=self._gid)
        if self._op != OP_ACTION:
            raise DtmInvalidInput(f"{what} cannot be called in an on_commit/on_rollback callback", gid=self._gid)
        return self._branch

    def _no_xa(self, what: str) -> str:
        branch = self._current_branch(what)
        if self._xa_added:
            raise DtmInvalidInput(
                f"branch {branch} is a do_xa() step, whose phase 2 commits or rolls back the XA transaction; "
                f"{what} needs a branch of its own (new_branch())", gid=self._gid, branch_id=branch,
            )
        return branch

    def on_rollback(self: W, fn: Callable[[Any], Any]) -> W:
        """Register the compensation of the current branch: ``fn(bb)`` runs if the workflow fails.

        Refused on a ``do_xa`` branch, as :meth:`on_commit` is.
        """
        branch = self._no_xa("on_rollback()")
        if self._rollback_added:
            raise DtmInvalidInput(f"branch {branch} already has an on_rollback callback", gid=self._gid)
        self._check_callback(fn, "on_rollback")
        self._rollback_added = True
        self._failed.append(_Phase2Item(branch, fn))
        return self

    def on_commit(self: W, fn: Callable[[Any], Any]) -> W:
        """Register the phase-2 commit of the current branch: ``fn(bb)`` runs if the workflow succeeds.

        Refused (DtmInvalidInput) on a ``do_xa`` branch; after ``do_xa`` that is only once its XA is
        prepared and recorded, which then keeps its locks until fixed code resumes the workflow.
        """
        branch = self._no_xa("on_commit()")
        if self._commit_added:
            raise DtmInvalidInput(f"branch {branch} already has an on_commit callback", gid=self._gid)
        self._check_callback(fn, "on_commit")
        self._commit_added = True
        self._succeeded.append(_Phase2Item(branch, fn))
        return self

    def on_finish(self: W, fn: Callable[[Any, bool], Any]) -> W:
        """Register ``fn(bb, is_rollback)`` as both the ``on_commit`` and the ``on_rollback`` callback of
        the current branch (Go's ``OnFinish``): it runs in phase 2 either way, recorded like them."""
        self._check_callback(fn, "on_finish")
        self._no_xa("on_finish()")
        if self._commit_added or self._rollback_added:
            raise DtmInvalidInput(f"branch {self._branch} already has an on_commit/on_rollback callback",
                                  gid=self._gid)
        return self.on_commit(lambda bb: fn(bb, False)).on_rollback(lambda bb: fn(bb, True))

    def _check_callback(self, fn: Any, what: str) -> None:
        if not callable(fn):
            raise DtmInvalidInput(f"{what} needs a callable, not {type(fn).__name__}", gid=self._gid)
        if self._blocking:
            from ._flow import is_async_function

            if is_async_function(fn):
                raise DtmInvalidInput(
                    f"{what}: an async function cannot run in the sync workflow; use dtmcli.asyncio.workflow",
                    gid=self._gid,
                )

    def _barrier(self, branch_id: str, op: str) -> Any:
        """The BranchBarrier (sync or async) handed to a step or callback."""
        raise NotImplementedError

    # -- flows -----------------------------------------------------------------------------

    def _prepare_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "gid": self._gid,
            "trans_type": WORKFLOW,
            "protocol": "http",
            "query_prepared": self._callback,
            "custom_data": self._custom_data,
            "concurrent": False,
        }
        body.update(self.options.to_wire())
        return body

    def _load_progresses(self, rows: Any) -> None:
        self._progresses = {}
        for row in rows if isinstance(rows, list) else ():
            if not isinstance(row, dict):
                continue
            data = _unb64(row.get("bin_data"), "bin_data", self._gid)
            status = str(row.get("status") or "")
            error = _failure_error(data, self._gid, str(row.get("branch_id")), str(row.get("op"))) \
                if status == FAILED else None
            self._progresses[f"{row.get('branch_id')}-{row.get('op')}"] = _StepResult(status, data, error)

    def _prepare_flow(self) -> Flow[dict[str, Any]]:
        """prepareWorkflow: the stored transaction (``{}`` when DTM sent none) and the answer."""
        resp = yield from self._client._post_flow("prepareWorkflow", self._prepare_body(), idempotent=True)
        return parse_json_object(resp, path="prepareWorkflow", gid=self._gid)

    def _finished(self, trans: Mapping[str, Any]) -> bytes:
        """The outcome of a finished gid: its stored result, or DtmFailure(its rollback reason)."""
        if trans.get("status") == SUCCEED:
            return _unb64(trans.get("result"), "result", self._gid)
        raise DtmFailure(with_failure(str(trans.get("rollback_reason") or "")), gid=self._gid)

    def _check_owner(self, trans: Mapping[str, Any]) -> None:
        """A gid DTM holds (finished or not) must be a workflow of this name and input; else DtmInvalidInput.

        The input and name are checked when DTM returns ``custom_data``: always for a prepared gid and on
        SQL stores; a finished gid on boltdb/redis shows the object built from the submit (no
        ``custom_data``), so there only the type can be checked.
        """
        kind, status = trans.get("trans_type"), trans.get("status")
        if kind != WORKFLOW:
            raise DtmInvalidInput(
                f"gid {self._gid} holds a transaction of type {kind!r} ({status}), not a workflow; "
                f"workflow {self._name!r} was not run", gid=self._gid,
            )
        custom = trans.get("custom_data")
        if custom and not _custom_matches(custom, self._name, self._data):
            raise DtmInvalidInput(
                # The stored input is not echoed: this text can be the answer to whoever called the resume URL.
                f"gid {self._gid} was prepared for another workflow or input than {self._name!r} with these "
                f"{len(self._data)} bytes; nothing was run. A gid runs one workflow with one input", gid=self._gid,
            )
        if status not in (PREPARED, SUCCEED, FAILED):
            logger.warning("workflow %s %s is %s at prepareWorkflow; running it", self._name, self._gid, status)

    def _execute_flow(self, fn: Callable[..., Any], wf: Any) -> Flow[bytes]:
        """prepareWorkflow, the workflow function (replaying recorded steps), phase 2, submit."""
        answer = yield from self._prepare_flow()
        trans = _transaction(answer)
        self._check_owner(trans)  # also for a finished gid: its outcome is only this workflow's
        if trans.get("status") in (SUCCEED, FAILED):
            return self._finished(trans)
        self._load_progresses(answer.get("progresses"))
        try:
            return (yield from self._run_flow(fn, wf))
        except WorkflowConflict:
            raise
        except Exception:
            if self._final is None:
                raise
            # DTM refused a record or the submit: another execution finished this gid meanwhile.
            return self._settled(self._final)

    def _settled(self, final: Mapping[str, Any]) -> bytes:
        """The outcome another execution stored, when it agrees with what this one did; else WorkflowConflict.

        It agrees when this execution ran no phase-2 callback, or ran those of the same phase
        (commit callbacks and succeed, rollback callbacks and failed).
        """
        status = str(final.get("status"))
        if self._phase2_ran and status != (SUCCEED if self._op == OP_COMMIT else FAILED):
            ran = tuple(self._phase2_ran)
            message = (
                f"workflow {self._name} {self._gid}: another execution finished the gid as {status} after this "
                f"one ran {len(ran)} {self._op} callback(s) (branches {', '.join(ran)}); the two outcomes "
                "contradict each other and need a human (was the workflow function deterministic? is "
                "retry_interval above the longest run?)"
            )
            logger.error("%s", message)
            raise WorkflowConflict(message, status=status, phase=self._op, callbacks=ran, gid=self._gid)
        return self._finished(final)

    def _settle_flow(self) -> Flow[None]:
        """After DTM refused a record or the submit: look the gid up; a finished one is kept in ``_final``."""
        try:
            answer = yield from self._prepare_flow()
        except DtmError:
            return
        trans = _transaction(answer)
        if trans.get("status") in (SUCCEED, FAILED):
            logger.warning("workflow %s %s was finished (%s) by another execution", self._name, self._gid,
                           trans.get("status"))
            self._final = trans

    def _check_alive(self) -> None:
        """After DTM refused a record of this execution nothing more runs in it (the function may have
        swallowed that error): raise at once."""
        if self._refused is not None:
            raise DtmServerError(
                f"workflow {self._name} {self._gid}: DTM refused an earlier record of this execution "
                f"({self._refused.message}); no further step or callback runs in it",
                status=409, body=self._refused.message, gid=self._gid, branch_id=self._branch, op=self._op,
            ) from self._refused

    def _abandon_pending(self) -> list[str]:
        """Drop the (async) steps created and never awaited: they never ran. Each is closed (or its Task
        cancelled before it starts); their descriptions are returned."""
        pending = list(self._pending)
        self._pending.clear()
        return sorted(str(step.abandon()) for step in pending)

    def _check_awaited(self) -> None:
        """Refuse steps the (async) workflow function created and never awaited: they never ran."""
        if not self._pending:
            return
        steps = self._abandon_pending()
        raise DtmInvalidInput(
            f"workflow {self._name!r}: {len(steps)} step(s) were created and never awaited (a missing await?): "
            f"{'; '.join(steps)}; nothing was committed or submitted", gid=self._gid,
        )

    def _run_flow(self, fn: Callable[..., Any], wf: Any) -> Flow[bytes]:
        failure: Optional[DtmFailure] = None
        result = b""
        try:
            value = yield Call(fn, wf, self._data)
        except DtmFailure as exc:
            failure = exc
            if self._pending:  # they never ran: nothing to refuse, roll back as the function asked
                logger.warning("workflow %s %s: step(s) created and never awaited did not run (%s); rolling "
                               "back as the workflow function raised DtmFailure", self._name, self._gid,
                               "; ".join(self._abandon_pending()))
        except BaseException:
            self._abandon_pending()
            raise
        else:
            self._check_awaited()
            result = _as_bytes(value, f"workflow {self._name!r}", self._gid, self._blocking)
        if self._final is not None:  # the function swallowed DTM's refusal; nothing more may run
            return self._settled(self._final)
        self._check_alive()
        if len(_b64(result)) > MAX_RESULT_LEN:  # refused before phase 2: DTM's SQL stores could not keep it
            raise DtmInvalidInput(
                f"workflow {self._name!r} returned {len(result)} bytes; their base64 must fit DTM's "
                f"{MAX_RESULT_LEN}-character result column. Nothing was committed or submitted",
                gid=self._gid,
            )
        self._check_phase(failure)
        yield from self._phase2_flow(failure)
        reason = clip_reason(with_failure(failure.message)) if failure is not None else ""
        body = {
            "gid": self._gid,
            "trans_type": WORKFLOW,
            "req_extra": {"status": FAILED if failure else SUCCEED, "rollback_reason": reason,
                          "result": _b64(result)},
        }
        try:
            yield from self._client._post_flow("submit", body)
        except DtmError:
            yield from self._settle_flow()
            raise
        if failure is not None:  # the same error a re-execute of the failed gid raises
            raise DtmFailure(with_failure(reason), gid=self._gid) from failure
        return result

    def _check_phase(self, failure: Optional[DtmFailure]) -> None:
        """Refuse a phase 2 the recorded progress contradicts (it holds the other phase's callbacks)."""
        other = OP_COMMIT if failure is not None else OP_ROLLBACK
        taken = sorted(key for key in self._progresses if key.endswith(f"-{other}"))
        if taken:
            raise WorkflowPhase2Error(
                f"workflow {self._name} {self._gid}: the recorded run took the {other} phase ({', '.join(taken)}) "
                f"but this run ends in {'rollback' if failure is not None else 'commit'}: the workflow function "
                "took another path than the recorded run (it must be deterministic apart from its recorded "
                "steps). Nothing was run or submitted; the workflow stays prepared",
                gid=self._gid,
            ) from failure

    def _phase2_flow(self, failure: Optional[DtmFailure]) -> Flow[None]:
        items = self._failed if failure is not None else self._succeeded
        self._op = OP_ROLLBACK if failure is not None else OP_COMMIT
        for item in reversed(items):
            self._branch = item.branch_id
            step = self._phase2_step(item.fn)
            sr = yield from self._recorded_flow(step)
            if sr.error is not None:
                raise sr.error

    def _phase2_step(self, fn: Callable[[Any], Any]) -> Callable[[Any], Flow[_StepResult]]:
        def step(bb: Any) -> Flow[_StepResult]:
            self._phase2_ran.append(bb.branch_id)
            try:
                value = yield Call(fn, bb)
            except DtmFailure as exc:
                raise WorkflowPhase2Error(
                    f"workflow {self._name} {self._gid}: the {bb.op} callback of branch {bb.branch_id} raised "
                    f"FAILURE ({exc.message}); phase-2 callbacks must succeed in the end. Nothing was submitted: "
                    "the workflow stays prepared and DTM resumes it",
                    gid=self._gid, branch_id=bb.branch_id, op=bb.op,
                ) from exc
            self._check_awaited()  # a step the (async) callback created and never awaited
            if self._blocking and discard_awaitable(value):
                raise DtmInvalidInput(
                    f"the {bb.op} callback returned an awaitable, which the sync workflow cannot await",
                    gid=self._gid, branch_id=bb.branch_id, op=bb.op,
                )
            return _StepResult(SUCCEED, b"")

        return step

    def _recorded_flow(self, step: Callable[[Any], Flow[_StepResult]]) -> Flow[_StepResult]:
        """Replay the current branch/op from the progress, or run ``step(bb)`` and record it (Go's ``recordedDo``)."""
        branch_id, op = self._branch, self._op
        self._check_alive()
        if op == OP_ACTION:
            self._current_branch("a step")
            if self._action_added:
                raise DtmInvalidInput(
                    f"branch {branch_id} already has its step; call new_branch() first", gid=self._gid
                )
            self._action_added = True
        sr = self._progresses.get(f"{branch_id}-{op}")
        if sr is not None:
            logger.debug("workflow %s: branch %s %s replayed (%s)", self._gid, branch_id, op, sr.status)
        else:
            sr = yield from step(self._barrier(branch_id, op))
            if sr.status == FAILED:  # a message: recorded as text that fits, whatever the step gave
                sr = _StepResult(FAILED, _failure_data(sr.data), sr.error)
            if sr.status:
                yield from self._register_flow(branch_id, op, sr.status, sr.data)
            if sr.status == FAILED:  # raise what a replay raises, chained from the step's own error
                error = _failure_error(sr.data, self._gid, branch_id, op)
                error.__cause__, error.__suppress_context__ = sr.error, True
                sr = _StepResult(FAILED, sr.data, error)
        if not self.compensate_error_branch and sr.status == FAILED:
            if self._failed and self._failed[-1].branch_id == branch_id:
                self._failed.pop()  # a branch whose own action failed is not compensated by default
        return sr

    def _register_flow(self, branch_id: str, op: str, status: str, data: bytes) -> Flow[None]:
        body = {
            "gid": self._gid,
            "trans_type": WORKFLOW,
            "branch_id": branch_id,
            "op": op,
            "status": status,
            "data": _record_text(data, self._gid, branch_id, op),
            # Stored synchronously on every store; without it a default DTM only queues (and boltdb/redis
            # drop) the progress, and a resumed workflow would run every step again (protocol.md §12).
            "sync": "1",
        }
        try:
            yield from self._client._post_flow("registerBranch", body)
        except (DtmFailure, DtmServerError) as exc:
            yield from self._settle_flow()  # another execution may have finished the gid
            if not isinstance(exc, DtmFailure):
                if self._final is not None:
                    self._refused = exc
                raise
            # DTM refused the record (the workflow is no longer prepared): not a business FAILURE.
            refused = DtmServerError(f"registerBranch refused: {exc.message}", status=409, body=exc.message,
                                     gid=self._gid, branch_id=branch_id, op=op)
            self._refused = refused
            raise refused from exc

    # -- steps -----------------------------------------------------------------------------

    def _http_flow(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: Union[bytes, str, None] = None,
        params: Optional[Mapping[str, str]] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> Flow[StepResponse]:
        """A recorded HTTP step (or, in a phase-2 callback, an unrecorded call carrying op=commit|rollback)."""
        if not isinstance(method, str) or not method.isalpha():
            raise DtmInvalidInput(f"bad HTTP method {method!r}", gid=self._gid)
        method = method.upper()
        check_http_url(url, "workflow request URL", gid=self._gid)
        if json is not None and data is not None:
            raise DtmInvalidInput("pass json or data, not both", gid=self._gid)
        send_headers = dict(self.options.branch_headers)
        body: Optional[bytes] = None
        if json is not None:
            body = dumps(json)
            send_headers["Content-Type"] = "application/json"
        elif data is not None:
            if not isinstance(data, (bytes, bytearray, str)):
                raise DtmInvalidInput(f"data must be bytes or str, not {type(data).__name__}", gid=self._gid)
            body = data.encode() if isinstance(data, str) else bytes(data)
        send_headers.update(headers or {})
        if body is None and method not in ("GET", "HEAD"):
            body = b""  # an empty body, as Go's resty sends it: no Content-Type from any transport
        if self._op == OP_ACTION:
            self._current_branch("request()")

        def step(bb: Any) -> Flow[_StepResult]:
            self._check_alive()
            query = {**(params or {}), "gid": self._gid, "trans_type": WORKFLOW, "branch_id": self._branch,
                     "op": self._op}
            resp: Response = yield Request(method, url, query, body, send_headers)  # {}: no default Content-Type
            return self._http_result(method, url, resp)

        if self._op == OP_ACTION:
            sr = yield from self._recorded_flow(step)
        else:  # in phase 2 the callback as a whole is recorded
            sr = yield from step(None)
        if sr.error is not None:
            raise sr.error
        return StepResponse(200, sr.data)

    def _http_result(self, method: str, url: str, resp: Response) -> _StepResult:
        """Go's ``HTTPResp2DtmError``, by status code only: 409 FAILURE (recorded failed with the body),
        425 ONGOING and any other non-2xx an error (not recorded), 2xx success whatever the body
        (Go accepts only 200; here 201/204 succeed too, so that they are recorded)."""
        text = resp.text
        where: dict[str, Any] = {"gid": self._gid, "branch_id": self._branch, "op": self._op}
        shown = text if len(text) <= _BODY_IN_ERRORS else text[:_BODY_IN_ERRORS] + "..."
        if 200 <= resp.status < 300:
            return _StepResult(SUCCEED, resp.content)
        if resp.status == 409:
            return _StepResult(FAILED, resp.content, DtmFailure(with_failure(text), **where))
        if resp.status == 425:
            ongoing = DtmOngoing(f"{method} {url} answered ONGOING (425): {shown}", **where)
            return _StepResult("", resp.content, ongoing)
        return _StepResult("", resp.content, DtmServerError(f"{method} {url} answered HTTP {resp.status}: {shown}",
                                                            status=resp.status, body=text, **where))

    def _xa_local(self, conn: Any, info: Any, fn: Callable[[Any], Any], register: Flow[None], table: str,
                  dialect: Optional[str]) -> Any:
        """Run the local XA transaction (the driver's: blocking, or a coroutine)."""
        raise NotImplementedError

    def _xa_phase2(self, conn: Any, bb: Any, table: str, dialect: Optional[str]) -> Any:
        """Commit or roll back the prepared XA branch of ``bb`` (the driver's)."""
        raise NotImplementedError

    def _do_xa_flow(self, conn: Any, fn: Callable[[Any], Any], table: str, dialect: Optional[str]) -> Flow[bytes]:
        """Go's ``DoXa`` (protocol.md §12): the step is a local XA transaction, prepared, and phase 2 commits
        or rolls it back. A ``business`` record without the action's record means the process died during
        the prepare: FAILURE (not resumable)."""
        from ._barrier.core import validate_table
        from .branch import BranchInfo

        branch_id = self._current_branch("do_xa()")
        if not callable(fn):
            raise DtmInvalidInput(f"do_xa() needs a callable, not {type(fn).__name__}", gid=self._gid)
        validate_table(table)
        if self._commit_added or self._rollback_added:
            raise DtmInvalidInput(
                f"branch {branch_id} has an on_commit/on_rollback callback; a do_xa() step's phase 2 commits or "
                "rolls back its XA transaction, so it needs a branch of its own (new_branch())",
                gid=self._gid, branch_id=branch_id,
            )
        self._xa_added = True

        def step(bb: Any) -> Flow[_StepResult]:
            if f"{branch_id}-{OP_BUSINESS}" in self._progresses:
                return _StepResult("", b"", DtmFailure(
                    "the XA prepare of this step was interrupted; not resumable, rolling back",
                    gid=self._gid, branch_id=branch_id, op=OP_ACTION))
            info = BranchInfo(self._gid, WORKFLOW, branch_id, OP_ACTION)
            register = self._register_flow(branch_id, OP_BUSINESS, SUCCEED, b"")
            try:
                value = yield Call(self._xa_local, conn, info, fn, register, table, dialect)
            except DtmFailure as exc:
                return _StepResult(FAILED, exc.message.encode("utf-8", "replace"), exc)
            return _StepResult(SUCCEED, _as_bytes(value, "a do_xa() step", self._gid, self._blocking))

        sr = yield from self._recorded_flow(step)

        def phase2(bb: Any) -> Any:
            return self._xa_phase2(conn, bb, table, dialect)

        self._succeeded.append(_Phase2Item(branch_id, phase2))
        self._failed.append(_Phase2Item(branch_id, phase2))
        if sr.error is not None:
            raise sr.error
        return sr.data

    def _do_flow(self, fn: Callable[[Any], Any]) -> Flow[bytes]:
        """A recorded local step ``fn(bb)``: bytes → succeed; DtmFailure → failed; other errors unrecorded."""
        if not callable(fn):
            raise DtmInvalidInput(f"do() needs a callable, not {type(fn).__name__}", gid=self._gid)
        if self._op != OP_ACTION:
            raise DtmInvalidInput("do() cannot be called in an on_commit/on_rollback callback", gid=self._gid)

        def step(bb: Any) -> Flow[_StepResult]:
            try:
                value = yield Call(fn, bb)
            except DtmFailure as exc:
                recorded = exc.data if isinstance(exc, StepFailure) else exc.message.encode("utf-8", "replace")
                return _StepResult(FAILED, recorded, exc)
            return _StepResult(SUCCEED, _as_bytes(value, "a do() step", self._gid, self._blocking))

        sr = yield from self._recorded_flow(step)
        if sr.error is not None:
            raise sr.error
        return sr.data

