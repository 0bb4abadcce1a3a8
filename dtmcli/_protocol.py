"""Pure wire logic: encoding bodies and payloads, reading answers. No I/O here.

Everything in this module is shared by the sync client, any future async or gRPC transport,
the branch-side helpers and the in-process coordinator, so each rule of docs/protocol.md
lives in one place.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from ._consts import (
    MAX_CUSTOM_DATA_LEN,
    RESULT_FAILURE,
    RESULT_ONGOING,
    RESULT_SUCCESS,
)
from .errors import (
    DtmError,
    DtmFailure,
    DtmInvalidInput,
    DtmOngoing,
    DtmServerError,
)

__all__ = [
    "Response",
    "dumps",
    "encode_payload",
    "encode_custom_data",
    "branch_result",
    "branch_error",
    "dtm_error",
    "parse_json_object",
    "client_branch_query",
    "go_trim",
    "with_failure",
]

_BODY_IN_ERRORS = 512


@dataclass(frozen=True)
class Response:
    """An HTTP answer as the SDK sees it: status and raw body."""

    status: int
    content: bytes

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (undecodable bytes replaced)."""
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON; ``None`` when it is empty, not JSON or nested too deeply to parse."""
        if not self.content:
            return None
        try:
            return json.loads(self.content)
        except (ValueError, RecursionError):
            return None


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON, the way Go's encoder writes it (no spaces, non-ASCII kept).

    Text UTF-8 cannot carry (a lone surrogate) raises DtmInvalidInput (a ValueError).
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise _lone_surrogate(exc, "JSON body", None) from None


def _lone_surrogate(exc: UnicodeEncodeError, what: str, gid: Optional[str]) -> DtmInvalidInput:
    char = exc.object[exc.start]
    return DtmInvalidInput(f"{what} holds a lone surrogate {char!r} at {exc.start}, which UTF-8 cannot carry", gid=gid)


def _jsonable(obj: Any) -> Any:
    """``json.dumps`` hook for payload values: dataclasses and pydantic models become plain JSON."""
    if dataclasses.is_dataclass(obj):
        instance: Any = obj  # a dataclass type, not an instance, makes asdict raise TypeError
        return dataclasses.asdict(instance)
    # Never imported here: a pydantic model can only exist when its user already imported pydantic.
    pydantic = sys.modules.get("pydantic")
    if pydantic is not None and isinstance(obj, pydantic.BaseModel) and hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _utf8_text(text: str, what: str, gid: Optional[str]) -> str:
    if not text.isascii():  # O(1) in CPython: the common ASCII payload costs nothing more
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise _lone_surrogate(exc, what, gid) from None
    return text


def encode_payload(payload: Any, *, gid: Optional[str] = None) -> str:
    """Turn a branch payload into the string DTM stores and sends as the branch's body.

    ``str`` is taken as raw text, ``bytes`` must be UTF-8; anything else is JSON-encoded
    (``None`` becomes ``"null"``, as the Go client sends for a nil body), with dataclasses and
    pydantic models (``model_dump(mode="json")``) turned into objects at any depth. ``""`` means
    "no body": DTM then calls the branch with GET. A value JSON cannot encode, nested too deeply,
    or holding a lone surrogate raises DtmInvalidInput.
    """
    if isinstance(payload, str):
        return _utf8_text(payload, "payload", gid)
    if isinstance(payload, (bytes, bytearray, memoryview)):
        try:
            return bytes(payload).decode("utf-8")
        except UnicodeDecodeError:
            raise DtmInvalidInput(
                "a bytes payload must be UTF-8 text: DTM's HTTP API carries payloads as JSON strings", gid=gid
            ) from None
    try:
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_jsonable)
    except RecursionError:
        raise DtmInvalidInput("payload is nested too deeply to encode as JSON", gid=gid) from None
    except (TypeError, ValueError) as exc:
        raise DtmInvalidInput(f"payload is not JSON-serialisable: {exc}", gid=gid) from None
    return _utf8_text(text, "payload", gid)


def encode_custom_data(data: Mapping[str, Any], *, gid: Optional[str] = None) -> str:
    """``custom_data`` is a JSON *string*; Go writes map keys sorted."""
    text = json.dumps(data, separators=(",", ":"), sort_keys=True)
    if len(text) > MAX_CUSTOM_DATA_LEN:
        raise DtmInvalidInput(
            f"custom_data is {len(text)} characters; DTM's SQL stores keep {MAX_CUSTOM_DATA_LEN}", gid=gid
        )
    return text


def branch_result(status: int, text: str) -> Optional[str]:
    """Read a branch's answer the way DTM does (protocol.md §4), in this order.

    425 or a body containing ONGOING → ONGOING; 409 or a body containing FAILURE → FAILURE;
    any other non-200 → ``None`` (an error, retried); 200 → SUCCESS.
    """
    if status == 425 or RESULT_ONGOING in text:
        return RESULT_ONGOING
    if status == 409 or RESULT_FAILURE in text:
        return RESULT_FAILURE
    if status != 200:
        return None
    return RESULT_SUCCESS


GO_SPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
"""What Go's ``strings.TrimSpace`` trims (``unicode.IsSpace``); Python's ``str.strip()`` also trims \\x1c-\\x1f."""


def go_trim(text: str) -> str:
    """A branch reply as DTM and the Go client read it (resty's ``String()`` trims white space)."""
    return text.strip(GO_SPACE)


def with_failure(text: str) -> str:
    """Go's ``ErrorMessage2Error(text, ErrFailure)`` text: one trailing `` FAILURE``, never two."""
    suffix = " " + RESULT_FAILURE
    return (text[: -len(suffix)] if text.endswith(suffix) else text) + suffix


def _clip(text: str) -> str:
    return text if len(text) <= _BODY_IN_ERRORS else text[:_BODY_IN_ERRORS] + "..."


def branch_error(
    resp: Response, *, url: str, gid: Optional[str], branch_id: Optional[str], op: Optional[str]
) -> Optional[DtmError]:
    """The typed error for a branch answer, or ``None`` when it is a success."""
    text = go_trim(resp.text)
    result = branch_result(resp.status, text)
    where: dict[str, Any] = {"gid": gid, "branch_id": branch_id, "op": op}
    if result == RESULT_SUCCESS:
        return None
    if result == RESULT_ONGOING:
        return DtmOngoing(f"{url} answered ONGOING ({resp.status}): {_clip(text)}", **where)
    if result == RESULT_FAILURE:
        # Same text the Go client builds, so rollback_reason reads the same: body + " FAILURE".
        return DtmFailure(with_failure(_clip(text)), **where)
    return DtmServerError(
        f"{url} answered HTTP {resp.status}: {_clip(text)}", status=resp.status, body=text, **where
    )


_SUCCESS_ANSWERED = frozenset(
    ("prepare", "submit", "abort", "registerBranch", "registerTccBranch", "registerXaBranch", "forceStop",
     "resetNextCronTime")
)
"""Paths whose handler returns nothing: DTM answers their success with 200 ``{"dtm_result":"SUCCESS"}``."""


def dtm_error(resp: Response, *, path: str, gid: Optional[str] = None) -> Optional[DtmError]:
    """The typed error for an answer from the DTM server, or ``None`` on success.

    DTM answers with status codes (protocol.md §0): 409 FAILURE, 425 ONGOING, other non-200 errors.
    Servers older than v1.10 answered 200 with ``dtm_result``; that field is honoured too. The
    substring rule is *not* applied to DTM's own answers: a 200 ``/query`` may legitimately contain
    "FAILURE" inside a rollback reason. A 200 whose body is not a JSON object (HTML, garbage, empty),
    or, on the calls that change a transaction (prepare, submit, abort, registerBranch, forceStop,
    resetNextCronTime), one without ``"dtm_result":"SUCCESS"``, did not come from DTM (a gateway, a
    login portal, another service at that URL): a DtmServerError, unlike the Go client, which only
    checks the status.
    """
    status = resp.status
    body = resp.json()
    message = ""
    dtm_result = None
    if isinstance(body, dict):
        message = str(body.get("message") or "")
        dtm_result = body.get("dtm_result")
    text = resp.text
    detail = message or _clip(text) or f"HTTP {status}"
    if status == 200 and dtm_result not in (RESULT_FAILURE, RESULT_ONGOING):
        if isinstance(body, dict) and (dtm_result == RESULT_SUCCESS or path not in _SUCCESS_ANSWERED):
            return None
        # DTM answers every call with a JSON object, and these calls with dtm_result SUCCESS (protocol.md
        # §0); anything else came from a proxy, a portal or another service at that URL, and the call did
        # not reach DTM: never report success.
        what = f"without \"dtm_result\":\"{RESULT_SUCCESS}\"" if isinstance(body, dict) else "that is not a JSON object"
        return DtmServerError(
            f"{path}: HTTP 200 with a body {what}, not an answer from DTM: {_clip(text)!r}",
            status=status, body=text, gid=gid,
        )
    if status == 425 or dtm_result == RESULT_ONGOING:
        return DtmOngoing(f"{path}: {detail}", gid=gid)
    if status == 409 or dtm_result == RESULT_FAILURE:
        return DtmFailure(f"{path}: {detail}", gid=gid)
    return DtmServerError(f"{path}: HTTP {status}: {detail}", status=status, body=text, gid=gid)


def parse_json_object(resp: Response, *, path: str, gid: Optional[str] = None) -> dict[str, Any]:
    """The body of a successful DTM answer as a JSON object, or DtmServerError."""
    body = resp.json()
    if not isinstance(body, dict):
        raise DtmServerError(
            f"{path}: expected a JSON object, got {_clip(resp.text)!r}", status=resp.status, body=resp.text, gid=gid
        )
    return body


def client_branch_query(
    dtm: str, gid: str, branch_id: str, trans_type: str, op: str, phase2_url: Optional[str] = None
) -> dict[str, str]:
    """Query string of a client-originated branch call (TCC try, XA action, msg query_prepared).

    Unlike DTM's own callbacks these carry ``dtm`` (what makes nested TCC possible) and, for XA,
    ``phase2_url``.
    """
    query = {"dtm": dtm, "gid": gid, "branch_id": branch_id, "trans_type": trans_type, "op": op}
    if phase2_url is not None:
        query["phase2_url"] = phase2_url
    return query


_URL_TOKEN = re.compile(r"([?&]token=)[^&#\s]*")


def redact_url(text: str) -> str:
    """``text`` (a URL, or a message holding one) with the value of every ``token`` query parameter (the
    workflow resume token) replaced by ``***``: what the SDK's log lines show."""
    return _URL_TOKEN.sub(r"\1***", text)
