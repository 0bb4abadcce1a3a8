"""The read and admin API: query, all, forceStop, resetNextCronTime and resetCronTime."""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

from .._consts import FAILED, SUCCEED
from ._rules import INT64_MAX, INT64_MIN, OK, ApiResult, due_time, error, escape_gid, failure
from ._scheduler import Scheduler
from ._store import TransRecord
from ._wire import branch_json, decode_trans, trans_json

__all__ = ["all_trans", "force_stop", "query", "query_json", "reset_cron_time", "reset_next_cron_time"]

logger = logging.getLogger("dtmcli.testing")


_INT = re.compile(r"[+-]?[0-9]{1,19}")


def _int_param(params: Mapping[str, str], name: str, default: int) -> int:
    """A query parameter read as Go's ``strconv.Atoi`` reads it (an int64), or ``default`` when empty."""
    text = params.get(name) or ""
    if not text:
        return default
    if not _INT.fullmatch(text):
        raise error(f'strconv.Atoi: parsing "{text[:40]}": invalid syntax')
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise error(f'strconv.Atoi: parsing "{text}": value out of range')
    return value


def query_json(s: Scheduler, gid: str) -> dict[str, Any]:
    """What ``/query?gid=`` answers."""
    with s.lock:
        rec = s.store.get(gid)
        if rec is None:
            return {"transaction": None, "branches": []}
        return {"transaction": trans_json(rec), "branches": [branch_json(b, rec.protocol) for b in rec.branches]}


def query(s: Scheduler, params: Mapping[str, str], body: bytes) -> ApiResult:
    """``/query?gid=``."""
    gid = params.get("gid", "")
    if not gid:
        raise error("no gid specified")
    return 200, query_json(s, gid)


def all_trans(s: Scheduler, params: Mapping[str, str], body: bytes) -> ApiResult:
    """``/all``: newest first, filtered, paged by ``position``/``limit``."""
    limit = _int_param(params, "limit", 100)
    start = _int_param(params, "createTimeStart", 0) / 1000 if params.get("createTimeStart") else None
    end = _int_param(params, "createTimeEnd", 0) / 1000 if params.get("createTimeEnd") else None
    gid, status, trans_type, position = (params.get(k, "") for k in ("gid", "status", "transType", "position"))
    with s.lock:
        rows = sorted(s.store.records(), key=lambda r: r.seq, reverse=True)
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


def _existing(s: Scheduler, gid: str) -> TransRecord:
    """The stored transaction ``gid`` (under ``s.lock``), or DTM's error for an unknown gid."""
    rec = s.store.get(gid)
    if rec is None:
        raise error(f"no TransGlobal with gid: {gid} found")
    return rec


def force_stop(s: Scheduler, params: Mapping[str, str], body: bytes) -> ApiResult:
    """``/forceStop``: an unfinished transaction becomes failed, without compensation."""
    gid = escape_gid(decode_trans(body)["gid"])
    with s.lock:
        rec = _existing(s, gid)
        if rec.status in (SUCCEED, FAILED):
            raise failure(f"global transaction force stop error. status: {rec.status}. error: FAILURE")
        s.set_status(rec, FAILED, None)
    logger.info("force-stopped %s", gid)
    return OK


def reset_next_cron_time(s: Scheduler, params: Mapping[str, str], body: bytes) -> ApiResult:
    """``/resetNextCronTime``: the transaction is due now."""
    gid = escape_gid(decode_trans(body)["gid"])
    with s.lock:
        rec = _existing(s, gid)
        rec.next_cron_time = s.clock.now()
        s.store.save(rec)
    return OK


def reset_cron_time(s: Scheduler, params: Mapping[str, str], body: bytes) -> ApiResult:
    """``/resetCronTime``: transactions due later than ``timeout`` seconds from now become due now."""
    timeout = _int_param(params, "timeout", 3 * s.config.timeout_to_fail)
    limit = _int_param(params, "limit", 100)
    now = s.clock.now()
    count = 0
    remaining = False
    with s.lock:
        for gid in sorted(s.active):
            rec = s.store.get(gid)
            if rec is None or rec.next_cron_time <= due_time(now, timeout):
                continue
            if count >= limit:
                remaining = True
                break
            rec.next_cron_time = now
            s.store.save(rec)
            count += 1
    return 200, {"has_remaining": remaining, "succeed_count": count}
