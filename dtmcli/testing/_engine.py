"""The coordinator's state machine: DTM's API rules and its processing of saga, tcc, xa and msg.

No sockets here: branch calls go through an injected :class:`BranchCaller` and time comes from an
injected :class:`Clock`, so the same engine runs under a manual clock in tests and in real time.
Behaviour follows shared/protocol.md §2-§6; deliberate differences are listed in the package docs.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

import shortuuid

from .._consts import (
    ABORTING,
    FAILED,
    MSG,
    OP_ACTION,
    OP_CANCEL,
    OP_COMMIT,
    OP_COMPENSATE,
    OP_CONFIRM,
    OP_MSG,
    OP_ROLLBACK,
    PREPARED,
    RESULT_FAILURE,
    RESULT_ONGOING,
    RESULT_SUCCESS,
    SAGA,
    SUBMITTED,
    SUCCEED,
    TCC,
    WORKFLOW,
    XA,
)
from .._protocol import branch_result
from ._branch_client import BranchCaller
from ._clock import Clock
from ._store import BranchRecord, MemoryStore, Options, TransRecord
from ._wire import BadInput, branch_json, decode_string_map, decode_trans, trans_json

__all__ = ["Engine", "EngineConfig", "ApiResult", "VERSION"]

logger = logging.getLogger("dtmcli.testing")

VERSION = "v1.19.0-dtmcli.testing"
ACTIVE = frozenset({PREPARED, SUBMITTED, ABORTING})
_SUPPORTED = frozenset({SAGA, TCC, XA, MSG})

ApiResult = tuple[int, dict[str, Any]]


@dataclass
class EngineConfig:
    """Server-wide defaults (DTM's config): seconds."""

    retry_interval: int = 10
    timeout_to_fail: int = 35
    request_timeout: int = 3
    max_passes_per_tick: int = 100
    workers: int = 16


class _ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message", ""))
        self.status = status
        self.body = body


def _failure(message: str) -> _ApiError:
    return _ApiError(409, {"dtm_result": RESULT_FAILURE, "message": message})


def _error(message: str) -> _ApiError:
    return _ApiError(500, {"message": message})


_OK: ApiResult = (200, {"dtm_result": RESULT_SUCCESS})


class _Conflict(Exception):
    """The stored status changed under a running pass (compare-and-set failed): the pass stops."""


@dataclass
class _BranchErr:
    """A non-final branch result: ONGOING or an unknown result."""

    ongoing: bool
    text: str


@dataclass
class _Pass:
    """One processing pass of one transaction, with the options it runs under."""

    rec: TransRecord
    opts: Options
    status: str
    last_touched: float
    retry_count: int = 0


def _escape_gid(gid: str) -> str:
    return gid.replace("\n", "").replace("\r", "").replace(";", "")


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


@dataclass
class _SagaCustom:
    concurrent: bool
    orders: dict[int, list[int]]


def _parse_saga_custom(custom: str, nsteps: int) -> _SagaCustom:
    if not custom:
        return _SagaCustom(False, {})
    try:
        raw = json.loads(custom)
    except ValueError as exc:
        raise _error(f"custom_data of a saga must be JSON text: {exc}") from None
    if not isinstance(raw, dict):
        raise _error("custom_data of a saga must be a JSON object")
    concurrent = raw.get("concurrent") or False
    if not isinstance(concurrent, bool):
        raise _error("json: cannot unmarshal into Go struct field cSagaCustom.concurrent of type bool")
    orders: dict[int, list[int]] = {}
    for key, pres in (raw.get("orders") or {}).items():
        try:
            index = int(key)
        except ValueError:
            raise _error(f"saga orders key {key!r} is not a step index") from None
        if not isinstance(pres, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in pres):
            raise _error(f"saga orders[{key}] must be a list of step indexes")
        for i in (index, *pres):
            if not 0 <= i < nsteps:
                raise _error(f"saga orders name step {i}, but the saga has {nsteps} steps")
        orders[index] = list(pres)
    return _SagaCustom(concurrent, orders)


def _msg_delay(custom: str) -> int:
    if not custom:
        return 0
    try:
        raw = json.loads(custom)
    except ValueError as exc:
        raise _error(f"custom_data of a msg must be JSON text: {exc}") from None
    delay = raw.get("delay", 0) if isinstance(raw, dict) else 0
    if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
        raise _error("json: cannot unmarshal into Go struct field cMsgCustom.delay of type uint64")
    return delay


class Engine:
    """DTM's rules over a store, a clock and a branch caller. Thread-safe."""

    def __init__(
        self,
        store: MemoryStore,
        clock: Clock,
        caller: BranchCaller,
        config: Optional[EngineConfig] = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.caller = caller
        self.config = config or EngineConfig()
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._busy: set[str] = set()
        self._inflight = 0
        self._active = {r.gid for r in store.records() if r.status in ACTIVE}
        self._passes = ThreadPoolExecutor(self.config.workers, thread_name_prefix="dtm-pass")
        self._branches = ThreadPoolExecutor(self.config.workers, thread_name_prefix="dtm-branch")
        self._closed = False
        self._routes: dict[str, Callable[[Mapping[str, str], bytes], ApiResult]] = {
            "newGid": self._api_new_gid,
            "prepare": self._api_prepare,
            "submit": self._api_submit,
            "abort": self._api_abort,
            "registerBranch": self._api_register,
            "registerTccBranch": self._api_register,
            "registerXaBranch": self._api_register,
            "query": self._api_query,
            "all": self._api_all,
            "forceStop": self._api_force_stop,
            "resetNextCronTime": self._api_reset_next_cron_time,
            "resetCronTime": self._api_reset_cron_time,
            "version": lambda q, b: (200, {"version": VERSION}),
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting passes and wait for running ones."""
        self._closed = True
        self._passes.shutdown(wait=True)
        self._branches.shutdown(wait=True)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no asynchronous pass is queued or running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._inflight == 0 and not self._busy, timeout)

    # -- HTTP-facing entry point ---------------------------------------------------------------

    def handle(self, method: str, path: str, query: Mapping[str, str], body: bytes) -> ApiResult:
        """Answer one API request: ``path`` is what follows ``/api/``."""
        if path == "ping":
            return 200, {"msg": "pong"}
        name = path[len("dtmsvr/") :] if path.startswith("dtmsvr/") else None
        route = self._routes.get(name or "")
        if route is None:
            if name in ("prepareWorkflow", "subscribe", "unsubscribe", "scanKV", "queryKV") or (
                name or ""
            ).startswith("topic/"):
                return 500, {"message": f"{name} is not supported by the dtmcli test coordinator"}
            return 404, {"message": "404 page not found"}
        try:
            return route(query, body)
        except _ApiError as exc:
            return exc.status, exc.body
        except BadInput as exc:
            return exc.status, {"message": str(exc)}

    # -- API -----------------------------------------------------------------------------------

    def _api_new_gid(self, query: Mapping[str, str], body: bytes) -> ApiResult:
        return 200, {"gid": str(shortuuid.uuid()), "dtm_result": RESULT_SUCCESS}

    def _new_record(self, t: dict[str, Any], status: str) -> TransRecord:
        gid = _escape_gid(t["gid"])
        trans_type = t["trans_type"]
        if not gid:
            raise _error("gid cannot be empty")
        if trans_type == WORKFLOW:
            raise _error("workflow transactions are not supported by the dtmcli test coordinator")
        if trans_type not in _SUPPORTED:
            raise _error(f"unknown trans type: {trans_type}")
        if t["protocol"] not in ("", "http"):
            raise _error(f"protocol {t['protocol']!r} is not supported by the dtmcli test coordinator (http only)")
        steps: list[dict[str, str]] = t["steps"]
        payloads: list[str] = list(t["payloads"])
        payloads.extend(s["data"] for s in steps if "data" in s)
        if len(payloads) < len(steps):
            raise _error(f"{len(steps)} steps but {len(payloads)} payloads")
        for step in steps:
            for key in (OP_ACTION, OP_COMPENSATE) if trans_type == SAGA else (OP_ACTION,):
                url = step.get(key, "")
                if url.startswith("topic://"):
                    raise _error(f"{url}: topics are not supported by the dtmcli test coordinator; use a URL")
                if url and not _is_http(url):
                    raise _error(f"bad url for http: {url}")
        if t["query_prepared"] and not _is_http(t["query_prepared"]):
            raise _error(f"bad url for http: {t['query_prepared']}")
        if trans_type == SAGA:
            _parse_saga_custom(t["custom_data"], len(steps))
        elif trans_type == MSG:
            _msg_delay(t["custom_data"])
        opts = self._options_of(t)
        now = self.clock.now()
        interval = self._reset_interval(opts)
        rec = TransRecord(
            gid=gid,
            trans_type=trans_type,
            status=status,
            steps=[dict(s) for s in steps],
            payloads=payloads[: len(steps)] if steps else payloads,
            custom_data=t["custom_data"],
            query_prepared=t["query_prepared"],
            protocol=t["protocol"] or "http",
            options=opts,
            create_time=now,
            update_time=now,
            next_cron_interval=interval,
            next_cron_time=now + interval,
        )
        for i, step in enumerate(steps):
            branch_id = f"{i + 1:02d}"
            ops = (OP_COMPENSATE, OP_ACTION) if trans_type == SAGA else (OP_ACTION,) if trans_type == MSG else ()
            for op in ops:
                rec.branches.append(
                    BranchRecord(gid, branch_id, op, step.get(op, ""), payloads[i], create_time=now, update_time=now)
                )
        return rec

    @staticmethod
    def _options_of(t: dict[str, Any]) -> Options:
        return Options(
            wait_result=t["wait_result"],
            timeout_to_fail=t["timeout_to_fail"],
            retry_interval=t["retry_interval"],
            request_timeout=t["request_timeout"],
            retry_limit=t["retry_limit"],
            branch_headers=dict(t["branch_headers"]),
            concurrent=t["concurrent"],
        )

    def _add(self, rec: TransRecord) -> bool:
        with self._lock:
            if not self.store.add(rec):
                return False
            self._active.add(rec.gid)
            return True

    def _api_prepare(self, query: Mapping[str, str], body: bytes) -> ApiResult:
        t = decode_trans(body)
        rec = self._new_record(t, PREPARED)
        with self._lock:
            if self._add(rec):
                logger.info("prepared %s %s", rec.trans_type, rec.gid)
                return _OK
            existing = self.store.get(rec.gid)
            assert existing is not None
            if existing.status != PREPARED:
                raise _failure(f"current status '{existing.status}', cannot prepare. FAILURE")
        return _OK

    def _api_submit(self, query: Mapping[str, str], body: bytes) -> ApiResult:
        t = decode_trans(body)
        rec = self._new_record(t, SUBMITTED)
        opts = rec.options
        with self._lock:
            if not self._add(rec):
                existing = self.store.get(rec.gid)
                assert existing is not None
                if existing.status == PREPARED:
                    opts = self._options_of(t)
                    existing.status = SUBMITTED
                    existing.update_time = self.clock.now()
                    existing.next_cron_interval = self._reset_interval(opts)
                    if t["rollback_reason"]:
                        existing.rollback_reason = t["rollback_reason"]
                    self.store.save(existing)
                elif existing.status == SUBMITTED:
                    # Deviation: DTM v1.19.0 runs a pass over branches rebuilt from the request body
                    # (re-calling succeeded saga actions; marking tcc/xa succeed without confirm).
                    # Here a resubmit runs one more pass over the stored state.
                    opts = self._options_of(t)
                else:
                    raise _failure(f"current status '{existing.status}', cannot sumbmit. FAILURE")
                rec = existing
        logger.info("submitted %s %s", rec.trans_type, rec.gid)
        return self._run(rec.gid, opts, opts.wait_result)

    def _api_abort(self, query: Mapping[str, str], body: bytes) -> ApiResult:
        t = decode_trans(body)
        gid = _escape_gid(t["gid"])
        with self._lock:
            rec = self.store.get(gid)
            if rec is None:
                raise _error(f"no TransGlobal with gid: {gid} found")
            if rec.trans_type == MSG and rec.status == PREPARED:
                self._set_status(rec, FAILED, t["rollback_reason"] or None)
                logger.info("aborted msg %s", gid)
                return _OK
            if rec.trans_type not in (TCC, XA) or rec.status not in (PREPARED, ABORTING):
                raise _failure(
                    f"trans type: '{rec.trans_type}' current status '{rec.status}', cannot abort. FAILURE"
                )
            self._set_status(rec, ABORTING, t["rollback_reason"] or None)
            opts = rec.options.copy()
        logger.info("aborting %s %s", rec.trans_type, gid)
        return self._run(gid, opts, opts.wait_result)

    def _api_register(self, query: Mapping[str, str], body: bytes) -> ApiResult:
        data = decode_string_map(body)
        gid, branch_id, trans_type = data.get("gid", ""), data.get("branch_id", ""), data.get("trans_type", "")
        if trans_type == TCC:
            rows = [(OP_CANCEL, data.get("cancel", ""), data.get("data", "")),
                    (OP_CONFIRM, data.get("confirm", ""), data.get("data", ""))]
        elif trans_type == XA:
            rows = [(OP_ROLLBACK, data.get("url", ""), ""), (OP_COMMIT, data.get("url", ""), "")]
        elif trans_type == WORKFLOW:
            raise _error("workflow transactions are not supported by the dtmcli test coordinator")
        else:
            raise _error(f"unknow trans type: {trans_type}")
        for _, url, _ in rows:
            if url and not _is_http(url):
                raise _error(f"bad url for http: {url}")
        with self._lock:
            rec = self.store.get(gid)
            if rec is None or rec.status != PREPARED:
                raise _failure(f"no trans with gid: {gid} status: prepared found FAILURE")
            taken = {(b.branch_id, b.op) for b in rec.branches}
            if any((branch_id, op) in taken for op, _, _ in rows):
                raise _error("storage: UniqueKeyConflict")
            now = self.clock.now()
            for op, url, payload in rows:
                rec.branches.append(BranchRecord(gid, branch_id, op, url, payload, create_time=now, update_time=now))
            self.store.save(rec)
        logger.info("registered %s branch %s of %s", trans_type, branch_id, gid)
        return _OK

    def _api_query(self, query: Mapping[str, str], body: bytes) -> ApiResult:
        gid = query.get("gid", "")
        if not gid:
            raise _error("no gid specified")
        return 200, self.query_json(gid)

    def query_json(self, gid: str) -> dict[str, Any]:
        """What ``/query?gid=`` answers."""
        with self._lock:
            rec = self.store.get(gid)
            if rec is None:
                return {"transaction": None, "branches": []}
            return {"transaction": trans_json(rec), "branches": [branch_json(b) for b in rec.branches]}

    def _api_all(self, query: Mapping[str, str], body: bytes) -> ApiResult:
        try:
            limit = int(query.get("limit") or 100)
            start = int(query["createTimeStart"]) / 1000 if query.get("createTimeStart") else None
            end = int(query["createTimeEnd"]) / 1000 if query.get("createTimeEnd") else None
        except ValueError as exc:
            raise _error(str(exc)) from None
        gid, status, trans_type, position = (query.get(k, "") for k in ("gid", "status", "transType", "position"))
        with self._lock:
            rows = sorted(self.store.records(), key=lambda r: r.seq, reverse=True)
            if gid:
                rows = [r for r in rows if r.gid == gid]
            if position:
                seq = next((r.seq for r in rows if r.gid == position), None)
                rows = [r for r in rows if seq is None or r.seq < seq]
            rows = [
                r
                for r in rows
                if (not status or r.status == status)
                and (not trans_type or r.trans_type == trans_type)
                and (start is None or r.create_time >= start)
                and (end is None or r.create_time <= end)
            ]
            page = rows[:limit]
            more = len(rows) > limit
            body_out = [trans_json(r) for r in page]
        next_position = page[-1].gid if more and page else ""
        return 200, {"transactions": body_out if body_out or not gid else None, "next_position": next_position}

    def _api_force_stop(self, query: Mapping[str, str], body: bytes) -> ApiResult:
        gid = _escape_gid(decode_trans(body)["gid"])
        with self._lock:
            rec = self.store.get(gid)
            if rec is None:
                raise _error(f"no TransGlobal with gid: {gid} found")
            if rec.status in (SUCCEED, FAILED):
                raise _failure(f"global transaction force stop error. status: {rec.status}. error: FAILURE")
            self._set_status(rec, FAILED, None)
        logger.info("force-stopped %s", gid)
        return _OK

    def _api_reset_next_cron_time(self, query: Mapping[str, str], body: bytes) -> ApiResult:
        gid = _escape_gid(decode_trans(body)["gid"])
        with self._lock:
            rec = self.store.get(gid)
            if rec is None:
                raise _error(f"no TransGlobal with gid: {gid} found")
            rec.next_cron_time = self.clock.now()
            self.store.save(rec)
        return _OK

    def _api_reset_cron_time(self, query: Mapping[str, str], body: bytes) -> ApiResult:
        try:
            timeout = int(query.get("timeout") or 3 * self.config.timeout_to_fail)
            limit = int(query.get("limit") or 100)
        except ValueError as exc:
            raise _error(str(exc)) from None
        now = self.clock.now()
        count = 0
        remaining = False
        with self._lock:
            for gid in sorted(self._active):
                rec = self.store.get(gid)
                if rec is None or rec.next_cron_time <= now + timeout:
                    continue
                if count >= limit:
                    remaining = True
                    break
                rec.next_cron_time = now
                self.store.save(rec)
                count += 1
        return 200, {"has_remaining": remaining, "succeed_count": count}

    # -- scheduling ----------------------------------------------------------------------------

    def _acquire(self, gid: str) -> None:
        with self._cond:
            self._cond.wait_for(lambda: gid not in self._busy)
            self._busy.add(gid)

    def _release(self, gid: str) -> None:
        with self._cond:
            self._busy.discard(gid)
            self._cond.notify_all()

    def _run(self, gid: str, opts: Options, wait: bool) -> ApiResult:
        if not wait:
            with self._lock:
                self._inflight += 1
            try:
                self._passes.submit(self._async_pass, gid, opts)
            except RuntimeError:  # shutting down
                with self._cond:
                    self._inflight -= 1
                    self._cond.notify_all()
            return _OK
        self._acquire(gid)
        try:
            rec = self.store.get(gid)
            assert rec is not None
            return self._process(rec, opts, report=True)
        finally:
            self._release(gid)

    def _async_pass(self, gid: str, opts: Options) -> None:
        try:
            self._acquire(gid)
            try:
                rec = self.store.get(gid)
                if rec is not None:
                    self._process(rec, opts, report=False)
            finally:
                self._release(gid)
        finally:
            with self._cond:
                self._inflight -= 1
                self._cond.notify_all()

    def next_due_time(self) -> Optional[float]:
        """The earliest ``next_cron_time`` of an unfinished transaction not being processed."""
        with self._lock:
            times = [
                r.next_cron_time for r in self._active_records() if r.gid not in self._busy
            ]
        return min(times) if times else None

    def _active_records(self) -> Iterator[TransRecord]:
        for gid in list(self._active):
            rec = self.store.get(gid)
            if rec is not None:
                yield rec

    def run_due(self, limit: Optional[int] = None) -> int:
        """One cron tick: lock and process (synchronously) what is due now; returns how many passes ran."""
        if self._closed:
            return 0
        now = self.clock.now()
        limit = self.config.max_passes_per_tick if limit is None else limit
        with self._lock:
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
                    self._process(rec, opts, report=False)
            finally:
                self._release(rec.gid)
        return len(due)

    # -- processing ----------------------------------------------------------------------------

    def _process(self, rec: TransRecord, opts: Options, report: bool) -> ApiResult:
        p = _Pass(rec, opts, rec.status, self.clock.now())
        submitting = p.status == SUBMITTED
        try:
            if rec.trans_type == SAGA:
                err = self._process_saga(p)
            elif rec.trans_type == MSG:
                err = self._process_msg(p)
            else:
                err = self._process_tcc_xa(p)
        except _Conflict:
            logger.info("%s changed status during a pass; pass stopped", rec.gid)
            if not report:
                return _OK
            # DTM's compare-and-set panics here; a waiting caller must not read it as success.
            return 500, {"message": f"status of {rec.gid} changed during the pass, now {rec.status}"}
        except _ApiError as exc:
            logger.error("processing %s failed: %s", rec.gid, exc)
            return exc.status, exc.body
        except Exception as exc:  # a bug or a bad stored value: report it, keep the coordinator alive
            logger.exception("processing %s failed", rec.gid)
            return 500, {"message": f"{type(exc).__name__}: {exc}"}
        if not report:
            return _OK
        if err is not None:
            if err.ongoing:
                return 425, {"dtm_result": RESULT_ONGOING, "message": RESULT_ONGOING}
            return 500, {"message": err.text}
        if submitting and rec.status != SUCCEED:
            if rec.rollback_reason:
                return 409, {"dtm_result": RESULT_FAILURE, "message": rec.rollback_reason}
            return 409, {"dtm_result": RESULT_FAILURE, "message": "wait result not return success: FAILURE"}
        return _OK

    def _is_timeout(self, p: _Pass) -> bool:
        timeout = p.opts.timeout_to_fail
        if timeout == 0 and p.rec.trans_type != SAGA:
            timeout = self.config.timeout_to_fail
        if timeout == 0:
            return False
        return self.clock.now() - p.rec.create_time >= timeout

    def _need_process(self, p: _Pass) -> bool:
        return p.status in (SUBMITTED, ABORTING) or (p.status == PREPARED and self._is_timeout(p))

    def _reset_interval(self, opts: Options) -> int:
        if opts.retry_interval:
            return opts.retry_interval
        if 0 < opts.timeout_to_fail < self.config.retry_interval:
            return opts.timeout_to_fail
        return self.config.retry_interval

    def _touch(self, p: _Pass, kind: str, delay: float = 0) -> None:
        rec = p.rec
        with self._lock:
            if kind == "backoff":
                interval = rec.next_cron_interval * 2
            elif kind == "keep":
                interval = rec.next_cron_interval
            else:
                interval = self._reset_interval(p.opts)
            now = self.clock.now()
            p.last_touched = now
            rec.next_cron_interval = interval
            rec.next_cron_time = now + (delay if delay > 0 else interval)
            self.store.save(rec)

    def _set_status(self, rec: TransRecord, status: str, reason: Optional[str]) -> None:
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
            self._active.discard(rec.gid)
        self.store.save(rec)
        logger.info("%s %s -> %s%s", rec.trans_type, rec.gid, status, f" ({reason})" if reason else "")

    def _change_status(self, p: _Pass, status: str, reason: Optional[str] = None) -> None:
        with self._lock:
            if p.rec.status != p.status:
                raise _Conflict()
            self._set_status(p.rec, status, reason)
            p.status = status

    def _change_branch(self, p: _Pass, b: BranchRecord, status: str) -> None:
        with self._lock:
            if p.rec.status != p.status:
                raise _Conflict()
            now = self.clock.now()
            b.status = status
            b.update_time = b.finish_time = now
            self.store.save(p.rec)

    def _call(self, p: _Pass, url: str, branch_id: str, op: str, data: str) -> tuple[Optional[str], str]:
        """Call one branch URL; returns (SUCCESS | FAILURE | ONGOING | None for error, detail text)."""
        if not url:
            return RESULT_SUCCESS, ""
        rec = p.rec
        method = "POST" if data or rec.trans_type == XA else "GET"
        headers = {"Content-Type": "application/json", "Accept": "application/json", **p.opts.branch_headers}
        query = {"gid": rec.gid, "trans_type": rec.trans_type, "branch_id": branch_id, "op": op}
        timeout = p.opts.request_timeout or self.config.request_timeout
        ans = self.caller.call(method, url, query, data.encode() if data else None, headers, timeout)
        logger.info("%s %s %s %s/%s -> %s", rec.gid, method, url, branch_id, op, ans.status or ans.text)
        if ans.status == 0:
            return None, ans.text
        result = branch_result(ans.status, ans.text)
        if result is None:
            return None, f"http response status: {ans.status}, Message: {ans.text}"
        return result, ans.text

    def _exec_branch(self, p: _Pass, b: BranchRecord) -> tuple[Optional[_BranchErr], str]:
        """Run one branch and apply DTM's result and cron rules; returns (error, failure reason)."""
        result, text = self._call(p, b.url, b.branch_id, b.op, b.data)
        err: Optional[_BranchErr] = None
        reason = ""
        if result == RESULT_SUCCESS:
            self._change_branch(p, b, SUCCEED)
        elif result == RESULT_FAILURE and p.rec.trans_type == SAGA and b.op == OP_ACTION:
            reason = f"url:{b.url} return failed: {text} {RESULT_FAILURE}"
            self._change_branch(p, b, FAILED)
        elif result == RESULT_ONGOING:
            err = _BranchErr(True, RESULT_ONGOING)
        else:
            if result == RESULT_FAILURE:
                text = f"{text} {RESULT_FAILURE}"
            err = _BranchErr(
                False,
                "http/grpc result should be specified as in:\nhttps://dtm.pub/summary/arch.html#http\n"
                f"unkown result will be retried: {text}",
            )
        self._after_branch(p, err)
        return err, reason

    def _after_branch(self, p: _Pass, err: Optional[_BranchErr]) -> None:
        interval = p.rec.next_cron_interval
        grown = interval > self.config.retry_interval and interval > p.opts.retry_interval
        # Same precedence as DTM: a grown interval is reset after any result.
        if (err is None and self.clock.now() - p.last_touched >= 1.5) or grown:
            self._touch(p, "reset")
        elif err is not None and err.ongoing:
            self._touch(p, "keep")
        elif err is not None:
            self._touch(p, "backoff")

    # tcc / xa

    def _process_tcc_xa(self, p: _Pass) -> Optional[_BranchErr]:
        if not self._need_process(p):
            return None
        if p.status == PREPARED and self._is_timeout(p):
            timeout = p.opts.timeout_to_fail or self.config.timeout_to_fail
            self._change_status(p, ABORTING, f"Timeout after {timeout} seconds")
        tcc = p.rec.trans_type == TCC
        if tcc:
            op = OP_CONFIRM if p.status == SUBMITTED else OP_CANCEL
        else:
            op = OP_COMMIT if p.status == SUBMITTED else OP_ROLLBACK
        branches = list(p.rec.branches)
        for b in reversed(branches) if tcc else branches:
            if b.op == op and b.status == PREPARED:
                err, _ = self._exec_branch(p, b)
                if err is not None:
                    return err
        self._change_status(p, SUCCEED if p.status == SUBMITTED else FAILED)
        return None

    # msg

    def _process_msg(self, p: _Pass) -> Optional[_BranchErr]:
        rec = p.rec
        if self._need_process(p) and p.status == PREPARED:
            result, text = self._call(p, rec.query_prepared, "00", OP_MSG, "")
            if result == RESULT_SUCCESS:
                self._change_status(p, SUBMITTED)
            elif result == RESULT_FAILURE:
                self._change_status(p, FAILED)
            elif result == RESULT_ONGOING:
                self._touch(p, "reset")
            else:
                logger.warning("query_prepared of %s: %s", rec.gid, text)
                self._touch(p, "backoff")
        if not self._need_process(p) or p.status == PREPARED:
            return None
        delay = _msg_delay(rec.custom_data)
        due = rec.create_time + delay
        if p.status == SUBMITTED and self.clock.now() < due:
            self._touch(p, "keep", delay=max(due - self.clock.now(), 0.001))
            return None
        todo = [b for b in rec.branches if b.op == OP_ACTION and b.status == PREPARED]
        if p.opts.concurrent or rec.options.concurrent:
            futures = [self._branches.submit(self._exec_branch, p, b) for b in todo]
            errors = [f.result()[0] for f in futures]
            first = next((e for e in errors if e is not None), None)
            if first is not None:
                return first
        else:
            for b in todo:
                err, _ = self._exec_branch(p, b)
                if err is not None:
                    return err
                if b.status != SUCCEED:
                    return None
        if all(b.status == SUCCEED for b in rec.branches if b.op == OP_ACTION):
            self._change_status(p, SUCCEED)
        return None

    # saga

    def _process_saga(self, p: _Pass) -> Optional[_BranchErr]:
        rec, opts = p.rec, p.opts
        timeout_reason = f"Timeout after {opts.timeout_to_fail} seconds"
        if p.status == SUBMITTED and self._is_timeout(p):
            self._change_status(p, ABORTING, timeout_reason)
        branches = list(rec.branches)
        n = len(branches)
        custom = _parse_saga_custom(rec.custom_data, n // 2)
        conc, orders = custom.concurrent, custom.orders
        corders: dict[int, list[int]] = {}
        for k, pres in orders.items():
            for pre in pres:
                corders.setdefault(pre, []).append(k)
        st = [b.status for b in branches]
        started = [False] * n
        a_to_start = sum(1 for b in branches if b.op == OP_ACTION and b.status == PREPARED)
        a_failed = sum(1 for b in branches if b.op == OP_ACTION and b.status == FAILED)
        a_succeed = c_to_start = c_succeed = 0
        failure = ""
        results: queue.Queue[tuple[int, str, str]] = queue.Queue()
        inflight = 0

        def should_run(cur: int) -> bool:
            if not conc and cur >= 2 and st[cur - 2] != SUCCEED:
                return False
            return all(st[pre * 2 + 1] == SUCCEED for pre in orders.get(cur // 2, ()))

        def rolled_back(i: int) -> bool:
            return st[i] == SUCCEED or st[i + 1] == PREPARED

        def should_rollback(cur: int) -> bool:
            if rolled_back(cur):
                return False
            if not conc and cur < n - 2 and not rolled_back(cur + 2):
                return False
            return all(rolled_back(2 * nxt) for nxt in corders.get(cur // 2, ()))

        def pick_actions() -> list[int]:
            return [c for c in range(1, n, 2) if not started[c] and st[c] == PREPARED and should_run(c)]

        def pick_compensates() -> list[int]:
            return [c for c in range(n - 2, -1, -2) if not started[c] and st[c] == PREPARED and should_rollback(c)]

        def run_one(i: int) -> None:
            reason = ""
            try:
                _, reason = self._exec_branch(p, branches[i])
            except _Conflict:
                reason = "conflict"
            except Exception:
                logger.exception("saga %s branch %s failed", rec.gid, branches[i].branch_id)
            results.put((i, branches[i].status, reason))

        def launch(picked: list[int]) -> None:
            nonlocal inflight
            for i in picked:
                started[i] = True
            for i in picked:
                inflight += 1
                if len(picked) == 1 and inflight == 1:
                    run_one(i)
                else:
                    self._branches.submit(run_one, i)

        def wait_one(drain: bool = False) -> None:
            nonlocal inflight, a_failed, a_succeed, c_succeed, failure
            i, status, reason = results.get()
            inflight -= 1
            st[i] = status
            if branches[i].op == OP_ACTION:
                if not drain and opts.retry_limit > 0 and status == PREPARED:
                    if p.retry_count < opts.retry_limit:
                        p.retry_count += 1
                        rec.retry_count = p.retry_count
                        launch_retry(i)
                        return
                    self._change_status(
                        p, ABORTING, f"RetryCount is greater than RetryLimit, RetryLimit: {opts.retry_limit}"
                    )
                    return
                if status == FAILED:
                    a_failed += 1
                    failure = reason
                elif status == SUCCEED:
                    a_succeed += 1
            elif status == SUCCEED:
                c_succeed += 1

        def launch_retry(i: int) -> None:
            nonlocal inflight
            inflight += 1
            if inflight == 1:
                run_one(i)
            else:
                self._branches.submit(run_one, i)

        while p.status == SUBMITTED and not self._is_timeout(p) and a_failed == 0:
            launch(pick_actions())
            if inflight == 0:
                break
            wait_one()
        while inflight:  # let actions already sent answer before deciding what to compensate
            wait_one(drain=True)
        if p.status == SUBMITTED and a_failed == 0 and a_to_start == a_succeed:
            self._change_status(p, SUCCEED)
            return None
        if p.status == SUBMITTED and a_failed > 0:
            self._change_status(p, ABORTING, failure or "fail message lost")
        if p.status == SUBMITTED and self._is_timeout(p):
            self._change_status(p, ABORTING, timeout_reason)
        if p.status == ABORTING:
            for i in pick_actions():  # runnable actions may have run: compensate them too
                started[i] = True
            for i in range(1, n, 2):
                if started[i] and st[i] == PREPARED:
                    st[i] = SUCCEED
            c_to_start = sum(1 for i in range(0, n, 2) if st[i] != SUCCEED and st[i + 1] != PREPARED)
        while p.status == ABORTING:
            launch(pick_compensates())
            if inflight == 0:
                break
            wait_one()
        if p.status == ABORTING and c_to_start == c_succeed:
            self._change_status(p, FAILED)
        return None

