"""The coordinator's scheduler: per-transaction locks, due times, and the cron tick (``run_due``).

It owns the shared lock and the set of unfinished transactions; a *pass* (one processing run of one
transaction) is delegated to the ``process`` callable it is given.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional

from .._consts import FAILED, SUCCEED
from ._clock import Clock
from ._rules import ACTIVE, INT64_MAX, OK, ApiResult, EngineConfig, due_time
from ._store import MemoryStore, Options, TransRecord

__all__ = ["Scheduler", "ProcessFn"]

logger = logging.getLogger("dtmcli.testing")

ProcessFn = Callable[[TransRecord, Options, bool], ApiResult]
"""``process(record, options, report)``: run one pass; ``report`` asks for the wait_result answer."""


class Scheduler:
    """Who may process which transaction when. Thread-safe; ``lock`` guards every record."""

    def __init__(self, store: MemoryStore, clock: Clock, config: EngineConfig, process: ProcessFn) -> None:
        self.store = store
        self.clock = clock
        self.config = config
        self.process = process
        self.lock = threading.RLock()
        self._cond = threading.Condition(self.lock)
        self._busy: set[str] = set()
        self._inflight = 0
        self.active = {r.gid for r in store.records() if r.status in ACTIVE}
        self._passes = ThreadPoolExecutor(config.workers, thread_name_prefix="dtm-pass")
        self._closed = False
        self.update_branch_sync = False
        """DTM's ``UpdateBranchSync``: store workflow progress rows even without ``sync`` in the body."""

    def close(self) -> None:
        """Stop accepting passes and wait for running ones."""
        self._closed = True
        self._passes.shutdown(wait=True)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no asynchronous pass is queued or running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._inflight == 0 and not self._busy, timeout)

    # -- records ---------------------------------------------------------------------------------

    def add(self, rec: TransRecord) -> bool:
        """Store a new unfinished transaction; False when the gid exists already."""
        with self.lock:
            if not self.store.add(rec):
                return False
            self.active.add(rec.gid)
            return True

    def set_status(self, rec: TransRecord, status: str, reason: Optional[str]) -> None:
        """Write a new global status (and its time stamps, and the rollback reason when given)."""
        now = self.clock.now()
        rec.status = status
        rec.update_time = now
        if status == SUCCEED:
            rec.finish_time = now
        elif status == FAILED:
            rec.rollback_time = now
        if reason is not None:
            rec.rollback_reason = reason
        if status not in ACTIVE:
            self.active.discard(rec.gid)
        self.store.save(rec)
        logger.info("%s %s -> %s%s", rec.trans_type, rec.gid, status, f" ({reason})" if reason else "")

    # -- due times -------------------------------------------------------------------------------

    def reset_interval(self, opts: Options) -> int:
        """The retry interval a transaction starts with (and returns to after progress)."""
        if opts.retry_interval:
            return opts.retry_interval
        if 0 < opts.timeout_to_fail < self.config.retry_interval:
            return opts.timeout_to_fail
        return self.config.retry_interval

    def touch(self, rec: TransRecord, opts: Options, kind: str, delay: float = 0) -> float:
        """Set the next due time: ``backoff`` doubles the interval, ``keep`` keeps it, else reset.

        A positive ``delay`` overrides the interval for this one wait. Returns the current time.
        """
        with self.lock:
            if kind == "backoff":
                interval = min(rec.next_cron_interval * 2, INT64_MAX)
            elif kind == "keep":
                interval = rec.next_cron_interval
            else:
                interval = self.reset_interval(opts)
            now = self.clock.now()
            rec.next_cron_interval = interval
            rec.next_cron_time = due_time(now, delay if delay > 0 else interval)
            self.store.save(rec)
            return now

    # -- locks and passes ------------------------------------------------------------------------

    def _acquire(self, gid: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: gid not in self._busy)
            self._busy.add(gid)

    def _release(self, gid: str) -> None:
        with self._cond:
            self._busy.discard(gid)
            self._cond.notify_all()

    def run(self, gid: str, opts: Options, wait: bool) -> ApiResult:
        """Run a pass for ``gid`` now (``wait``: and answer its result) or in the background."""
        if not wait:
            with self.lock:
                self._inflight += 1
            try:
                self._passes.submit(self._async_pass, gid, opts)
            except RuntimeError:  # shutting down
                with self._cond:
                    self._inflight -= 1
                    self._cond.notify_all()
            return OK
        self._acquire(gid)
        try:
            rec = self.store.get(gid)
            assert rec is not None
            return self.process(rec, opts, True)
        finally:
            self._release(gid)

    def _async_pass(self, gid: str, opts: Options) -> None:
        try:
            self._acquire(gid)
            try:
                rec = self.store.get(gid)
                if rec is not None:
                    self.process(rec, opts, False)
            finally:
                self._release(gid)
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def _active_records(self) -> Iterator[TransRecord]:
        for gid in list(self.active):
            rec = self.store.get(gid)
            if rec is not None:
                yield rec

    def next_due_time(self) -> Optional[float]:
        """The earliest ``next_cron_time`` of an unfinished transaction not being processed."""
        with self.lock:
            times = [r.next_cron_time for r in self._active_records() if r.gid not in self._busy]
        return min(times) if times else None

    def run_due(self, limit: Optional[int] = None) -> int:
        """One cron tick: lock and process (synchronously) what is due now; returns how many passes ran."""
        if self._closed:
            return 0
        now = self.clock.now()
        limit = self.config.max_passes_per_tick if limit is None else limit
        with self.lock:
            due = sorted(
                (r for r in self._active_records() if r.next_cron_time <= now and r.gid not in self._busy),
                key=lambda r: r.next_cron_time,
            )[:limit]
            for rec in due:  # locking pushes the next look one server RetryInterval away
                rec.next_cron_time = now + self.config.retry_interval
                self.store.save(rec)
        for rec in due:
            self._acquire(rec.gid)
            try:
                if rec.status in ACTIVE:
                    opts = rec.options.copy()
                    opts.wait_result = True
                    self.process(rec, opts, False)
            finally:
                self._release(rec.gid)
        return len(due)
