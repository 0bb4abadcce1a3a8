"""The dtmcli exception tree.

Every error the SDK raises derives from :class:`DtmError`::

    DtmError
    ├── DtmInvalidInput      bad input, raised before anything is sent or written (also a ValueError)
    │   ├── BranchRequestError   a request is not a valid DTM branch call (answered 400)
    │   └── DtmAttributeError    assignment to an attribute a transaction does not have (also an AttributeError)
    ├── DtmFailure           409 / FAILURE: the transaction or branch failed, roll back
    │   └── StepFailure      a workflow step's FAILURE that records its own data
    ├── DtmOngoing           425 / ONGOING: not finished yet, retry later
    │   ├── DtmInProgress    a wait_result submit came back before the transaction finished
    │   └── BarrierConflict  lock wait / deadlock on the barrier rows (DTM retries)
    ├── DtmDuplicated        a barrier found this msg local transaction already done
    ├── DtmTransportError    the request may not have reached DTM or a branch (connection, timeout)
    │   ├── DtmConnectError  no connection could be made: nothing was sent
    │   ├── DtmTimeout
    │   └── DtmConnectTimeout   (both of the above) the connection could not be made in time
    ├── DtmServerError       DTM or a branch answered an unexpected status or body (from DTM: also a
    │                        200 that is not a JSON object, e.g. a proxy's HTML page)
    ├── BarrierDatabaseError the database failed during a barrier call (driver error is the cause)
    ├── WorkflowPhase2Error  a workflow's phase 2 cannot go on (a callback raised FAILURE, or another path)
    └── WorkflowConflict     another execution finished the workflow with the other outcome

Errors carry the ``gid`` (and ``branch_id`` / ``op`` where known) of the transaction they concern.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "DtmError",
    "DtmInvalidInput",
    "DtmAttributeError",
    "DtmFailure",
    "DtmOngoing",
    "DtmInProgress",
    "DtmDuplicated",
    "DtmTransportError",
    "DtmTimeout",
    "DtmConnectError",
    "DtmConnectTimeout",
    "DtmServerError",
    "BranchRequestError",
    "BarrierConflict",
    "BarrierDatabaseError",
    "StepFailure",
    "WorkflowPhase2Error",
    "WorkflowConflict",
]


class DtmError(Exception):
    """Root of every dtmcli error."""

    def __init__(
        self,
        message: str,
        *,
        gid: Optional[str] = None,
        branch_id: Optional[str] = None,
        op: Optional[str] = None,
    ) -> None:
        self.message = message
        self.gid = gid
        self.branch_id = branch_id
        self.op = op
        super().__init__(message)

    def __str__(self) -> str:
        where = [f"{k}={v}" for k, v in (("gid", self.gid), ("branch_id", self.branch_id), ("op", self.op)) if v]
        return f"{self.message} ({', '.join(where)})" if where else self.message


class DtmInvalidInput(DtmError, ValueError):
    """Input rejected before any request was sent or any row written."""


class DtmAttributeError(DtmInvalidInput, AttributeError):
    """Assignment to an attribute a transaction does not have, e.g. a misspelt option
    (``saga.wait_reslt = True``) or a Go spelling (``saga.WaitResult = True``)."""


class DtmFailure(DtmError):
    """FAILURE (HTTP 409): the operation failed for good; the global transaction rolls back."""


class DtmOngoing(DtmError):
    """ONGOING (HTTP 425): not finished yet; DTM retries at a fixed interval."""


class DtmInProgress(DtmOngoing):
    """A ``wait_result`` submit returned before the transaction reached a final status.

    ``status`` is what ``/query`` reported (``submitted``, ``aborting``, ...). Do not submit again:
    DTM keeps driving the transaction; poll :meth:`DtmClient.query` instead.
    """

    def __init__(self, message: str, *, status: str, gid: Optional[str] = None) -> None:
        super().__init__(message, gid=gid)
        self.status = status


class DtmDuplicated(DtmError):
    """The barrier saw this (msg) local transaction already committed."""


class DtmTransportError(DtmError):
    """The request failed below HTTP: connection refused or reset, DNS, TLS.

    The request may or may not have been processed.
    """


class DtmConnectError(DtmTransportError):
    """No connection could be made (refused, unreachable, DNS): the request was certainly not sent."""


class DtmTimeout(DtmTransportError):
    """No answer within the client's ``timeout`` (one budget per call, retries included); the
    request may or may not have been processed."""


class DtmConnectTimeout(DtmConnectError, DtmTimeout):
    """The connection could not be made within the timeout: a timeout, and the request was certainly not sent."""


class DtmServerError(DtmError):
    """An unexpected answer: a status other than 200/409/425, or a body that cannot be read.

    From DTM itself this includes a 200 whose body is not a JSON object (HTML, garbage, empty, nested
    too deeply to parse), and a 200 to prepare, submit, abort, registerBranch, forceStop or
    resetNextCronTime without ``"dtm_result":"SUCCESS"``: DTM answers those so, and such a 200 came
    from something else at that address (a proxy, a login page, another service) and the call most
    likely did not reach DTM: it is never taken as success.
    Check with :meth:`DtmClient.query` before submitting again.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        body: str,
        gid: Optional[str] = None,
        branch_id: Optional[str] = None,
        op: Optional[str] = None,
    ) -> None:
        super().__init__(message, gid=gid, branch_id=branch_id, op=op)
        self.status = status
        self.body = body


class BranchRequestError(DtmInvalidInput):
    """The request is not a valid DTM branch call (missing or malformed field, bad body): HTTP 400."""

    status = 400


class BarrierConflict(DtmOngoing):
    """A lock wait timeout, deadlock or write conflict on the barrier rows: retry later (HTTP 425)."""


class BarrierDatabaseError(DtmError):
    """The database failed during a barrier call (connection lost, statement error, commit failed).

    Nothing of the barrier call is committed unless the failure hit the commit itself, in which case
    the outcome is unknown; either way DTM retries the branch and the barrier keeps it idempotent.
    The driver's exception is the ``__cause__``.
    """


class StepFailure(DtmFailure):
    """A FAILURE raised by a :meth:`do` step that records ``data`` rather than the message.

    ``raise StepFailure("out of stock", data=b"stock check said no")`` records the step as failed
    with ``data`` (what Go's ``Do`` records when it returns data with a FAILURE error). A plain
    :class:`~dtmcli.DtmFailure` records its message. Either way the step then raises a plain
    DtmFailure whose message is the recorded text plus `` FAILURE`` (chained ``from`` this error),
    exactly what a replay of the step raises: only the type DtmFailure and the recorded data survive
    a resume, so the workflow function must not branch on a subclass or on anything else.
    """

    def __init__(self, message: str, *, data: bytes = b"", gid: Optional[str] = None) -> None:
        super().__init__(message, gid=gid)
        self.data = bytes(data)


class WorkflowPhase2Error(DtmError):
    """Phase 2 cannot go on: an ``on_commit`` / ``on_rollback`` callback raised FAILURE, or the
    recorded progress holds callbacks of the other phase (the workflow function took another path
    than the recorded run: it must be deterministic apart from its recorded steps).

    Phase 2 only runs callbacks that must eventually succeed (Go's client panics here). Nothing is
    recorded for the callback and nothing is submitted: the workflow stays prepared and DTM resumes
    it later, running the callback again. The callback's DtmFailure is the ``__cause__``.
    """


class WorkflowConflict(DtmError):
    """Another execution finished the gid with the other outcome after this one ran phase-2 callbacks.

    For example this execution ran ``on_rollback`` callbacks (it compensated) while DTM holds the gid
    as succeed. Neither outcome can be reported as the truth: this error names both (:attr:`status`,
    DTM's final status; :attr:`phase`, this execution's ``commit``/``rollback``; :attr:`callbacks`,
    the branches whose callbacks this execution ran) and is logged at ERROR. It needs a human: the
    workflow function was not deterministic, or two executions raced (set ``retry_interval`` above
    the longest run).
    """

    def __init__(self, message: str, *, status: str, phase: str, callbacks: tuple[str, ...],
                 gid: Optional[str] = None) -> None:
        super().__init__(message, gid=gid)
        self.status, self.phase, self.callbacks = status, phase, callbacks
