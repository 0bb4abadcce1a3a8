"""The DTM servers a branch service trusts (the allow-list for the ``dtm`` query parameter).

A client-originated branch call (a TCC try, an XA action) carries the DTM address in its query,
and the handler calls that address back (nested TCC branches, XA registration). Whoever can reach
the handler chooses that URL: without an allow-list the service can be made to send requests to any
host it can reach (server-side request forgery). Configure the servers once, with
:func:`set_dtm_servers` or the ``DTMCLI_SERVER`` environment variable (comma-separated); then a
``dtm`` that is not one of them is refused (400).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional
from urllib.parse import urlsplit

from ._validate import check_http_url

__all__ = ["ENV_VAR", "canonical_url", "configured_dtm_servers", "is_trusted_dtm", "set_dtm_servers"]

logger = logging.getLogger("dtmcli")

ENV_VAR = "DTMCLI_SERVER"
_DEFAULT_PORTS = {"http": 80, "https": 443}

_lock = threading.Lock()
_configured: Optional[frozenset[str]] = None
_warned = False


def canonical_url(url: str) -> str:
    """``url`` with scheme and host lower-cased, the default port made explicit, no trailing ``/``.

    Raises ValueError for a URL that has no host or a malformed port.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    host = parts.hostname
    if not host:
        raise ValueError(f"{url!r} has no host")
    port = parts.port or _DEFAULT_PORTS.get(scheme)
    userinfo = parts.netloc.rpartition("@")[0]
    extra = (f"?{parts.query}" if parts.query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    return f"{scheme}://{userinfo + '@' if userinfo else ''}{host.lower()}:{port}{parts.path.rstrip('/')}{extra}"


def _canonical_set(urls: list[str], where: str) -> frozenset[str]:
    out = set()
    for url in urls:
        check_http_url(url, where)
        out.add(canonical_url(url))
    return frozenset(out)


def set_dtm_servers(*urls: str) -> None:
    """Trust only these DTM servers' URLs in a branch call's ``dtm`` parameter (replaces ``DTMCLI_SERVER``).

    Call it once at start-up, e.g. ``set_dtm_servers("http://dtm:36789/api/dtmsvr")``. With no
    argument, the configuration is cleared (``DTMCLI_SERVER`` applies again). URLs compare
    case-insensitively in scheme and host, with default ports and trailing slashes ignored.
    Raises DtmInvalidInput for a URL that is not http(s).
    """
    global _configured
    servers = _canonical_set(list(urls), "trusted DTM server URL") if urls else None
    with _lock:
        _configured = servers


def configured_dtm_servers() -> Optional[frozenset[str]]:
    """The canonical trusted URLs: from :func:`set_dtm_servers`, else ``DTMCLI_SERVER``; None when neither."""
    with _lock:
        if _configured is not None:
            return _configured
    urls = env_urls()
    return _canonical_set(urls, f"{ENV_VAR} entry") if urls else None


def env_urls() -> list[str]:
    """The DTM server URLs in ``DTMCLI_SERVER`` (comma-separated; blanks around and empty entries ignored)."""
    return [u.strip() for u in os.environ.get(ENV_VAR, "").split(",") if u.strip()]


def is_trusted_dtm(url: str) -> bool:
    """Whether a branch call may use ``url`` as its DTM server.

    With no configuration every URL is accepted, and a warning is logged once naming the risk.
    """
    global _warned
    servers = configured_dtm_servers()
    if servers is None:
        with _lock:
            first, _warned = not _warned, True
        if first:
            logger.warning(
                "using the DTM address sent in a branch call's query (%s) without checking it: configure "
                "the trusted servers with dtmcli.set_dtm_servers(...) or %s, or pass dtm= explicitly",
                url,
                ENV_VAR,
            )
        return True
    try:
        return canonical_url(url) in servers
    except ValueError:
        return False
