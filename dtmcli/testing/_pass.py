"""What every processor shares: one *pass* over a transaction, branch calls and status changes.

A pass remembers the status it started from; a status write finding another status (a concurrent
abort or forceStop) raises :class:`Conflict` and the pass stops, like DTM's compare-and-set.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from .._consts import (
    ABORTING,
    FAILED,
    OP_ACTION,
    PREPARED,
    RESULT_FAILURE,
    RESULT_ONGOING,
    RESULT_SUCCESS,
    SAGA,
    SUBMITTED,
    SUCCEED,
    XA,
)
from .._protocol import branch_result, go_trim, with_failure
from ._branch_client import BranchCaller, payload_bytes
from ._rules import EngineConfig
from ._scheduler import Scheduler
from ._store import BranchRecord, Options, TransRecord

__all__ = ["BranchErr", "Conflict", "Pass", "Runner"]

logger = logging.getLogger("dtmcli.testing")

MAX_REQUEST_TIMEOUT = 86400
"""Longest branch call in seconds (a larger or negative request_timeout gets this)."""
class Conflict(Exception):
    """The stored status changed under a running pass (compare-and-set failed): the pass stops."""


@dataclass
class BranchErr:
    """A non-final branch result: ONGOING or an unknown result."""

    ongoing: bool
    text: str


@dataclass
class Pass:
    """One processing pass of one transaction, with the options it runs under."""

    rec: TransRecord
    opts: Options
    status: str
    last_touched: float
    retry_count: int = 0


class Runner:
    """Branch calls and status writes for passes, on top of the scheduler's lock and due times."""

    def __init__(self, sched: Scheduler, caller: BranchCaller, config: EngineConfig) -> None:
        self.sched = sched
        self.caller = caller
        self.config = config
        self.clock = sched.clock
        self.pool = ThreadPoolExecutor(config.workers, thread_name_prefix="dtm-branch")

    def close(self) -> None:
        """Wait for branch calls in flight."""
        self.pool.shutdown(wait=True)

    def is_timeout(self, p: Pass) -> bool:
        """True once the transaction is older than its timeout_to_fail (sagas: only their own)."""
        timeout = p.opts.timeout_to_fail
        if timeout == 0 and p.rec.trans_type != SAGA:
            timeout = self.config.timeout_to_fail
        if timeout == 0:
            return False
        return self.clock.now() - p.rec.create_time >= timeout

    def need_process(self, p: Pass) -> bool:
        """True when the pass has work: submitted, aborting, or prepared and timed out."""
        return p.status in (SUBMITTED, ABORTING) or (p.status == PREPARED and self.is_timeout(p))

    def touch(self, p: Pass, kind: str, delay: float = 0) -> None:
        """Set the transaction's next due time (see :meth:`Scheduler.touch`)."""
        p.last_touched = self.sched.touch(p.rec, p.opts, kind, delay)

    def change_status(self, p: Pass, status: str, reason: Optional[str] = None) -> None:
        """Write the global status if nobody changed it since the pass began."""
        with self.sched.lock:
            if p.rec.status != p.status:
                raise Conflict()
            self.sched.set_status(p.rec, status, reason)
            p.status = status

    def change_branch(self, p: Pass, b: BranchRecord, status: str) -> None:
        """Write a branch's final status if the global status is unchanged."""
        with self.sched.lock:
            if p.rec.status != p.status:
                raise Conflict()
            now = self.clock.now()
            b.status = status
            b.update_time = b.finish_time = now
            self.sched.store.save(p.rec)

    def call(self, p: Pass, url: str, branch_id: str, op: str, data: str) -> tuple[Optional[str], str]:
        """Call one branch URL; returns (SUCCESS | FAILURE | ONGOING | None for error, detail text)."""
        if not url:
            return RESULT_SUCCESS, ""
        rec = p.rec
        method = "POST" if data or rec.trans_type == XA else "GET"
        headers = {"Content-Type": "application/json", "Accept": "application/json", **p.opts.branch_headers}
        query = {"gid": rec.gid, "trans_type": rec.trans_type, "branch_id": branch_id, "op": op}
        timeout = p.opts.request_timeout or self.config.request_timeout
        if not 0 < timeout <= MAX_REQUEST_TIMEOUT:  # DTM: negative means none; sockets refuse huge ones
            timeout = MAX_REQUEST_TIMEOUT
        body = payload_bytes(data, rec.protocol) if data else None
        ans = self.caller.call(method, url, query, body, headers, timeout)
        logger.info("%s %s %s %s/%s -> %s", rec.gid, method, url, branch_id, op, ans.status or ans.text)
        if ans.status == 0:
            return None, ans.text
        text = go_trim(ans.text)  # DTM reads the reply through resty's String(): TrimSpace
        result = branch_result(ans.status, text)
        if result is None:
            return None, f"http response status: {ans.status}, Message: {text}"
        return result, text

    def exec_branch(self, p: Pass, b: BranchRecord) -> tuple[Optional[BranchErr], str]:
        """Run one branch and apply DTM's result and cron rules; returns (error, failure reason)."""
        result, text = self.call(p, b.url, b.branch_id, b.op, b.data)
        err: Optional[BranchErr] = None
        reason = ""
        if result == RESULT_SUCCESS:
            self.change_branch(p, b, SUCCEED)
        elif result == RESULT_FAILURE and p.rec.trans_type == SAGA and b.op == OP_ACTION:
            reason = f"url:{b.url} return failed: {with_failure(text)}"
            self.change_branch(p, b, FAILED)
        elif result == RESULT_ONGOING:
            err = BranchErr(True, RESULT_ONGOING)
        else:
            if result == RESULT_FAILURE:
                text = with_failure(text)
            err = BranchErr(
                False,
                "http/grpc result should be specified as in:\nhttps://dtm.pub/summary/arch.html#http\n"
                f"unkown result will be retried: {text}",
            )
        self._after_branch(p, err)
        return err, reason

    def _after_branch(self, p: Pass, err: Optional[BranchErr]) -> None:
        interval = p.rec.next_cron_interval
        grown = interval > self.config.retry_interval and interval > p.opts.retry_interval
        # Same precedence as DTM: a grown interval is reset after any result.
        if (err is None and self.clock.now() - p.last_touched >= 1.5) or grown:
            self.touch(p, "reset")
        elif err is not None and err.ongoing:
            self.touch(p, "keep")
        elif err is not None:
            self.touch(p, "backoff")
