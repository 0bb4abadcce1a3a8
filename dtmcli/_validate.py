"""Input checks shared by every builder; each raises DtmInvalidInput before anything is sent."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from ._consts import MAX_BRANCH_ID_LEN, MAX_GID_LEN
from .errors import DtmInvalidInput

_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
# RFC 7230 token characters for header names.
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_SPACE_RE = re.compile(r"\s")


def check_gid(gid: Any) -> str:
    """Return ``gid`` if it is a non-empty ``[A-Za-z0-9_-]`` string of at most 128 characters."""
    if not isinstance(gid, str):
        raise DtmInvalidInput(f"gid must be a str, not {type(gid).__name__}")
    if not gid:
        raise DtmInvalidInput("gid must not be empty")
    if len(gid) > MAX_GID_LEN:
        raise DtmInvalidInput(f"gid is {len(gid)} characters long; the limit is {MAX_GID_LEN}")
    if not _ID_RE.fullmatch(gid):
        raise DtmInvalidInput(f"gid {gid!r} may only contain letters, digits, '_' and '-'")
    return gid


def check_received_gid(gid: Any) -> str:
    """Return a gid received from DTM if DTM itself could have stored it.

    Looser than :func:`check_gid`: other SDKs and users create gids such as ``order:42``. Any
    non-empty string of at most 128 characters without control characters or ``;`` (which DTM
    strips) is accepted; it is only ever used as a bound SQL parameter or a key, never in SQL text.
    XA, which quotes the gid into SQL, keeps the strict check.
    """
    if not isinstance(gid, str) or not gid:
        raise DtmInvalidInput("gid must be a non-empty str")
    if len(gid) > MAX_GID_LEN or ";" in gid or any(ord(c) < 32 or ord(c) == 127 for c in gid):
        raise DtmInvalidInput(f"gid {gid[:40]!r} must be at most {MAX_GID_LEN} characters without control characters")
    return gid


def check_branch_id(branch_id: Any, *, gid: Optional[str] = None) -> str:
    """Return ``branch_id`` if it is a non-empty ``[A-Za-z0-9_-]`` string of at most 128 characters."""
    if not isinstance(branch_id, str) or not branch_id:
        raise DtmInvalidInput("branch_id must be a non-empty str", gid=gid)
    if len(branch_id) > MAX_BRANCH_ID_LEN or not _ID_RE.fullmatch(branch_id):
        raise DtmInvalidInput(
            f"branch_id {branch_id[:40]!r} must be at most {MAX_BRANCH_ID_LEN} letters, digits, '_' or '-'",
            gid=gid,
        )
    return branch_id


def check_http_url(url: Any, what: str, *, gid: Optional[str] = None, allow_empty: bool = False) -> str:
    """Return ``url`` if it is an absolute http(s) URL with a host (or ``""`` when allowed)."""
    if not isinstance(url, str):
        raise DtmInvalidInput(f"{what} must be a str URL, not {type(url).__name__}", gid=gid)
    if url == "" and allow_empty:
        return url
    problem = _url_problem(url)
    if problem:
        raise DtmInvalidInput(f"{what} {url!r} {problem}", gid=gid)
    return url


@lru_cache(maxsize=1024)
def _url_problem(url: str) -> str:
    # Cached: branch and DTM URLs repeat on every transaction, and parsing is the costly part.
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname or _SPACE_RE.search(url):
        return "must be an absolute http:// or https:// URL"
    return ""


def check_non_negative_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an int >= 0 (bool is rejected: the server decodes ints strictly)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DtmInvalidInput(f"{name} must be a non-negative int, not {value!r}")
    return value


def check_headers(headers: Any) -> dict[str, str]:
    """Return a copy of ``headers`` if it maps header names to str values without line breaks."""
    if not isinstance(headers, Mapping):
        raise DtmInvalidInput("branch_headers must be a mapping of str to str")
    out: dict[str, str] = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not _HEADER_NAME_RE.fullmatch(key):
            raise DtmInvalidInput(f"branch header name {key!r} is not a valid HTTP header name")
        if not isinstance(value, str) or "\r" in value or "\n" in value:
            raise DtmInvalidInput(f"branch header {key!r} must have a str value without line breaks")
        out[key] = value
    return out
