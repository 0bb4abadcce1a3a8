"""Workflow mode: a distributed transaction written as ordinary code, whose progress survives a crash.

>>> from dtmcli import workflow
>>> workflow.init_http(DTM, "http://order-svc:8000/api/workflow/resume")   # DTM resumes workflows there
>>> @workflow.register("transfer")
... def transfer(wf: workflow.Workflow, data: bytes) -> bytes | None:
...     req = json.loads(data)
...     wf.new_branch().on_rollback(lambda bb: revert_out(req))
...     wf.request("POST", f"{busi}/TransOut", json=req)          # recorded; 409 => DtmFailure
...     wf.new_branch().do(lambda bb: local_step(req))            # recorded local step
...     return b"done"
>>> workflow.execute("transfer", gid, json.dumps(req).encode())

Each step runs under a branch (``new_branch()``: ``01``, ``02``, ...) and is recorded with DTM
(``registerBranch`` with ``"sync":"1"``, so every store keeps it). When the process dies or a step
fails with anything but FAILURE, the workflow stays prepared; DTM later calls the resume URL, where
:func:`execute_by_qs` (or the ready views in :mod:`dtmcli.contrib`) runs the function again: recorded
steps are replayed from their stored result instead of being executed. On FAILURE the
``on_rollback`` callbacks run in reverse order and :func:`execute` raises DtmFailure; on success the
``on_commit`` callbacks run. See docs/protocol.md §12.

What this asks of the code (as Go's client does):

- **Deterministic apart from steps.** A resume runs the function again from the top; everything it
  decides must come from its input or from step results. Phase 2 refuses a run whose path contradicts
  the recorded one (WorkflowPhase2Error, nothing submitted). Turning a step's unrecorded error (a
  timeout, a 500) into DtmFailure (``except Exception: raise DtmFailure(...)``) is not deterministic:
  on resume the step runs again and may succeed.
- **Steps run at least once, not exactly once.** A step whose record is lost (the process dies, or
  ``registerBranch`` fails, between the step and its record) runs again on resume. DTM also resumes a
  workflow *while it still runs*: first ``retry_interval`` after prepareWorkflow (else the server's
  RetryInterval, 10 s by default; ``timeout_to_fail`` does not delay it), then every RetryInterval.
  Within one process (whatever the registry, sync or asyncio) the second call gets DtmOngoing (the
  resume view answers 425) and nothing runs, but another process runs the steps concurrently. When
  DTM then refuses a record or the submit because that other execution finished the gid, this one
  stops (a later step or callback raises without running, even if the function swallowed the first
  error) and reports the stored outcome, or raises WorkflowConflict (logged as an error) when it had
  already run phase-2 callbacks of the other outcome. So make steps idempotent (the branch barrier:
  ``bb`` in ``do``, and the ``gid``/``branch_id``/``op`` query every ``request`` carries) and set
  ``retry_interval`` above the longest run.
- **Only DtmFailure and the recorded data survive a resume.** A failed step raises
  ``DtmFailure("<recorded text> FAILURE")`` fresh or replayed (your own exception is its
  ``__cause__`` only in the fresh run); HTTP steps are classified by status code (409 FAILURE, 425
  ONGOING, 2xx success — Go accepts only 200; other answers are errors and are not recorded). A
  failure's data is a message: recorded as UTF-8 text, undecodable bytes replaced and clipped with
  a marker to 65,535 bytes.
- **Limits of DTM's SQL stores:** input (in ``custom_data``) and the workflow result 1,024 characters
  of base64/JSON, a step result 65,535 bytes; larger ones are refused with DtmInvalidInput.
- **The resume URL must be reachable by DTM only:** whoever can call it can run registered workflows
  with any gid and input. A gid DTM holds unfinished only runs the workflow and input it was prepared
  with (DtmInvalidInput otherwise); so does a finished gid where DTM still shows the input (SQL
  stores; boltdb/Redis keep only the type of a finished workflow). Put a secret in the callback
  URL's query and check it in the view (``workflow_resume_view(token=...)``,
  ``workflow_resume_endpoint(token=...)``): DTM sends the URL's own query back unchanged. dtmcli never
  logs it, but whoever reads DTM's API (``/query``) or the access logs sees it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

from . import _flow
from ._barrier.core import DEFAULT_TABLE
from ._consts import WORKFLOW
from ._workflow import (
    Registry,
    StepFailure,
    StepResponse,
    WorkflowConflict,
    WorkflowCore,
    WorkflowPhase2Error,
    query_name_gid,
)
from .barrier import BranchBarrier
from .client import as_client

__all__ = [
    "StepFailure",
    "StepResponse",
    "Workflow",
    "WorkflowConflict",
    "WorkflowFunc",
    "WorkflowPhase2Error",
    "execute",
    "execute_by_qs",
    "init_http",
    "is_registered",
    "register",
    "registry",
    "unregister",
]

WorkflowFunc = Callable[["Workflow", bytes], Optional[bytes]]
"""A workflow function: ``fn(wf, data) -> bytes | None``."""


class Workflow(WorkflowCore):
    """One execution of a workflow, handed to the workflow function (see the module docstring).

    ``wf.new_branch()`` starts a branch; ``on_rollback(fn)`` / ``on_commit(fn)`` register its
    phase-2 callbacks (``fn(bb)`` with ``bb`` a :class:`~dtmcli.BranchBarrier` for the branch);
    ``request(...)`` or ``do(fn)`` is its recorded step. A Workflow belongs to one execution.
    """

    def _barrier(self, branch_id: str, op: str) -> BranchBarrier:
        return BranchBarrier(WORKFLOW, self.gid, branch_id, op)

    def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        data: Union[bytes, str, None] = None,
        params: Optional[Mapping[str, str]] = None,
        headers: Optional[Mapping[str, str]] = None,
    ) -> StepResponse:
        """Call ``url`` as the current branch's recorded step (replayed when already recorded).

        The query carries ``gid``, ``trans_type=workflow``, ``branch_id`` and ``op``. Only the status
        counts: any 2xx is success, 409 is recorded as failed and raises DtmFailure(body + " FAILURE"),
        425 raises DtmOngoing, other answers and connection errors raise; those are not recorded (the
        workflow stays prepared and the call is made again on resume). In an
        ``on_commit``/``on_rollback`` callback the call carries that op and is not recorded itself.
        """
        flow = self._http_flow(method, url, json=json, data=data, params=params, headers=headers)
        return _flow.run(flow, self._client)

    def do(self, fn: Callable[[BranchBarrier], Optional[bytes]]) -> bytes:
        """Run ``fn(bb)`` as the current branch's recorded local step and return its bytes.

        Returned bytes (``None`` counts as ``b""``) are recorded as succeed; a raised DtmFailure is
        recorded as failed (with :attr:`StepFailure.data`, or the message) and DtmFailure(recorded
        text + " FAILURE") is raised from it; other errors are not recorded. A replayed step returns
        the recorded bytes (or raises that DtmFailure) without calling ``fn``.
        """
        return _flow.run(self._do_flow(fn), self._client)

    def do_xa(
        self, conn: Any, fn: Callable[[Any], Optional[bytes]], *, table: str = DEFAULT_TABLE,
        dialect: Optional[str] = None,
    ) -> bytes:
        """Run ``fn(conn)`` as the current branch's step in a local XA transaction (MySQL/MariaDB, PostgreSQL).

        The transaction is prepared with a ``business`` progress record, then committed in phase 2
        when the workflow succeeds, or rolled back when it fails (Go's ``DoXa``). ``conn`` is a
        connection factory (preferred: MariaDB binds a prepared XA to its session) or a connection,
        as :func:`dtmcli.barrier.xa_local_transaction` takes; phase 2 opens its own from a factory.
        A step interrupted between that record and its own is not resumable: it fails (FAILURE).
        The branch can have no ``on_commit``/``on_rollback``/``on_finish`` (its phase 2 is the XA's):
        one registered before is refused at once; one registered after ``do_xa`` returns is refused
        only then, with the XA prepared and recorded, so it keeps its locks (the workflow stays
        prepared) until code without the mistake resumes the workflow and commits or rolls it back.
        """
        return _flow.run(self._do_xa_flow(conn, fn, table, dialect), self._client)

    def _xa_local(self, conn: Any, info: Any, fn: Callable[[Any], Any], register: _flow.Flow[None], table: str,
                  dialect: Optional[str]) -> Any:
        from ._barrier.sql_conn import connection_from
        from ._barrier.xa import _blocking, _dbapi, _XaIO, local_transaction_flow

        with connection_from(conn) as dedicated:
            adapter = _dbapi(dedicated, dialect)
            flow = local_transaction_flow(info, adapter.dialect, table, _blocking(fn), dedicated, register)
            return _flow.run(flow, _XaIO(adapter, self._client.transport))  # type: ignore[attr-defined]

    def _xa_phase2(self, conn: Any, bb: Any, table: str, dialect: Optional[str]) -> None:
        from ._barrier.xa import xa_handle_phase2
        from .branch import BranchInfo

        xa_handle_phase2(BranchInfo(bb.gid, WORKFLOW, bb.branch_id, bb.op), conn, table=table, dialect=dialect)


class _SyncRegistry(Registry):
    def __init__(self) -> None:
        super().__init__(as_client, blocking=True)


registry = _SyncRegistry()
"""The default registry :func:`register`, :func:`execute` and the resume views use."""


init_http = registry.init_http
register = registry.decorate
unregister = registry.unregister
is_registered = registry.is_registered


def execute(name: str, gid: str, data: bytes) -> bytes:
    """Run (or resume, or look up) the workflow ``name`` for ``gid`` with input ``data``; return its result.

    A finished gid returns its stored result (or raises DtmFailure) without running any step, if DTM
    shows it as this workflow with this input (DtmInvalidInput otherwise). After a rollback raises
    DtmFailure (the message is the rollback reason). Any other error propagates
    and leaves the workflow prepared: DTM resumes it through the callback URL. Bad input (unknown
    name, non-bytes or too large input, bad gid, a gid prepared for another workflow or input)
    raises DtmInvalidInput before any step runs. A gid already running in this process raises
    DtmOngoing at once; when another process finished the gid meanwhile, its outcome is returned, or
    WorkflowConflict raised when this execution ran phase-2 callbacks of the other outcome.
    """
    entry, client, callback = registry.lookup(name)
    wf = Workflow(entry, client, callback, gid, data)
    with registry.running(wf.gid):
        return _flow.run(wf._execute_flow(entry.fn, wf), client)


def execute_by_qs(query: Mapping[str, Any], body: bytes) -> bytes:
    """:func:`execute` for DTM's resume call: the name is ``query["op"]``, the gid ``query["gid"]``."""
    name, gid = query_name_gid(query)
    return execute(name, gid, body)
