"""Pure wire logic of the coordinator: strict Go-like decoding of request bodies, and /query rendering."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime, timezone
from typing import Any, Optional

from ._branch_client import GRPC, payload_bytes
from ._store import BranchRecord, TransRecord

__all__ = [
    "BadInput", "jtype", "decode_json", "encode_answer", "decode_trans", "decode_string_map", "trans_json",
    "branch_json", "fmt_time",
]


class BadInput(Exception):
    """A body DTM's decoder rejects; ``status`` is the HTTP code the server answers with."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


# TransGlobal's JSON fields and their Go types. Other keys are ignored, as Go ignores them.
_FIELDS = {
    "gid": "string",
    "trans_type": "string",
    "steps": "[]map[string]string",
    "payloads": "[]string",
    "custom_data": "string",
    "query_prepared": "string",
    "protocol": "string",
    "status": "string",
    "result": "string",
    "rollback_reason": "string",
    "options": "string",
    "ext_data": "string",
    "owner": "string",
    "wait_result": "bool",
    "concurrent": "bool",
    "timeout_to_fail": "int64",
    "retry_interval": "int64",
    "request_timeout": "int64",
    "retry_limit": "int64",
    "retry_count": "int64",
    "next_cron_interval": "int64",
    "branch_headers": "map[string]string",
    "req_extra": "map[string]string",
    "passthrough_headers": "[]string",
}


def jtype(value: Any) -> str:
    """The JSON type name Go's decoder uses in its messages."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _no_constant(name: str) -> Any:
    raise ValueError(f"invalid character '{name[0]}' looking for beginning of value")


def _go_json_error(exc: json.JSONDecodeError) -> str:
    doc, pos = exc.doc, exc.pos
    if pos >= len(doc) or exc.msg.startswith("Unterminated"):
        return "unexpected end of JSON input"
    ch = doc[pos]
    if exc.msg.startswith("Expecting property name"):
        return f"invalid character '{ch}' looking for beginning of object key string"
    if exc.msg.startswith("Expecting value"):
        return f"invalid character '{ch}' looking for beginning of value"
    if exc.msg.startswith("Expecting ':'"):
        return f"invalid character '{ch}' after object key"
    if exc.msg.startswith("Expecting ','"):
        return f"invalid character '{ch}' after object key:value pair"
    if exc.msg.startswith("Extra data"):
        return f"invalid character '{ch}' after top-level value"
    return f"invalid JSON: {exc.msg} at position {pos}"


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _replace_surrogates(value: Any) -> Any:
    """Lone UTF-16 surrogates (``"\\ud800"`` escapes) become U+FFFD, as in Go's decoder: they cannot be
    encoded as UTF-8, so stored they would break every later answer that shows them."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_replace_surrogates(k): _replace_surrogates(v) for k, v in value.items()}
    return value


def encode_answer(answer: Any) -> bytes:
    """An API answer as compact UTF-8 JSON; a lone surrogate (from an old store) is sent as U+FFFD."""
    text = json.dumps(answer, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode()


def decode_json(raw: bytes, status: int = 500) -> Any:
    """Parse a request body as Go does (no NaN/Infinity); errors become :class:`BadInput`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("invalid character in string literal (body is not UTF-8)", status) from None
    if not text.strip():
        raise BadInput("unexpected end of JSON input", status)
    try:
        value = json.loads(text, parse_constant=_no_constant)
        return _replace_surrogates(value) if _SURROGATE_ESCAPE.search(text) else value
    except json.JSONDecodeError as exc:
        raise BadInput(_go_json_error(exc), status) from None
    except ValueError as exc:
        raise BadInput(str(exc), status) from None
    except RecursionError:  # Go stops at 10000 levels; Python's parser at its recursion limit (~1000)
        raise BadInput("exceeded max depth", status) from None


def _check(value: Any, gotype: str, where: str, struct: bool = True) -> Any:
    """Check ``value`` against a Go type; returns the decoded value (zero value for null)."""
    prefix = "Go struct field " if struct else ""

    def fail(v: Any) -> BadInput:
        return BadInput(f"json: cannot unmarshal {jtype(v)} into {prefix}{where} of type {gotype}")

    if gotype == "string":
        if value is None:
            return ""
        if not isinstance(value, str):
            raise fail(value)
        return value
    if gotype == "bool":
        if value is None:
            return False
        if not isinstance(value, bool):
            raise fail(value)
        return value
    if gotype == "int64":
        if value is None:
            return 0
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float):
                raise BadInput(f"json: cannot unmarshal number {value} into {prefix}{where} of type int64")
            raise fail(value)
        if not -(2**63) <= value < 2**63:
            raise BadInput(f"json: cannot unmarshal number {value} into {prefix}{where} of type int64")
        return value
    if gotype == "[]string":
        if value is None:
            return []
        if not isinstance(value, list):
            raise fail(value)
        return [_check(v, "string", f"{where.split('field ')[-1]}.{i}", struct=False) for i, v in enumerate(value)]
    if gotype == "map[string]string":
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise fail(value)
        return {k: _check(v, "string", f"{where}.{k}") for k, v in value.items()}
    if gotype == "[]map[string]string":
        if value is None:
            return []
        if not isinstance(value, list):
            raise fail(value)
        return [_check(v, "map[string]string", f"{where}.{i}") for i, v in enumerate(value)]
    raise AssertionError(gotype)


def decode_trans(raw: bytes) -> dict[str, Any]:
    """Decode a prepare/submit/abort body into checked fields (absent fields get Go's zero values)."""
    body = decode_json(raw)
    if not isinstance(body, dict):
        raise BadInput(f"json: cannot unmarshal {jtype(body)} into Go value of type dtmsvr.TransGlobal")
    out: dict[str, Any] = {}
    for name, gotype in _FIELDS.items():
        out[name] = _check(body.get(name), gotype, f"TransGlobal.{name}")
    return out


def decode_string_map(raw: bytes) -> dict[str, str]:
    """Decode a registerBranch body (map[string]string); a wrong type answers 400 as gin's BindJSON does."""
    body = decode_json(raw, status=400)
    if not isinstance(body, dict):
        raise BadInput(f"json: cannot unmarshal {jtype(body)} into Go value of type map[string]string", 400)
    out: dict[str, str] = {}
    for key, value in body.items():
        if value is not None and not isinstance(value, str):
            raise BadInput(f"json: cannot unmarshal {jtype(value)} into Go struct field .{key} of type string", 400)
        out[key] = value or ""
    return out


# The range fmt_time renders, safe for any local offset on every platform: 1970 to 9999-01-01.
_MIN_TS = 0.0
_MAX_TS = datetime(9999, 1, 1, tzinfo=timezone.utc).timestamp()


def fmt_time(when: Optional[float]) -> Optional[str]:
    """RFC 3339 local time with offset, as Go's encoder writes a time.Time.

    Any number renders (clamped to 1970..9999), so no stored due time can break /query or /all.
    """
    if when is None:
        return None
    try:
        ts = float(when)
    except OverflowError:  # an int beyond float range
        ts = _MAX_TS if when > 0 else _MIN_TS
    ts = min(max(ts, _MIN_TS), _MAX_TS) if ts == ts else _MIN_TS  # ts != ts: NaN
    return datetime.fromtimestamp(ts).astimezone().isoformat()


def branch_json(b: BranchRecord, protocol: str = "http") -> dict[str, Any]:
    """One element of /query's ``branches`` (boltdb shape: ``id`` 0, ``bin_data`` base64 when non-empty)."""
    out: dict[str, Any] = {
        "id": 0,
        "create_time": fmt_time(b.create_time),
        "update_time": fmt_time(b.update_time),
        "gid": b.gid,
    }
    if b.url:  # omitempty, as DTM: workflow progress rows have none
        out["url"] = b.url
    if b.data:
        out["bin_data"] = base64.b64encode(payload_bytes(b.data, protocol)).decode()
    out.update(branch_id=b.branch_id, op=b.op, status=b.status)
    if b.finish_time is not None:
        out["finish_time"] = fmt_time(b.finish_time)
    if b.rollback_time is not None:
        out["rollback_time"] = fmt_time(b.rollback_time)
    return out


def trans_json(t: TransRecord) -> dict[str, Any]:
    """The ``transaction`` object of /query and /all (boltdb shape: steps, payloads, flattened options)."""
    out: dict[str, Any] = {
        "id": 0,
        "create_time": fmt_time(t.create_time),
        "update_time": fmt_time(t.update_time),
        "gid": t.gid,
        "trans_type": t.trans_type,
    }
    if t.steps:
        out["steps"] = [dict(s) for s in t.steps]
    if t.payloads and t.protocol != GRPC:  # DTM keeps gRPC's BinPayloads out of its JSON
        out["payloads"] = list(t.payloads)
    out["status"] = t.status
    if t.query_prepared:
        out["query_prepared"] = t.query_prepared
    out["protocol"] = t.protocol
    if t.finish_time is not None:
        out["finish_time"] = fmt_time(t.finish_time)
    if t.rollback_time is not None:
        out["rollback_time"] = fmt_time(t.rollback_time)
    if t.result:
        out["result"] = t.result
    if t.rollback_reason:
        out["rollback_reason"] = t.rollback_reason
    out["options"] = t.options.to_json_text()
    if t.custom_data:
        out["custom_data"] = t.custom_data
    out["next_cron_interval"] = t.next_cron_interval
    out["next_cron_time"] = fmt_time(t.next_cron_time)
    o = t.options
    for name in ("wait_result", "timeout_to_fail", "retry_interval", "request_timeout", "retry_limit"):
        if getattr(o, name):
            out[name] = getattr(o, name)
    if o.branch_headers:
        out["branch_headers"] = dict(o.branch_headers)
    if t.retry_count:
        out["retry_count"] = t.retry_count
    out["concurrent"] = o.concurrent
    if t.submit_built:  # a workflow after submit: boltdb stores the object built from the submit body
        for key in ("custom_data", "query_prepared", "options", "next_cron_interval", "next_cron_time"):
            out.pop(key, None)
        out["create_time"] = None
    return out
