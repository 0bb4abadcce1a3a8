"""Branch-side helpers: what a business service needs to answer DTM's calls.

* :class:`BranchInfo` is the identity of one branch call (``gid``, ``trans_type``, ``branch_id``,
  ``op``, and ``dtm`` / ``phase2_url`` on client-originated calls), parsed and validated from a
  query string. Bad input raises :class:`BranchRequestError` (answered 400), never a guess.
* :func:`success_response` / :func:`error_response` map an outcome to an HTTP status and a JSON
  body (protocol.md §0, §4); :func:`handle` runs a handler and does both. A returned
  ``{"dtm_result": "FAILURE" | "ONGOING"}`` means the same as the raised error
  (:func:`raise_for_result`). They are pure and framework-neutral: ``dtmcli.contrib.flask``,
  ``.fastapi`` and ``.django`` (and the barrier decorator) all reuse them.
* :func:`current_branch_info` is the call being handled in the current context (thread or asyncio
  task): a :class:`contextvars.ContextVar`, so concurrent requests on one event loop never see each
  other's call.
* :meth:`BranchInfo.require_dtm` checks a client-originated call's ``dtm`` against the trusted
  servers (:func:`set_dtm_servers`, ``DTMCLI_SERVER``), so a forged query cannot make the
  service send requests to a host of the caller's choosing.

This module never imports the barrier: ``BranchBarrier.from_info(info)`` goes the other way.

Framework integrations pass the parsed :class:`BranchInfo` to the handler as the keyword argument
``info``; a decorator placed between the integration and the handler (such as the barrier's) can
rely on finding it there.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterator, Mapping, Optional, Union

from . import _otel
from ._consts import (
    MAX_OP_LEN,
    MSG,
    OP_ACTION,
    OP_CANCEL,
    OP_COMMIT,
    OP_COMPENSATE,
    OP_CONFIRM,
    OP_MSG,
    OP_ROLLBACK,
    OP_TRY,
    RESULT_FAILURE,
    RESULT_ONGOING,
    RESULT_SUCCESS,
    SAGA,
    TCC,
    WORKFLOW,
    XA,
)
from ._dtm_servers import is_trusted_dtm, set_dtm_servers
from ._protocol import dumps
from ._validate import check_branch_id, check_http_url, check_received_gid
from .errors import BranchRequestError, DtmDuplicated, DtmError, DtmFailure, DtmInvalidInput, DtmOngoing

__all__ = [
    "BranchInfo",
    "BranchRequestError",
    "BranchResponse",
    "SUCCESS",
    "current_branch_info",
    "failure_allowed",
    "query_of",
    "raise_for_result",
    "set_dtm_servers",
    "load_payload",
    "success_response",
    "error_response",
    "handle",
    "handle_async",
    "handle_query",
    "handle_query_async",
    "handling",
    "parse_or_answer",
]

logger = logging.getLogger("dtmcli")

#: The body of a plain success answer.
SUCCESS: Mapping[str, str] = {"dtm_result": RESULT_SUCCESS}

# The ops DTM (or a client) calls for each transaction type; workflow ops are free-form because
# its resume callback is called with op=<workflow name> (protocol.md §5, §12).
_OPS: Mapping[str, frozenset[str]] = {
    SAGA: frozenset({OP_ACTION, OP_COMPENSATE}),
    TCC: frozenset({OP_TRY, OP_CONFIRM, OP_CANCEL}),
    XA: frozenset({OP_ACTION, OP_COMMIT, OP_ROLLBACK}),
    MSG: frozenset({OP_ACTION, OP_MSG}),
}
_FIELDS = ("gid", "trans_type", "branch_id", "op")


def failure_allowed(trans_type: str, op: str) -> bool:
    """Whether answering FAILURE is meaningful for this op (protocol.md §4, §13.3).

    Only a saga ``action``, a tcc ``try``, an xa ``action``, a msg's ``query_prepared`` (op ``msg``:
    FAILURE there means "roll the message back") and the workflow's own calls (but not its
    ``commit``/``rollback`` callbacks) may fail; DTM retries FAILURE anywhere else forever.
    """
    if trans_type == MSG:
        return op == OP_MSG
    if trans_type in (SAGA, XA):
        return op == OP_ACTION
    if trans_type == TCC:
        return op == OP_TRY
    if trans_type == WORKFLOW:
        return op not in (OP_COMMIT, OP_ROLLBACK)
    return False


def query_of(request: Any) -> Mapping[str, Any]:
    """The query-string mapping of a Flask/Werkzeug, Starlette/FastAPI or Django request.

    A plain mapping is returned as it is.
    """
    # Attributes first: a Starlette request is itself a Mapping (over its ASGI scope).
    for attr in ("query_params", "GET", "args"):  # Starlette, Django, Werkzeug
        query = getattr(request, attr, None)
        if query is not None and hasattr(query, "get"):
            return query  # type: ignore[no-any-return]
    if isinstance(request, Mapping):
        return request
    raise BranchRequestError(f"cannot read a query string from a {type(request).__name__}")


def _single(query: Mapping[str, Any], key: str) -> Optional[str]:
    """One query value as a str; None when absent. Repeated or non-str values are rejected."""
    getlist = getattr(query, "getlist", None)
    if callable(getlist):
        values = list(getlist(key))
    else:
        raw = query.get(key)
        values = [] if raw is None else list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if not values:
        return None
    if len(values) > 1:
        raise BranchRequestError(f"query parameter {key!r} is given {len(values)} times")
    value = values[0]
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BranchRequestError(f"query parameter {key!r} is not UTF-8") from None
    if not isinstance(value, str):
        raise BranchRequestError(f"query parameter {key!r} must be a string, not {type(value).__name__}")
    return value


@dataclass(frozen=True)
class BranchInfo:
    """The identity of one branch call, as DTM (or a client) put it in the query string.

    ``dtm`` and ``phase2_url`` are only present on client-originated calls (a TCC try, an XA
    action); DTM's own callbacks never carry them (protocol.md §4, §13.6).
    """

    gid: str
    trans_type: str
    branch_id: str
    op: str
    dtm: Optional[str] = None
    phase2_url: Optional[str] = None
    trace_context: Optional[Mapping[str, str]] = field(default=None, compare=False, repr=False)
    """The request's W3C ``traceparent``/``tracestate`` headers (read only when tracing is on)."""

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        gid = self.gid
        try:
            check_received_gid(gid)
            check_branch_id(self.branch_id, gid=gid)
        except BranchRequestError:
            raise
        except DtmInvalidInput as exc:
            raise BranchRequestError(exc.message, gid=exc.gid) from None
        where = {"gid": gid, "branch_id": self.branch_id}
        if self.trans_type not in _OPS and self.trans_type != WORKFLOW:
            raise BranchRequestError(f"unknown trans_type {self.trans_type!r}", **where)
        ops = _OPS.get(self.trans_type)
        op = self.op
        if not isinstance(op, str) or not op:
            raise BranchRequestError("op must be a non-empty str", **where)
        if ops is not None and op not in ops:
            raise BranchRequestError(
                f"unknown op {op[:40]!r} for a {self.trans_type} branch (expected one of {', '.join(sorted(ops))})",
                **where,
            )
        if len(op) > MAX_OP_LEN or not op.isprintable():
            # MAX_OP_LEN is the barrier table's op column: an op it cannot store is refused here.
            raise BranchRequestError(f"op {op[:40]!r} must be at most {MAX_OP_LEN} printable characters", **where)
        for name in ("dtm", "phase2_url"):
            value = getattr(self, name)
            if value is not None:
                try:
                    check_http_url(value, name, gid=gid)
                except DtmInvalidInput as exc:
                    raise BranchRequestError(exc.message, gid=gid, branch_id=self.branch_id, op=op) from None

    @classmethod
    def from_query(cls, query: Mapping[str, Any]) -> BranchInfo:
        """Parse and validate a query mapping (a dict, or a framework's multi-dict).

        Raises :class:`BranchRequestError` when ``gid``, ``trans_type``, ``branch_id`` or ``op`` is
        missing or malformed, a parameter is repeated, ``trans_type`` is unknown, ``op`` is not an
        op of that type, or ``dtm`` / ``phase2_url`` is present but not an http(s) URL. An empty
        ``dtm`` or ``phase2_url`` counts as absent.
        """
        if not isinstance(query, Mapping) and not hasattr(query, "get"):
            raise BranchRequestError(f"expected a query mapping, not {type(query).__name__}")
        values = {k: _single(query, k) for k in (*_FIELDS, "dtm", "phase2_url")}
        missing = [k for k in _FIELDS if not values[k]]
        if missing:
            raise BranchRequestError(
                f"not a DTM branch call: {', '.join(missing)} missing from the query", gid=values["gid"] or None
            )
        return cls(
            gid=str(values["gid"]),
            trans_type=str(values["trans_type"]),
            branch_id=str(values["branch_id"]),
            op=str(values["op"]),
            dtm=values["dtm"] or None,
            phase2_url=values["phase2_url"] or None,
        )

    @classmethod
    def from_request(cls, request: Any) -> BranchInfo:
        """Parse the query of a Flask, FastAPI/Starlette or Django request (or a plain mapping).

        With OpenTelemetry tracing on, the request's trace headers are kept in :attr:`trace_context`.
        """
        info = cls.from_query(query_of(request))
        trace = _otel.headers_of(request)
        if trace:
            object.__setattr__(info, "trace_context", trace)
        return info

    @property
    def failure_allowed(self) -> bool:
        """Whether this op may answer FAILURE (see :func:`failure_allowed`)."""
        return failure_allowed(self.trans_type, self.op)

    def require_dtm(self) -> str:
        """The ``dtm`` URL of a client-originated call, checked against the trusted DTM servers.

        The URL comes from whoever sent the request, and the caller is about to send requests to it
        (nested TCC, XA registration): once trusted servers are configured
        (:func:`dtmcli.set_dtm_servers` or ``DTMCLI_SERVER``), any other URL is refused, which
        closes that server-side request forgery. With nothing configured every URL is accepted and
        a warning is logged once. Raises BranchRequestError (400) when ``dtm`` is absent (e.g. a
        DTM callback) or not trusted.
        """
        if not self.dtm:
            raise BranchRequestError(
                "this call has no 'dtm' in its query: only client-originated calls (tcc try, xa action) carry it",
                **self._where(),
            )
        if not is_trusted_dtm(self.dtm):
            raise BranchRequestError(
                f"dtm {self.dtm[:80]!r} in the query is not a trusted DTM server (see dtmcli.set_dtm_servers)",
                **self._where(),
            )
        return self.dtm

    def require_phase2_url(self) -> str:
        """The ``phase2_url`` of an XA action; BranchRequestError when absent."""
        if not self.phase2_url:
            raise BranchRequestError(
                "this call has no 'phase2_url' in its query (only xa actions carry it)", **self._where()
            )
        return self.phase2_url

    def query(self) -> dict[str, str]:
        """The query parameters this info was parsed from (without absent ones)."""
        out = {k: getattr(self, k) for k in _FIELDS}
        for k in ("dtm", "phase2_url"):
            if getattr(self, k):
                out[k] = getattr(self, k)
        return out

    def _where(self) -> dict[str, str]:
        return {"gid": self.gid, "branch_id": self.branch_id, "op": self.op}


def load_payload(raw: Any, info: Optional[BranchInfo] = None) -> Any:
    """Decode a branch request body: ``None`` when empty, else its JSON value.

    Bodies that are not UTF-8 JSON raise :class:`BranchRequestError` (answered 400).
    """
    where = info._where() if info is not None else {}
    if raw is None:
        return None
    if isinstance(raw, (bytes, bytearray, memoryview)):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise BranchRequestError("the request body is not UTF-8", **where) from None
    if not isinstance(raw, str):
        raise BranchRequestError(f"the request body must be bytes or str, not {type(raw).__name__}", **where)
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BranchRequestError(f"the request body is not JSON: {exc}", **where) from None


@dataclass(frozen=True)
class BranchResponse:
    """What a branch handler answers: an HTTP status and a JSON object body."""

    status: int
    body: Mapping[str, Any]

    @property
    def content(self) -> bytes:
        """The body as compact UTF-8 JSON."""
        return dumps(self.body)

    @property
    def headers(self) -> dict[str, str]:
        """The response headers to send (just the content type)."""
        return {"Content-Type": "application/json"}


def _scrub(text: str, *words: str) -> str:
    # DTM reads the words FAILURE/ONGOING anywhere in a body (protocol.md §4); our own messages
    # must not change the meaning of the status code they go with.
    for word in words:
        text = text.replace(word, word.lower())
    return text


def _message(exc: BaseException) -> str:
    if isinstance(exc, DtmError):
        return exc.message
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _server_error(message: str) -> BranchResponse:
    return BranchResponse(500, {"message": _scrub(message, RESULT_FAILURE, RESULT_ONGOING)})


def raise_for_result(value: Any) -> None:
    """Raise what a handler's returned mapping means when its ``dtm_result`` is not SUCCESS.

    ``{"dtm_result": "FAILURE"}`` (the Go SDK's and the older PyPI dtmcli's idiom) raises
    :class:`DtmFailure` and ``"ONGOING"`` :class:`DtmOngoing`, with the mapping's ``message`` if it
    has one; any other ``dtm_result`` than ``"SUCCESS"`` is a handler bug (:class:`DtmError`,
    answered 500). Anything else returns.
    """
    if not isinstance(value, Mapping) or "dtm_result" not in value:
        return
    result = value["dtm_result"]
    if result == RESULT_SUCCESS:
        return
    if result in (RESULT_FAILURE, RESULT_ONGOING):
        message = value.get("message")
        text = message if isinstance(message, str) and message else f"the handler returned dtm_result {result}"
        raise DtmFailure(text) if result == RESULT_FAILURE else DtmOngoing(text)
    raise DtmError(f"the handler returned an unknown dtm_result {str(result)[:40]!r}")


def success_response(value: Any = None, info: Optional[BranchInfo] = None) -> BranchResponse:
    """The answer for a handler's return value: usually 200 ``{"dtm_result":"SUCCESS"}``.

    A returned mapping is merged into that body, unless its ``dtm_result`` is FAILURE or ONGOING:
    then the answer is the one for a raised DtmFailure / DtmOngoing (see :func:`raise_for_result`
    and :func:`error_response`, which keeps FAILURE to the ops that may fail). Any other
    non-``None`` value is sent under ``"data"``. A value that is not JSON-serialisable, or whose
    JSON contains the words FAILURE or ONGOING (DTM would misread the 200, protocol.md §4), is a
    handler bug: it is logged and answered 500.
    """
    if value is None:
        return BranchResponse(200, dict(SUCCESS))
    try:
        raise_for_result(value)
    except DtmError as exc:
        return error_response(exc, info)
    body: dict[str, Any] = dict(SUCCESS)
    if isinstance(value, Mapping):
        body.update(value)
        body["dtm_result"] = RESULT_SUCCESS
    else:
        body["data"] = value
    where = info._where() if info is not None else {}
    try:
        text = dumps(body).decode()
    except (TypeError, ValueError) as exc:
        logger.error("branch handler result is not JSON-serialisable (%s): %s", where, exc)
        return _server_error(f"handler result is not JSON-serialisable: {exc}")
    if RESULT_FAILURE in text or RESULT_ONGOING in text:
        logger.error(
            "branch handler result contains FAILURE/ONGOING, which DTM would misread; answering 500 (%s)", where
        )
        return _server_error("handler result contains a reserved word DTM reads as a result")
    return BranchResponse(200, body)


_HTTP_EXCEPTION_MODULES = ("starlette", "fastapi", "werkzeug")


def _http_exception(exc: BaseException) -> Optional[DtmError]:
    """What a web framework's HTTP exception with status 409 or 425 means to DTM (FAILURE, ONGOING).

    Starlette's/FastAPI's ``HTTPException`` and werkzeug's (Flask's ``abort``) are recognised by
    class, without importing the frameworks; any other status returns ``None``.
    """
    for cls in type(exc).__mro__:
        if cls.__name__ == "HTTPException" and cls.__module__.split(".")[0] in _HTTP_EXCEPTION_MODULES:
            break
    else:
        return None
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        status = getattr(exc, "code", None)  # werkzeug
    text = getattr(exc, "detail", None) or getattr(exc, "description", None)
    message = text if isinstance(text, str) and text else f"the handler raised HTTP {status}"
    if status == 409:
        return DtmFailure(message)
    if status == 425:
        return DtmOngoing(message)
    return None


def error_response(exc: BaseException, info: Optional[BranchInfo] = None) -> BranchResponse:
    """Map an exception raised by a branch handler to its answer.

    * :class:`DtmDuplicated` → 200 SUCCESS (the work was already done);
    * :class:`DtmFailure` → 409 ``{"dtm_result":"FAILURE","message":...}`` where FAILURE is allowed
      (see :func:`failure_allowed`); on any other op it is a handler bug DTM would retry forever,
      so it is logged as an error and answered 500;
    * :class:`DtmOngoing` → 425 ``{"dtm_result":"ONGOING","message":...}``;
    * a web framework's ``HTTPException`` with status 409 or 425 (FastAPI/Starlette
      ``HTTPException``, Flask's ``abort(409)``) → as DtmFailure or DtmOngoing: DTM reads those
      statuses so, and every integration answers them alike;
    * :class:`BranchRequestError` → 400 ``{"message":...}``;
    * anything else → 500 ``{"message":...}`` (DTM retries with backoff).
    """
    http = _http_exception(exc) if not isinstance(exc, DtmError) else None
    if http is not None:
        return error_response(http, info)
    message = _message(exc)
    if isinstance(exc, DtmDuplicated):
        return BranchResponse(200, dict(SUCCESS))
    if isinstance(exc, DtmFailure):
        if info is None or info.failure_allowed:
            return BranchResponse(409, {"dtm_result": RESULT_FAILURE, "message": _scrub(message, RESULT_ONGOING)})
        logger.error(
            "branch handler answered FAILURE on gid=%s branch_id=%s op=%s (%s): DTM accepts FAILURE only "
            "from a saga action, tcc try or xa action and would retry this forever; answering 500: %s",
            info.gid,
            info.branch_id,
            info.op,
            info.trans_type,
            message,
        )
        return _server_error(f"FAILURE is not allowed for op {info.op}: {message}")
    if isinstance(exc, DtmOngoing):
        return BranchResponse(425, {"dtm_result": RESULT_ONGOING, "message": message})
    if isinstance(exc, BranchRequestError):
        logger.warning("bad DTM branch request: %s", exc)
        return BranchResponse(400, {"message": _scrub(message, RESULT_FAILURE, RESULT_ONGOING)})
    where = info._where() if info is not None else {}
    logger.error("branch handler error (%s): %s", where, message, exc_info=exc)
    return _server_error(message)


def is_async_callable(func: Any) -> bool:
    """True for an ``async def`` function, also behind ``functools.partial`` or an object's ``__call__``."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or (callable(func) and inspect.iscoroutinefunction(type(func).__call__))


# The call being handled. A ContextVar, not a global or threading.local: concurrent requests served by one
# event loop (or one thread) each run in their own context, and a worker thread runs a copy of its caller's.
_CURRENT: ContextVar[Optional[BranchInfo]] = ContextVar("dtmcli_branch_info", default=None)


def current_branch_info() -> Optional[BranchInfo]:
    """The branch call being handled in this context (thread or asyncio task); ``None`` outside one.

    Set while an integration (Flask, FastAPI ``DtmRoute``, Django, :func:`handle`,
    :func:`handle_async`) runs a handler, sync or async, so code deep in the call stack can read the
    call without it being passed down. Concurrent requests each see their own.
    """
    return _CURRENT.get()


@contextlib.contextmanager
def handling(info: BranchInfo) -> Iterator[BranchInfo]:
    """Make ``info`` the :func:`current_branch_info` for the block (restored after; nests).

    With OpenTelemetry tracing on, the block also runs in a SERVER span continuing the request's trace.
    """
    outer = _CURRENT.get()
    token = _CURRENT.set(info)
    try:
        # An integration around a barrier-decorated handler handles the same call twice: one span.
        with contextlib.nullcontext() if outer is info else _otel.server_span(info, info.trace_context):
            yield info
    finally:
        _CURRENT.reset(token)


def parse_or_answer(query: Any) -> Union[BranchInfo, BranchResponse]:
    """The BranchInfo of ``query`` (a mapping or a framework request), or the 400 answer for a malformed one."""
    try:
        return BranchInfo.from_request(query)
    except BranchRequestError as exc:
        return error_response(exc)


def handle(info: BranchInfo, func: Callable[[], Any]) -> BranchResponse:
    """Run ``func()`` for the branch call ``info`` and map its result or exception to an answer.

    This is the framework-neutral core every integration (and the barrier decorator) calls.
    Only :class:`Exception` is mapped; ``KeyboardInterrupt`` and the like propagate.
    """
    with handling(info):
        try:
            value = func()
        except Exception as exc:
            resp = error_response(exc, info)
        else:
            resp = success_response(value, info)
        _otel.outcome(resp.status)
    return resp


async def handle_async(info: BranchInfo, func: Callable[[], Awaitable[Any]]) -> BranchResponse:
    """:func:`handle` for a coroutine function (awaited on the running loop)."""
    with handling(info):
        try:
            value = await func()
        except Exception as exc:
            resp = error_response(exc, info)
        else:
            resp = success_response(value, info)
        _otel.outcome(resp.status)
    return resp


def handle_query(query: Any, func: Callable[[BranchInfo], Any]) -> BranchResponse:
    """Parse ``query`` (a mapping or a framework request), then :func:`handle` ``func(info)``.

    A malformed query answers 400 without calling ``func``.
    """
    info = parse_or_answer(query)
    if isinstance(info, BranchResponse):
        return info
    return handle(info, lambda: func(info))


async def handle_query_async(query: Any, func: Callable[[BranchInfo], Awaitable[Any]]) -> BranchResponse:
    """:func:`handle_query` for a coroutine function: parse ``query``, then :func:`handle_async` ``func(info)``."""
    info = parse_or_answer(query)
    if isinstance(info, BranchResponse):
        return info
    return await handle_async(info, lambda: func(info))
