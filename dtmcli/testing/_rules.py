"""Shared rules of the coordinator: API errors, server settings, and checks of request fields.

Pure functions and small types, used by the API handlers, the scheduler and the processors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .._consts import ABORTING, MSG, PREPARED, RESULT_FAILURE, RESULT_SUCCESS, SAGA, SUBMITTED, TCC, XA
from ._store import Options
from ._wire import decode_json, jtype

__all__ = [
    "ACTIVE",
    "ApiError",
    "ApiResult",
    "EngineConfig",
    "OK",
    "SUPPORTED",
    "SagaCustom",
    "VERSION",
    "INT64_MAX",
    "INT64_MIN",
    "UINT64_MAX",
    "due_time",
    "error",
    "escape_gid",
    "failure",
    "is_http",
    "msg_delay",
    "options_of",
    "parse_saga_custom",
]

VERSION = "v1.19.0-dtmcli.testing"
INT64_MIN, INT64_MAX, UINT64_MAX = -(2**63), 2**63 - 1, 2**64 - 1
ACTIVE = frozenset({PREPARED, SUBMITTED, ABORTING})
SUPPORTED = frozenset({SAGA, TCC, XA, MSG})

ApiResult = tuple[int, dict[str, Any]]
OK: ApiResult = (200, {"dtm_result": RESULT_SUCCESS})


@dataclass
class EngineConfig:
    """Server-wide defaults (DTM's config): seconds."""

    retry_interval: int = 10
    timeout_to_fail: int = 35
    request_timeout: int = 3
    max_passes_per_tick: int = 100
    workers: int = 16


class ApiError(Exception):
    """An API answer other than success, raised from deep inside a handler."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message", ""))
        self.status = status
        self.body = body


def failure(message: str) -> ApiError:
    """DTM's 409 FAILURE answer."""
    return ApiError(409, {"dtm_result": RESULT_FAILURE, "message": message})


def error(message: str) -> ApiError:
    """DTM's 500 answer (what it sends for a rule broken by the request)."""
    return ApiError(500, {"message": message})


def escape_gid(gid: str) -> str:
    """The gid as DTM stores it (line breaks and ``;`` removed)."""
    return gid.replace("\n", "").replace("\r", "").replace(";", "")


def is_http(url: str) -> bool:
    """True for an http(s) URL."""
    return url.startswith(("http://", "https://"))


def options_of(t: dict[str, Any]) -> Options:
    """The options of a decoded prepare/submit body."""
    return Options(
        wait_result=t["wait_result"],
        timeout_to_fail=t["timeout_to_fail"],
        retry_interval=t["retry_interval"],
        request_timeout=t["request_timeout"],
        retry_limit=t["retry_limit"],
        branch_headers=dict(t["branch_headers"]),
        concurrent=t["concurrent"],
    )


@dataclass
class SagaCustom:
    """A saga's ``custom_data``: concurrency and the step dependencies (``orders``)."""

    concurrent: bool
    orders: dict[int, list[int]]


_INDEX = re.compile(r"[+-]?[0-9]{1,18}")


def _unmarshal_error(value: Any, field: str, gotype: str) -> ApiError:
    kind = f"number {value}" if isinstance(value, int) and not isinstance(value, bool) else jtype(value)
    return error(f"json: cannot unmarshal {kind} into Go struct field {field} of type {gotype}")


def _custom_object(custom: str, what: str) -> dict[str, Any]:
    """``custom_data`` parsed as Go would (depth, NaN and syntax errors become 500 answers)."""
    raw = decode_json(custom.encode())
    if raw is None:  # JSON null leaves Go's struct at its zero value
        return {}
    if not isinstance(raw, dict):
        raise error(f"json: cannot unmarshal {jtype(raw)} into Go value of type {what}")
    return raw


def parse_saga_custom(custom: str, nsteps: int) -> SagaCustom:
    """Check and read a saga's ``custom_data``; :class:`ApiError` (500) when DTM could not use it."""
    if not custom:
        return SagaCustom(False, {})
    raw = _custom_object(custom, "dtmsvr.cSagaCustom")
    concurrent = raw.get("concurrent")
    if concurrent is not None and not isinstance(concurrent, bool):
        raise _unmarshal_error(concurrent, "cSagaCustom.concurrent", "bool")
    raw_orders = raw.get("orders")
    if raw_orders is not None and not isinstance(raw_orders, dict):
        raise _unmarshal_error(raw_orders, "cSagaCustom.orders", "map[int][]int")
    orders: dict[int, list[int]] = {}
    for key, pres in (raw_orders or {}).items():
        if not _INDEX.fullmatch(key):
            raise error(f"saga orders key {key!r} is not a step index")
        index = int(key)
        if not isinstance(pres, list) or not all(isinstance(p, int) and not isinstance(p, bool) for p in pres):
            raise error(f"saga orders[{key}] must be a list of step indexes")
        for i in (index, *pres):
            if not 0 <= i < nsteps:
                raise error(f"saga orders name step {i}, but the saga has {nsteps} steps")
        orders[index] = list(pres)
    return SagaCustom(bool(concurrent), orders)


def msg_delay(custom: str) -> int:
    """The ``delay`` (seconds, a uint64) in a msg's ``custom_data``; :class:`ApiError` (500) when unusable."""
    if not custom:
        return 0
    delay = _custom_object(custom, "dtmsvr.cMsgCustom").get("delay")
    if delay is None:
        return 0
    if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay <= UINT64_MAX:
        raise _unmarshal_error(delay, "cMsgCustom.delay", "uint64")
    return delay


def due_time(now: float, seconds: float) -> float:
    """``now + seconds`` with ``seconds`` clamped to int64, so no stored interval overflows a float."""
    return now + float(min(max(seconds, INT64_MIN), INT64_MAX))
