"""Input checks shared by every builder; each raises DtmInvalidInput before anything is sent."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Mapping, Optional
from urllib.parse import urlsplit

from ._consts import MAX_BRANCH_ID_LEN, MAX_GID_LEN, MAX_INT64, MAX_URL_LEN
from .errors import DtmInvalidInput

_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
# RFC 7230 token characters for header names.
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# C0 and C1 controls, DEL, U+2028/U+2029 and lone surrogates (which UTF-8 cannot carry).
_CONTROL_CHARS = "\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"
_CONTROL_RE = re.compile(f"[{_CONTROL_CHARS}]")
# URLs additionally refuse every Unicode whitespace character.
_URL_BAD_RE = re.compile(f"[\\s{_CONTROL_CHARS}]")
# Header values may hold HTAB but no other control character.
_HEADER_VALUE_CONTROL_RE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# Framing and hop-by-hop headers: set per connection by the HTTP client, never by a transaction.
# Overriding them on the branch calls the SDK makes itself lets a payload smuggle a second request.
_FORBIDDEN_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "host", "connection", "keep-alive", "te", "trailer", "upgrade",
     "expect", "http2-settings"}
)


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
    non-empty string of at most 128 characters without ``;`` (which DTM strips), control
    characters (C0, DEL, C1), line or paragraph separators (U+2028/U+2029) or lone surrogates is
    accepted; it is only ever used as a bound SQL parameter or a key, never in SQL text.
    XA, which quotes the gid into SQL, keeps the strict check.
    """
    if not isinstance(gid, str) or not gid:
        raise DtmInvalidInput("gid must be a non-empty str")
    if len(gid) > MAX_GID_LEN or ";" in gid or _CONTROL_RE.search(gid):
        raise DtmInvalidInput(
            f"gid {gid[:40]!r} must be at most {MAX_GID_LEN} characters without ';', control characters "
            "or line separators"
        )
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
    """Return ``url`` if it is an absolute http(s) URL with a host (or ``""`` when allowed).

    Whitespace, control characters (C0, DEL, C1), lone surrogates and URLs longer than DTM's SQL
    stores keep (1024 characters) are refused.
    """
    if not isinstance(url, str):
        raise DtmInvalidInput(f"{what} must be a str URL, not {type(url).__name__}", gid=gid)
    if url == "" and allow_empty:
        return url
    if len(url) > MAX_URL_LEN:
        # Checked before the cache, so that huge strings are never kept.
        raise DtmInvalidInput(
            f"{what} {url[:60]!r}... is {len(url)} characters long; DTM's SQL stores keep {MAX_URL_LEN}", gid=gid
        )
    problem = _url_problem(url)
    if problem:
        raise DtmInvalidInput(f"{what} {url!r} {problem}", gid=gid)
    return url


@lru_cache(maxsize=1024)
def _url_problem(url: str) -> str:
    # Cached: branch and DTM URLs repeat on every transaction, and parsing is the costly part.
    # The raw string is checked first: urlsplit silently drops tabs and line breaks.
    bad = _URL_BAD_RE.search(url)
    if bad:
        return f"contains {bad.group()!r} at position {bad.start()}: whitespace and control characters are not allowed"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        return f"is not a valid URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an absolute http:// or https:// URL"
    return ""


def check_non_negative_int(value: Any, name: str) -> int:
    """Return ``value`` if it is an int in ``[0, 2**63-1]``: DTM decodes int64, and bool is refused."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT64:
        raise DtmInvalidInput(f"{name} must be an int from 0 to {MAX_INT64} (DTM's int64), not {value!r}")
    return value


def check_headers(headers: Any) -> dict[str, str]:
    """Return a copy of ``headers`` if every entry is a header a branch call may carry.

    Names are HTTP tokens, unique ignoring case, and not a framing or hop-by-hop header
    (``Content-Length``, ``Transfer-Encoding``, ``Host``, ``Connection``, ``Keep-Alive``, ``TE``,
    ``Trailer``, ``Upgrade``, ``Expect``, ``Proxy-*``): the SDK sends these headers on the branch
    calls it makes itself, where such an override would let a payload smuggle a second request.
    Values are latin-1 text (what HTTP carries) without control characters other than tab and
    without leading or trailing whitespace.
    """
    if not isinstance(headers, Mapping):
        raise DtmInvalidInput("branch_headers must be a mapping of str to str")
    out: dict[str, str] = {}
    seen: set[str] = set()
    for key, value in headers.items():
        if not isinstance(key, str) or not _HEADER_NAME_RE.fullmatch(key):
            raise DtmInvalidInput(f"branch header name {key!r} is not a valid HTTP header name")
        lower = key.lower()
        if lower in _FORBIDDEN_HEADERS or lower.startswith("proxy-"):
            raise DtmInvalidInput(
                f"branch header {key!r} is a framing or hop-by-hop header, which the HTTP client sets itself"
            )
        if lower in seen:
            raise DtmInvalidInput(f"branch header {key!r} is given twice (header names ignore case)")
        seen.add(lower)
        if not isinstance(value, str):
            raise DtmInvalidInput(f"branch header {key!r} must have a str value, not {type(value).__name__}")
        problem = _header_value_problem(value)
        if problem:
            raise DtmInvalidInput(f"branch header {key!r} value {value[:60]!r} {problem}")
        out[key] = value
    return out


def _header_value_problem(value: str) -> str:
    if _HEADER_VALUE_CONTROL_RE.search(value):
        return "contains a control character"
    if not value.isascii() and max(value) > "\xff":
        return "has characters outside latin-1, which HTTP headers cannot carry (encode them first)"
    if value != value.strip(" \t"):
        return "starts or ends with whitespace, which HTTP drops"
    return ""
