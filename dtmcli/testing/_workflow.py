"""Workflow transactions: prepareWorkflow, workflow registerBranch and submit, and the resume cron.

What DTM v1.19.0 does (``dtmsvr/api.go``, ``trans_type_workflow.go``, ``trans_status.go``; protocol.md §12):

- ``prepareWorkflow`` stores a prepared workflow, or answers the stored transaction of that gid (of any
  type, in any status) with its branch rows as ``progresses``; never ``dtm_result``.
- A workflow ``registerBranch`` stores one progress row ``(branch_id, op, status, data)`` only when the
  body has a non-empty ``sync`` or the server runs with ``UpdateBranchSync``; otherwise DTM queues an
  update that boltdb and redis never apply, so it answers 200 and stores nothing (as here). A stored
  row needs a prepared transaction (409 otherwise); the same ``(branch_id, op)`` twice is a 500.
- ``submit`` of a workflow sets the status from ``req_extra`` directly (no branch is called); the gid
  must be prepared (500 ``storage: NotFound`` otherwise). On boltdb the row becomes the object built
  from the submit body, so ``/query`` then lacks ``custom_data``, ``query_prepared``, ``options``,
  ``create_time`` and the cron fields; this coordinator shows the same.
- The cron: a prepared workflow is first due ``next_cron_interval`` after prepareWorkflow
  (``retry_interval``, else ``timeout_to_fail`` when below the server RetryInterval, else RetryInterval,
  10 s); ``timeout_to_fail`` itself is never checked. Each pass calls ``query_prepared`` with ``gid``,
  ``trans_type=workflow``, ``branch_id=00``, ``op=<name>`` and the raw input bytes (POST, or GET when the
  input is empty) and ignores the answer: 200, 409, 425 and errors alike leave the status alone (the
  resumed client submits it), and the next pass comes one server RetryInterval after this one began,
  without backoff.

Deliberate differences (a test double should catch client bugs): ``gid`` over 128 characters and
``custom_data``, ``query_prepared``, ``result`` or ``rollback_reason`` over 1,024 are refused as DTM's SQL
stores refuse them (MySQL's strict-mode error text; boltdb would take them), and so is a stored progress
row whose data is over 65,535 bytes (the ``bin_data`` BLOB); ``custom_data`` is checked
at prepareWorkflow (DTM fails at each cron pass); prepareWorkflow needs ``trans_type`` workflow and the
http protocol; registerBranch needs a non-empty ``branch_id`` and ``op`` and a ``status`` of succeed or
failed; submit needs a final ``req_extra.status`` and a workflow.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .._consts import FINAL_STATUSES, PREPARED, RESULT_FAILURE, RESULT_ONGOING, RESULT_SUCCESS, WORKFLOW
from .._protocol import branch_result, go_trim, redact_url, with_failure
from ._pass import MAX_REQUEST_TIMEOUT, BranchErr, Pass, Runner
from ._rules import OK, ApiResult, due_time, error, escape_gid, failure, is_http, options_of
from ._scheduler import Scheduler
from ._store import BranchRecord, TransRecord
from ._wire import branch_json, decode_json, decode_trans, jtype, trans_json

__all__ = [
    "BIN_DATA_LIMIT",
    "COLUMN_LIMITS",
    "WorkflowCustom",
    "parse_workflow_custom",
    "prepare_workflow",
    "process_workflow",
    "register_workflow",
    "submit_workflow",
]

logger = logging.getLogger("dtmcli.testing")

COLUMN_LIMITS = {"gid": 128, "custom_data": 1024, "query_prepared": 1024, "result": 1024, "rollback_reason": 1024}
"""Characters DTM's SQL stores keep per column (``varchar(n)``, counted in characters on MySQL utf8mb4)."""

BIN_DATA_LIMIT = 65535
"""Bytes of a progress row's data DTM's MySQL store keeps (``trans_branch_op.bin_data`` is a BLOB)."""

_BRANCH_STATUSES = frozenset({"succeed", "failed"})
_B64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


@dataclass(frozen=True)
class WorkflowCustom:
    """A workflow's ``custom_data``: the workflow name and its input bytes."""

    name: str
    data: bytes


def _check_column(column: str, value: str) -> None:
    """Refuse what a SQL store refuses: more characters than the column holds."""
    if len(value) > COLUMN_LIMITS[column]:
        raise error(f"Error 1406 (22001): Data too long for column '{column}' at row 1")


def _go_base64(text: str) -> bytes:
    """``text`` decoded as Go's JSON decoder decodes a ``[]byte`` (standard alphabet, padded; CR/LF ignored).

    The error names about the byte Go's decoder names: the first bad character, else the start of an
    unfinished last group, else the first misplaced ``=``.
    """
    raw = text.encode().replace(b"\r", b"").replace(b"\n", b"")
    bad = next((i for i, c in enumerate(raw) if c not in _B64), None)
    if bad is None:
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            bad = len(raw) - len(raw) % 4 if len(raw) % 4 else raw.index(b"=")
    raise error(f"illegal base64 data at input byte {bad}")


def parse_workflow_custom(custom: str) -> WorkflowCustom:
    """Read ``custom_data`` (``{"name": ..., "data": <base64>}``) as DTM's cron reads it; 500 when it could not."""
    raw = decode_json(custom.encode())
    if raw is None:
        return WorkflowCustom("", b"")
    if not isinstance(raw, dict):
        raise error(f"json: cannot unmarshal {jtype(raw)} into Go value of type dtmsvr.cWorkflowCustom")
    name, data = raw.get("name"), raw.get("data")
    if name is not None and not isinstance(name, str):
        raise error(f"json: cannot unmarshal {jtype(name)} into Go struct field cWorkflowCustom.name of type string")
    if data is not None and not isinstance(data, str):
        raise error(f"json: cannot unmarshal {jtype(data)} into Go struct field cWorkflowCustom.data of type []uint8")
    return WorkflowCustom(name or "", _go_base64(data) if data else b"")


def _answer(rec: TransRecord) -> ApiResult:
    """prepareWorkflow's answer: the stored transaction and its branch rows (no ``dtm_result``)."""
    return 200, {"transaction": trans_json(rec), "progresses": [branch_json(b, rec.protocol) for b in rec.branches]}


def prepare_workflow(s: Scheduler, query: Mapping[str, str], body: bytes) -> ApiResult:
    """``/prepareWorkflow``: store a prepared workflow, or answer the stored transaction and progresses."""
    t = decode_trans(body)
    gid = escape_gid(t["gid"])
    if not gid:
        raise error("gid cannot be empty")
    if t["trans_type"] != WORKFLOW:
        raise error(f"prepareWorkflow needs trans_type 'workflow', not {t['trans_type']!r}")
    if t["protocol"] not in ("", "http"):
        raise error(f"protocol {t['protocol']!r} is not supported by the dtmcli test coordinator (http only)")
    if t["query_prepared"] and not is_http(t["query_prepared"]):
        raise error(f"bad url for http: {t['query_prepared']}")
    for column in ("gid", "custom_data", "query_prepared"):
        _check_column(column, gid if column == "gid" else t[column])
    if not t["custom_data"]:
        raise error("workflow custom_data is empty: unexpected end of JSON input")
    parse_workflow_custom(t["custom_data"])
    opts = options_of(t)
    now = s.clock.now()
    interval = s.reset_interval(opts)
    rec = TransRecord(
        gid=gid,
        trans_type=WORKFLOW,
        status=PREPARED,
        custom_data=t["custom_data"],
        query_prepared=t["query_prepared"],
        protocol="http",
        options=opts,
        create_time=now,
        update_time=now,
        next_cron_interval=interval,
        next_cron_time=due_time(now, interval),
    )
    with s.lock:
        if s.add(rec):
            logger.info("prepared workflow %s", gid)
            return _answer(rec)
        existing = s.store.get(gid)
        assert existing is not None
        return _answer(existing)


def register_workflow(s: Scheduler, data: Mapping[str, str]) -> ApiResult:
    """A workflow ``/registerBranch``: store one progress row when ``sync`` (or UpdateBranchSync) asks for it."""
    gid, branch_id = escape_gid(data.get("gid", "")), data.get("branch_id", "")
    op, status = data.get("op", ""), data.get("status", "")
    if not branch_id or not op:
        raise error("a workflow branch needs branch_id and op")
    if status not in _BRANCH_STATUSES:
        raise error(f"a workflow branch status must be succeed or failed, not {status!r}")
    if not data.get("sync") and not s.update_branch_sync:
        # DTM (UpdateBranchSync 0) only queues this; boltdb and redis never apply it.
        logger.info("workflow branch %s/%s of %s not stored (no sync)", branch_id, op, gid)
        return OK
    with s.lock:
        rec = s.store.get(gid)
        if rec is None or rec.status != PREPARED:
            raise failure(f"no trans with gid: {gid} status: prepared found FAILURE")
        if any(b.branch_id == branch_id and b.op == op for b in rec.branches):
            raise error("storage: UniqueKeyConflict")
        if len(data.get("data", "").encode("utf-8", "surrogatepass")) > BIN_DATA_LIMIT:
            raise error("Error 1406 (22001): Data too long for column 'bin_data' at row 1")
        rec.branches.append(BranchRecord(gid, branch_id, op, "", data.get("data", ""), status=status))
        s.store.save(rec)
    logger.info("stored workflow branch %s/%s %s of %s", branch_id, op, status, gid)
    return OK


def submit_workflow(s: Scheduler, t: dict[str, Any]) -> ApiResult:
    """A workflow ``/submit`` (decoded body): the final status, reason and result from ``req_extra``."""
    gid = escape_gid(t["gid"])
    extra: dict[str, str] = t["req_extra"]
    status, reason, result = extra.get("status", ""), extra.get("rollback_reason", ""), extra.get("result", "")
    if status not in FINAL_STATUSES:
        raise error(f"req_extra.status of a workflow submit must be succeed or failed, not {status!r}")
    _check_column("result", result)
    _check_column("rollback_reason", reason)
    with s.lock:
        rec = s.store.get(gid)
        if rec is None or rec.status != PREPARED:  # DTM's compare-and-set from prepared
            raise error("storage: NotFound")
        if rec.trans_type != WORKFLOW:
            raise error(f"{gid} is a {rec.trans_type} transaction, not a workflow")
        if result:
            rec.result = result
        rec.options = options_of(t)
        rec.protocol = t["protocol"] or "http"
        rec.submit_built = True
        s.set_status(rec, status, reason or None)
    return OK


def process_workflow(r: Runner, p: Pass) -> Optional[BranchErr]:
    """One cron pass: ask the resume URL to run the workflow again; the answer changes nothing here."""
    rec = p.rec
    if p.status in FINAL_STATUSES or not rec.query_prepared:  # DTM: an empty URL counts as success
        return None
    custom = parse_workflow_custom(rec.custom_data)
    headers = {"Content-Type": "application/json", "Accept": "application/json", **p.opts.branch_headers}
    query = {"gid": rec.gid, "trans_type": WORKFLOW, "branch_id": "00", "op": custom.name}
    timeout = p.opts.request_timeout or r.config.request_timeout
    if not 0 < timeout <= MAX_REQUEST_TIMEOUT:
        timeout = MAX_REQUEST_TIMEOUT
    method = "POST" if custom.data else "GET"
    ans = r.caller.call(method, rec.query_prepared, query, custom.data or None, headers, timeout)
    text = go_trim(ans.text)
    result = branch_result(ans.status, text) if ans.status else None
    logger.info("%s resume %s %s -> %s", rec.gid, method, redact_url(rec.query_prepared), ans.status or ans.text)
    if result == RESULT_SUCCESS:
        return None
    if result == RESULT_ONGOING:
        return BranchErr(True, RESULT_ONGOING)
    if result == RESULT_FAILURE:
        return BranchErr(False, with_failure(text))
    detail = ans.text if not ans.status else f"http response status: {ans.status}, Message: {text}"
    logger.warning("resume of workflow %s failed, retried in %d s: %s", rec.gid, r.config.retry_interval, detail)
    return BranchErr(False, detail)
