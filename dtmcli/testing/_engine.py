"""The coordinator's state machine: DTM's API rules and its processing of saga, tcc, xa, msg and workflow.

No sockets here: branch calls go through an injected :class:`BranchCaller` and time comes from an
injected :class:`Clock`, so the same engine runs under a manual clock in tests and in real time.
Behaviour follows docs/protocol.md §2-§6; deliberate differences are listed in the package docs.

The parts: ``_api`` / ``_admin`` (the HTTP API's handlers), ``_scheduler`` (locks, due times, the
cron tick), ``_pass`` (branch calls and status writes), one processor per transaction type
(``_saga``, ``_msg``, ``_tcc_xa``, ``_workflow``) and ``_rules`` (errors, settings, field checks shared by all).
This module wires them together and routes requests.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional

import shortuuid

from .._consts import MSG, RESULT_FAILURE, RESULT_ONGOING, RESULT_SUCCESS, SAGA, SUBMITTED, SUCCEED, WORKFLOW
from . import _admin, _api
from ._branch_client import BranchCaller
from ._clock import Clock
from ._msg import process_msg
from ._pass import Conflict, Pass, Runner
from ._rules import OK, VERSION, ApiError, ApiResult, EngineConfig
from ._saga import process_saga
from ._scheduler import Scheduler
from ._store import MemoryStore, Options, TransRecord
from ._tcc_xa import process_tcc_xa
from ._wire import BadInput
from ._workflow import prepare_workflow, process_workflow

__all__ = ["Engine", "EngineConfig", "ApiResult", "VERSION"]

logger = logging.getLogger("dtmcli.testing")

_Route = Callable[[Scheduler, Mapping[str, str], bytes], ApiResult]

_ROUTES: dict[str, _Route] = {
    "newGid": lambda s, q, b: (200, {"gid": str(shortuuid.uuid()), "dtm_result": RESULT_SUCCESS}),
    "prepare": _api.prepare,
    "submit": _api.submit,
    "abort": _api.abort,
    "registerBranch": _api.register,
    "registerTccBranch": _api.register,
    "registerXaBranch": _api.register,
    "prepareWorkflow": prepare_workflow,
    "query": _admin.query,
    "all": _admin.all_trans,
    "forceStop": _admin.force_stop,
    "resetNextCronTime": _admin.reset_next_cron_time,
    "resetCronTime": _admin.reset_cron_time,
    "version": lambda s, q, b: (200, {"version": VERSION}),
}
_UNSUPPORTED = ("subscribe", "unsubscribe", "scanKV", "queryKV")


class Engine:
    """DTM's rules over a store, a clock and a branch caller. Thread-safe."""

    def __init__(
        self,
        store: MemoryStore,
        clock: Clock,
        caller: BranchCaller,
        config: Optional[EngineConfig] = None,
        *,
        update_branch_sync: bool = False,
    ) -> None:
        self.store = store
        self.clock = clock
        self.caller = caller
        self.config = config or EngineConfig()
        self.scheduler = Scheduler(store, clock, self.config, self._process)
        self.scheduler.update_branch_sync = update_branch_sync
        self.runner = Runner(self.scheduler, caller, self.config)

    def close(self) -> None:
        """Stop accepting passes and wait for running ones."""
        self.scheduler.close()
        self.runner.close()

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no asynchronous pass is queued or running; False on timeout."""
        return self.scheduler.wait_idle(timeout)

    def next_due_time(self) -> Optional[float]:
        """The earliest ``next_cron_time`` of an unfinished transaction not being processed."""
        return self.scheduler.next_due_time()

    def run_due(self, limit: Optional[int] = None) -> int:
        """One cron tick: lock and process (synchronously) what is due now; returns how many passes ran."""
        return self.scheduler.run_due(limit)

    def query_json(self, gid: str) -> dict[str, Any]:
        """What ``/query?gid=`` answers."""
        return _admin.query_json(self.scheduler, gid)

    def handle(self, method: str, path: str, query: Mapping[str, str], body: bytes) -> ApiResult:
        """Answer one API request: ``path`` is what follows ``/api/``."""
        if path == "ping":
            return 200, {"msg": "pong"}
        name = path[len("dtmsvr/") :] if path.startswith("dtmsvr/") else None
        route = _ROUTES.get(name or "")
        if route is None:
            if name in _UNSUPPORTED or (name or "").startswith("topic/"):
                return 500, {"message": f"{name} is not supported by the dtmcli test coordinator"}
            return 404, {"message": "404 page not found"}
        try:
            return route(self.scheduler, query, body)
        except ApiError as exc:
            return exc.status, exc.body
        except BadInput as exc:
            return exc.status, {"message": str(exc)}
        except Exception as exc:  # a bug must not drop the connection unanswered or stop the server
            logger.exception("%s failed", path)
            return 500, {"message": f"{type(exc).__name__}: {exc}"}

    def _process(self, rec: TransRecord, opts: Options, report: bool) -> ApiResult:
        """One pass over ``rec``; with ``report``, the answer a wait_result caller gets."""
        p = Pass(rec, opts, rec.status, self.clock.now())
        submitting = p.status == SUBMITTED
        try:
            if rec.trans_type == SAGA:
                err = process_saga(self.runner, p)
            elif rec.trans_type == MSG:
                err = process_msg(self.runner, p)
            elif rec.trans_type == WORKFLOW:
                err = process_workflow(self.runner, p)
            else:
                err = process_tcc_xa(self.runner, p)
        except Conflict:
            logger.info("%s changed status during a pass; pass stopped", rec.gid)
            if not report:
                return OK
            # DTM's compare-and-set panics here; a waiting caller must not read it as success.
            return 500, {"message": f"status of {rec.gid} changed during the pass, now {rec.status}"}
        except ApiError as exc:
            logger.error("processing %s failed: %s", rec.gid, exc)
            return exc.status, exc.body
        except Exception as exc:  # a bug or a bad stored value: report it, keep the coordinator alive
            logger.exception("processing %s failed", rec.gid)
            return 500, {"message": f"{type(exc).__name__}: {exc}"}
        if not report:
            return OK
        if err is not None:
            if err.ongoing:
                return 425, {"dtm_result": RESULT_ONGOING, "message": RESULT_ONGOING}
            return 500, {"message": err.text}
        if submitting and rec.status != SUCCEED:
            if rec.rollback_reason:
                return 409, {"dtm_result": RESULT_FAILURE, "message": rec.rollback_reason}
            return 409, {"dtm_result": RESULT_FAILURE, "message": "wait result not return success: FAILURE"}
        return OK
