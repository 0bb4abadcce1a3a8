"""Pure gRPC wire rules (no I/O): branch URLs, payloads, the DtmRequest built from a transaction
body, metadata, and how gRPC status codes read as DTM results (protocol.md §11)."""

from __future__ import annotations

import base64
import json
import re
from typing import Any, Mapping, Optional

from google.protobuf.message import Message

from .._consts import MAX_URL_LEN, RESULT_FAILURE, RESULT_ONGOING, RESULT_SUCCESS
from .._protocol import Response, dumps
from .._validate import check_http_url
from ..errors import (
    DtmError,
    DtmFailure,
    DtmInvalidInput,
    DtmOngoing,
    DtmServerError,
    DtmTimeout,
    DtmTransportError,
)
from ._proto import dtmgimp_pb2 as pb

__all__ = [
    "DTM_METHODS",
    "META_PREFIX",
    "branch_metadata",
    "branch_result",
    "check_branch_headers",
    "check_grpc_target",
    "check_grpc_url",
    "dtm_branch_request",
    "dtm_request",
    "encode_grpc_payload",
    "go_code_name",
    "go_json",
    "rpc_error",
    "rpc_error_text",
    "split_grpc_url",
    "success_response",
]

# HTTP path of a DTM call (what the shared flows name) -> dtmgimp.Dtm method.
DTM_METHODS = {
    "newGid": "NewGid",
    "prepare": "Prepare",
    "submit": "Submit",
    "abort": "Abort",
    "registerBranch": "RegisterBranch",
    "prepareWorkflow": "PrepareWorkflow",
}

META_PREFIX = "dtm-"

# host:port (a name, IPv4 or [IPv6]).
_HOST_PORT = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::\d{1,5})?"
_HOST_PORT_RE = re.compile(_HOST_PORT)
# A target of the client's own channel to DTM may sit behind a gRPC resolver scheme (dns:///, etcd://...),
# never http(s) (a URL is not a gRPC target).
_TARGET_RE = re.compile(r"(?:(?!https?://)[a-z][a-z0-9+.-]*://[^/\s]*/)?" + _HOST_PORT)
# <host:port>/<package.Service>/<Method>
_URL_RE = re.compile(r"(?P<target>\S+?)(?P<method>/[A-Za-z_][\w.]*/[A-Za-z_]\w*)")


def check_grpc_target(target: Any, what: str = "DTM gRPC target", *, gid: Optional[str] = None) -> str:
    """A gRPC target such as ``localhost:36790`` or ``dns:///dtm:36790``; DtmInvalidInput otherwise."""
    if not isinstance(target, str) or not _TARGET_RE.fullmatch(target):
        hint = " (a gRPC target is host:port, not a URL)" if isinstance(target, str) and "://" in target else ""
        raise DtmInvalidInput(f"{what} {target!r} is not a gRPC target host:port{hint}", gid=gid)
    return target


def _grpc_url_problem(url: str) -> str:
    """Why ``url`` is not a branch URL DTM can call over gRPC (``""`` when it is one)."""
    match = _URL_RE.fullmatch(url)
    if match is None:
        return "is not a gRPC URL host:port/package.Service/Method"
    if not _HOST_PORT_RE.fullmatch(match.group("target")):
        if "://" in match.group("target"):
            return ("is not a gRPC URL host:port/package.Service/Method (resolver schemes such as dns:/// are not "
                    "supported: DTM's default gRPC driver calls host:port only)")
        return "is not a gRPC URL host:port/package.Service/Method"
    return ""


def split_grpc_url(url: str) -> tuple[str, str]:
    """``host:port/pkg.Svc/Method`` -> (``host:port``, ``/pkg.Svc/Method``); DtmInvalidInput for anything else."""
    problem = _grpc_url_problem(url) if isinstance(url, str) else "is not a str"
    if problem:
        raise DtmInvalidInput(f"{url!r} {problem}")
    match = _URL_RE.fullmatch(url)
    assert match is not None
    return match.group("target"), match.group("method")


def check_grpc_url(
    url: Any, what: str, *, gid: Optional[str] = None, allow_empty: bool = False, allow_http: bool = False
) -> str:
    """A gRPC branch URL ``host:port/package.Service/Method``, as DTM calls it (protocol.md §11).

    ``allow_http``: an absolute http(s) URL is accepted too, for a branch DTM itself calls (saga and
    msg steps, tcc confirm/cancel): DTM calls any http(s) URL over HTTP, in a gRPC transaction too.
    DTM matches ``http://`` / ``https://`` case-sensitively, so an upper-case scheme is refused.
    """
    if allow_empty and url == "":
        return ""
    if isinstance(url, str) and len(url) > MAX_URL_LEN:
        raise DtmInvalidInput(f"{what} {url[:60]!r}... is longer than the {MAX_URL_LEN} characters DTM keeps", gid=gid)
    if isinstance(url, str) and url[:8].lower().startswith(("http://", "https://")):
        if not url.startswith(("http://", "https://")):
            raise DtmInvalidInput(
                f"{what} {url!r}: write the scheme in lower case (http:// or https://): DTM tells HTTP from gRPC "
                "branches by the exact lower-case prefix and would call this one over gRPC", gid=gid,
            )
        if allow_http:
            return check_http_url(url, what, gid=gid)
    problem = _grpc_url_problem(url) if isinstance(url, str) else "is not a gRPC URL host:port/package.Service/Method"
    if problem:
        raise DtmInvalidInput(f"{what} {url!r} {problem}", gid=gid)
    return str(url)


def encode_grpc_payload(payload: Any, *, gid: Optional[str] = None) -> bytes:
    """The bytes DTM stores and sends to a gRPC branch: a protobuf message serialised, or bytes as given.

    ``None`` is the empty message (0 bytes). Anything else raises DtmInvalidInput: JSON values belong
    to the HTTP builders.
    """
    if isinstance(payload, Message):
        return payload.SerializeToString()
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    if payload is None:
        return b""
    raise DtmInvalidInput(
        f"a gRPC payload is a protobuf message or bytes, not {type(payload).__name__}", gid=gid
    )


_GO_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
_GO_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")


def go_json(value: Any) -> str:
    """JSON text as Go's ``json.Marshal`` writes it: compact, map keys sorted, ``<>&`` and U+2028/9
    escaped, ``null`` for no value (the ``Steps`` of a TCC/XA)."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True, allow_nan=False)
    return _GO_ESCAPE_RE.sub(lambda m: _GO_ESCAPES[str(m.group())], text)  # only ever inside strings


def _options(body: Mapping[str, Any]) -> pb.DtmTransOptions:
    headers = body.get("branch_headers") or {}
    check_branch_headers(headers, gid=body.get("gid"))  # DTM sends them as gRPC metadata; sent as given
    return pb.DtmTransOptions(
        WaitResult=bool(body.get("wait_result", False)),
        TimeoutToFail=int(body.get("timeout_to_fail") or 0),
        RetryInterval=int(body.get("retry_interval") or 0),
        BranchHeaders=dict(headers),
        RequestTimeout=int(body.get("request_timeout") or 0),
        RetryLimit=int(body.get("retry_limit") or 0),
    )


def dtm_request(body: Mapping[str, Any]) -> pb.DtmRequest:
    """The DtmRequest for a prepare/submit/abort body of the shared builders (protocol.md §1 keys).

    ``payloads`` must be bytes here (the gRPC builders' proto-encoded branch requests). ``concurrent``
    and ``protocol`` have no gRPC field (DTM sets the protocol to grpc itself); like the Go client,
    ``TransOptions`` is always present and ``Steps`` is JSON text (``null`` without steps).
    """
    payloads = body.get("payloads") or []
    for payload in payloads:
        if not isinstance(payload, bytes):
            raise DtmInvalidInput(
                f"a gRPC payload must be bytes, not {type(payload).__name__}: use the dtmcli.grpc builders",
                gid=body.get("gid"),
            )
    return pb.DtmRequest(
        Gid=str(body.get("gid", "")),
        TransType=str(body.get("trans_type", "")),
        TransOptions=_options(body),
        CustomedData=str(body.get("custom_data") or ""),
        BinPayloads=payloads,
        QueryPrepared=str(body.get("query_prepared") or ""),
        Steps=go_json(body.get("steps")),
        ReqExtra=dict(body.get("req_extra") or {}),
        RollbackReason=str(body.get("rollback_reason") or ""),
    )


_BRANCH_FIELDS = frozenset({"gid", "trans_type", "branch_id", "op", "busi_payload"})


def dtm_branch_request(body: Mapping[str, Any]) -> pb.DtmBranchRequest:
    """The DtmBranchRequest for a registerBranch body: its string fields other than gid, trans_type,
    branch_id and op go to ``Data``; ``busi_payload`` (bytes) to ``BusiPayload`` (protocol.md §3)."""
    data = {k: v for k, v in body.items() if k not in _BRANCH_FIELDS}
    for key, value in data.items():
        if not isinstance(value, str):
            raise DtmInvalidInput(f"registerBranch field {key!r} must be a str, not {type(value).__name__}")
    payload = body.get("busi_payload") or b""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise DtmInvalidInput(f"registerBranch busi_payload must be bytes, not {type(payload).__name__}",
                              gid=body.get("gid"))
    return pb.DtmBranchRequest(
        Gid=str(body.get("gid", "")),
        TransType=str(body.get("trans_type", "")),
        BranchID=str(body.get("branch_id", "")),
        Op=str(body.get("op", "")),
        Data=data,
        BusiPayload=bytes(payload),
    )


def success_response(reply: Message) -> Response:
    """A successful DTM reply as the Response the shared flows read (``dtm_result`` SUCCESS, plus
    ``gid`` for NewGid, ``transaction`` and ``progresses`` for PrepareWorkflow)."""
    answer: dict[str, Any] = {"dtm_result": "SUCCESS"}
    if isinstance(reply, pb.DtmGidReply):
        answer["gid"] = reply.Gid
    elif isinstance(reply, pb.DtmProgressesReply):  # the HTTP prepareWorkflow answer's shape (protocol.md §12)
        trans = reply.Transaction
        answer["transaction"] = {"gid": trans.Gid, "status": trans.Status, "rollback_reason": trans.RollbackReason,
                                 "result": trans.Result}
        answer["progresses"] = [
            {"status": p.Status, "bin_data": base64.b64encode(p.BinData).decode(), "branch_id": p.BranchID, "op": p.Op}
            for p in reply.Progresses
        ]
    return Response(200, dumps(answer))


_META_KEY_RE = re.compile(r"[0-9a-z_.-]+")
_META_VALUE_RE = re.compile(r"[\x20-\x7e]*")


def check_branch_headers(headers: Any, *, gid: Optional[str] = None) -> dict[str, str]:
    """``branch_headers`` of a gRPC transaction checked as gRPC metadata (DtmInvalidInput otherwise).

    Keys are lower-cased (gRPC sends them so; Go's metadata does the same) and must be ``0-9 a-z _ . -``;
    ``dtm-*`` (the call's identity) and ``grpc-*`` keys are reserved, and ``-bin`` (binary) keys cannot
    be sent as text. Values must be printable ASCII, as gRPC requires of text metadata.
    """
    if not isinstance(headers, Mapping):
        raise DtmInvalidInput(f"branch_headers must be a mapping, not {type(headers).__name__}", gid=gid)
    out: dict[str, str] = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise DtmInvalidInput(f"branch header {key!r}: keys and values must be str", gid=gid)
        name = key.lower()
        if not _META_KEY_RE.fullmatch(name):
            problem = "is not a gRPC metadata key (0-9 a-z _ . -)"
        elif name.startswith((META_PREFIX, "grpc-")):
            problem = "is reserved (dtm-* and grpc-* keys)"
        elif name.endswith("-bin"):
            problem = "is a binary (-bin) key, which branch headers cannot carry"
        elif not _META_VALUE_RE.fullmatch(value):
            problem = "has a value that is not printable ASCII, as gRPC metadata requires"
        else:
            if name in out:
                raise DtmInvalidInput(f"branch header {key!r} is given twice (keys are case-insensitive)", gid=gid)
            out[name] = value
            continue
        raise DtmInvalidInput(f"branch header {key!r} {problem}", gid=gid)
    return out


def branch_metadata(
    gid: str, trans_type: str, branch_id: str, op: str, dtm: str,
    branch_headers: Mapping[str, str] = {},
    phase2_url: Optional[str] = None,
) -> tuple[tuple[str, str], ...]:
    """Metadata of a call the client makes to a branch (TCC try, XA action, msg query_prepared):
    the five ``dtm-*`` keys, ``dtm-phase2_url`` for XA, then the branch headers (lower-cased: gRPC
    metadata keys are lower case on the wire, and DTM's own calls deliver them so)."""
    meta = [
        (META_PREFIX + "gid", gid),
        (META_PREFIX + "trans_type", trans_type),
        (META_PREFIX + "branch_id", branch_id),
        (META_PREFIX + "op", op),
        (META_PREFIX + "dtm", dtm),
    ]
    if phase2_url is not None:
        meta.append((META_PREFIX + "phase2_url", phase2_url))
    meta.extend(check_branch_headers(branch_headers, gid=gid).items())
    return tuple(meta)


def branch_result(code_name: str, details: str) -> Optional[str]:
    """What a branch's gRPC status means to DTM (protocol.md §11, trace grpc_branch_status_codes):
    ``SUCCESS`` for OK, ``FAILURE`` for ABORTED except a message exactly ``ONGOING`` (DTM before v1.10
    sent ONGOING so), ``ONGOING`` for that and FAILED_PRECONDITION; ``None`` for an error (retried)."""
    if code_name == "OK":
        return RESULT_SUCCESS
    if code_name == "ABORTED":
        return RESULT_ONGOING if details == RESULT_ONGOING else RESULT_FAILURE
    if code_name == "FAILED_PRECONDITION":
        return RESULT_ONGOING
    return None


def go_code_name(code_name: str) -> str:
    """A ``grpc.StatusCode`` name as grpc-go spells it (``codes.Code.String()``: ``Unavailable``)."""
    return _GO_CODE_NAMES.get(code_name, code_name)


def rpc_error_text(code_name: str, details: str) -> str:
    """A gRPC error as the Go client prints it (``rpc error: code = Aborted desc = ...``): the
    rollback reason of a TCC/XA aborted by a branch error reads the same as Go's."""
    return f"rpc error: code = {code_name} desc = {details}"


# grpc.StatusCode name -> Go's spelling (codes.Code.String()).
_GO_CODE_NAMES = {
    "OK": "OK", "CANCELLED": "Canceled", "UNKNOWN": "Unknown", "INVALID_ARGUMENT": "InvalidArgument",
    "DEADLINE_EXCEEDED": "DeadlineExceeded", "NOT_FOUND": "NotFound", "ALREADY_EXISTS": "AlreadyExists",
    "PERMISSION_DENIED": "PermissionDenied", "RESOURCE_EXHAUSTED": "ResourceExhausted",
    "FAILED_PRECONDITION": "FailedPrecondition", "ABORTED": "Aborted", "OUT_OF_RANGE": "OutOfRange",
    "UNIMPLEMENTED": "Unimplemented", "INTERNAL": "Internal", "UNAVAILABLE": "Unavailable",
    "DATA_LOSS": "DataLoss", "UNAUTHENTICATED": "Unauthenticated",
}

# The HTTP status an error code stands for in DtmServerError.status (grpc-gateway's mapping): 5xx
# means "the server could not say" (a wait_result submit then settles with a query), 4xx "not DTM's
# answer to this call".
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404, "UNIMPLEMENTED": 404, "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429,
}

def rpc_error(
    code_name: str,
    details: str,
    *,
    where: str,
    gid: Optional[str] = None,
    branch_id: Optional[str] = None,
    op: Optional[str] = None,
    bare: bool = False,
) -> DtmError:
    """The typed error for a failed gRPC call (``code_name`` is ``grpc.StatusCode.<name>.name``).

    ``where`` (the call) starts each message, except the FAILURE and ONGOING of a branch (``bare``):
    their message is Go's error text, which becomes the rollback reason of a TCC/XA.

    As DTM reads gRPC answers (protocol.md §11, trace grpc_branch_status_codes): ABORTED is FAILURE,
    except a message exactly ``ONGOING``; FAILED_PRECONDITION is ONGOING. UNAVAILABLE and CANCELLED are a
    DtmTransportError (the call was made: it may have arrived; "nothing was sent" is decided before
    the call, from the channel's state), DEADLINE_EXCEEDED DtmTimeout. Anything else is a
    DtmServerError whose ``status`` is the matching HTTP status (500 when there is none).
    """
    text = rpc_error_text(go_code_name(code_name), details)
    ids: dict[str, Any] = {"gid": gid, "branch_id": branch_id, "op": op}
    result_text = text if bare else f"{where}: {text}"
    result = branch_result(code_name, details)
    if result == RESULT_FAILURE:
        return DtmFailure(result_text, **ids)
    if result == RESULT_ONGOING:
        return DtmOngoing(result_text, **ids)
    if code_name == "DEADLINE_EXCEEDED":
        return DtmTimeout(f"{where}: {text}", **ids)
    if code_name in ("UNAVAILABLE", "CANCELLED"):
        return DtmTransportError(f"{where}: {text}", **ids)
    return DtmServerError(f"{where}: {text}", status=_HTTP_STATUS.get(code_name, 500), body=details, **ids)
