"""The API that starts and ends transactions: prepare, submit, abort and branch registration.

Each handler takes the scheduler, the query and the raw body, and returns ``(status, answer)`` or
raises :class:`ApiError` / :class:`BadInput` (protocol.md §2).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from .._consts import (
    ABORTING,
    FAILED,
    MSG,
    OP_ACTION,
    OP_CANCEL,
    OP_COMMIT,
    OP_COMPENSATE,
    OP_CONFIRM,
    OP_ROLLBACK,
    PREPARED,
    SAGA,
    SUBMITTED,
    TCC,
    WORKFLOW,
    XA,
)
from ._branch_client import GRPC, bin_text, is_grpc_url
from ._rules import (
    OK,
    SUPPORTED,
    ApiResult,
    due_time,
    error,
    escape_gid,
    failure,
    is_http,
    msg_delay,
    options_of,
    parse_saga_custom,
)
from ._scheduler import Scheduler
from ._store import BranchRecord, TransRecord
from ._wire import decode_string_map, decode_trans
from ._workflow import register_workflow, submit_workflow

__all__ = ["abort", "prepare", "register", "submit"]

logger = logging.getLogger("dtmcli.testing")


def _url_ok(url: str, protocol: str) -> bool:
    """An http(s) URL, or a gRPC one in a ``grpc`` transaction (DTM calls http(s) URLs over HTTP in both)."""
    return is_http(url) or (protocol == GRPC and is_grpc_url(url))


def _new_record(s: Scheduler, t: dict[str, Any], status: str, binary: bool = False) -> TransRecord:
    """A checked record (with its branch rows) for a decoded prepare/submit body.

    ``binary``: the payloads are raw bytes as latin-1 text already (the gRPC API's ``BinPayloads``).
    """
    gid = escape_gid(t["gid"])
    trans_type = t["trans_type"]
    if not gid:
        raise error("gid cannot be empty")
    if trans_type == WORKFLOW:
        raise error("a workflow starts with prepareWorkflow (the dtmcli test coordinator refuses it here)")
    if trans_type not in SUPPORTED:
        raise error(f"unknown trans type: {trans_type}")
    protocol = t["protocol"] or "http"
    if protocol not in ("http", GRPC):
        raise error(f"protocol {protocol!r} is not supported by the dtmcli test coordinator (http and grpc only)")
    steps: list[dict[str, str]] = t["steps"]
    payloads: list[str] = list(t["payloads"])
    payloads.extend(st["data"] for st in steps if "data" in st)
    if protocol == GRPC and not binary:  # text from the HTTP API: its UTF-8 bytes
        payloads = [bin_text(p.encode()) for p in payloads]
    if len(payloads) < len(steps):
        raise error(f"{len(steps)} steps but {len(payloads)} payloads")
    for step in steps:
        for key in (OP_ACTION, OP_COMPENSATE) if trans_type == SAGA else (OP_ACTION,):
            url = step.get(key, "")
            if url.startswith("topic://"):
                raise error(f"{url}: topics are not supported by the dtmcli test coordinator; use a URL")
            if url and not _url_ok(url, protocol):
                raise error(f"bad url for {protocol}: {url}")
    if t["query_prepared"] and not _url_ok(t["query_prepared"], protocol):
        raise error(f"bad url for {protocol}: {t['query_prepared']}")
    if trans_type == SAGA:
        parse_saga_custom(t["custom_data"], len(steps))
    elif trans_type == MSG:
        msg_delay(t["custom_data"])
    opts = options_of(t)
    now = s.clock.now()
    interval = s.reset_interval(opts)
    rec = TransRecord(
        gid=gid,
        trans_type=trans_type,
        status=status,
        steps=[dict(st) for st in steps],
        payloads=payloads[: len(steps)] if steps else payloads,
        custom_data=t["custom_data"],
        query_prepared=t["query_prepared"],
        protocol=protocol,
        options=opts,
        create_time=now,
        update_time=now,
        next_cron_interval=interval,
        next_cron_time=due_time(now, interval),
    )
    for i, step in enumerate(steps):
        branch_id = f"{i + 1:02d}"
        ops = (OP_COMPENSATE, OP_ACTION) if trans_type == SAGA else (OP_ACTION,) if trans_type == MSG else ()
        for op in ops:
            rec.branches.append(
                BranchRecord(gid, branch_id, op, step.get(op, ""), payloads[i], create_time=now, update_time=now)
            )
    return rec


def prepare(s: Scheduler, query: Mapping[str, str], body: bytes, binary: bool = False) -> ApiResult:
    """``/prepare``: store a prepared msg/tcc/xa (again: fine while it is still prepared)."""
    t = decode_trans(body)
    rec = _new_record(s, t, PREPARED, binary)
    with s.lock:
        if s.add(rec):
            logger.info("prepared %s %s", rec.trans_type, rec.gid)
            return OK
        existing = s.store.get(rec.gid)
        assert existing is not None
        if existing.status != PREPARED:
            raise failure(f"current status '{existing.status}', cannot prepare. FAILURE")
    return OK


def submit(s: Scheduler, query: Mapping[str, str], body: bytes, binary: bool = False) -> ApiResult:
    """``/submit``: store (or move a prepared one to) submitted, then run a pass; a workflow's final status."""
    t = decode_trans(body)
    if t["trans_type"] == WORKFLOW:
        return submit_workflow(s, t)
    rec = _new_record(s, t, SUBMITTED, binary)
    opts = rec.options
    with s.lock:
        if not s.add(rec):
            existing = s.store.get(rec.gid)
            assert existing is not None
            if existing.status == PREPARED:
                opts = options_of(t)
                existing.status = SUBMITTED
                existing.update_time = s.clock.now()
                existing.next_cron_interval = s.reset_interval(opts)
                if t["rollback_reason"]:
                    existing.rollback_reason = t["rollback_reason"]
                s.store.save(existing)
            elif existing.status == SUBMITTED:
                # Deviation: DTM v1.19.0 runs a pass over branches rebuilt from the request body
                # (re-calling succeeded saga actions; marking tcc/xa succeed without confirm).
                # Here a resubmit runs one more pass over the stored state.
                opts = options_of(t)
            else:
                raise failure(f"current status '{existing.status}', cannot sumbmit. FAILURE")
            rec = existing
    logger.info("submitted %s %s", rec.trans_type, rec.gid)
    return s.run(rec.gid, opts, opts.wait_result)


def abort(s: Scheduler, query: Mapping[str, str], body: bytes) -> ApiResult:
    """``/abort``: fail a prepared msg, or roll back a prepared/aborting tcc or xa."""
    t = decode_trans(body)
    gid = escape_gid(t["gid"])
    with s.lock:
        rec = s.store.get(gid)
        if rec is None:
            raise error(f"no TransGlobal with gid: {gid} found")
        if rec.trans_type == MSG and rec.status == PREPARED:
            s.set_status(rec, FAILED, None)  # DTM keeps an abort's rollback_reason for tcc/xa only
            logger.info("aborted msg %s", gid)
            return OK
        if rec.trans_type not in (TCC, XA) or rec.status not in (PREPARED, ABORTING):
            raise failure(f"trans type: '{rec.trans_type}' current status '{rec.status}', cannot abort. FAILURE")
        s.set_status(rec, ABORTING, t["rollback_reason"] or None)
        opts = rec.options.copy()
    logger.info("aborting %s %s", rec.trans_type, gid)
    return s.run(gid, opts, opts.wait_result)


def register(s: Scheduler, query: Mapping[str, str], body: bytes, binary: bool = False) -> ApiResult:
    """``/registerBranch`` (and the tcc/xa aliases): add a branch's phase-2 rows to a prepared trans.

    ``binary``: ``data`` is raw bytes as latin-1 text already (the gRPC API's ``BusiPayload``).
    """
    data = decode_string_map(body)
    gid, branch_id, trans_type = data.get("gid", ""), data.get("branch_id", ""), data.get("trans_type", "")
    if trans_type == TCC:
        rows = [(OP_CANCEL, data.get("cancel", ""), data.get("data", "")),
                (OP_CONFIRM, data.get("confirm", ""), data.get("data", ""))]
    elif trans_type == XA:
        rows = [(OP_ROLLBACK, data.get("url", ""), ""), (OP_COMMIT, data.get("url", ""), "")]
    elif trans_type == WORKFLOW:
        return register_workflow(s, data)
    else:
        raise error(f"unknow trans type: {trans_type}")
    for _, url, _ in rows:
        if url and not _url_ok(url, GRPC):
            raise error(f"bad url for http: {url}")
    with s.lock:
        rec = s.store.get(gid)
        if rec is None or rec.status != PREPARED:
            raise failure(f"no trans with gid: {gid} status: prepared found FAILURE")
        for _, url, _ in rows:
            if url and not _url_ok(url, rec.protocol):
                raise error(f"bad url for {rec.protocol}: {url}")
        if rec.protocol == GRPC and not binary:
            rows = [(op, url, bin_text(payload.encode())) for op, url, payload in rows]
        taken = {(b.branch_id, b.op) for b in rec.branches}
        if any((branch_id, op) in taken for op, _, _ in rows):
            raise error("storage: UniqueKeyConflict")
        now = s.clock.now()
        for op, url, payload in rows:
            rec.branches.append(BranchRecord(gid, branch_id, op, url, payload, create_time=now, update_time=now))
        s.store.save(rec)
    logger.info("registered %s branch %s of %s", trans_type, branch_id, gid)
    return OK
