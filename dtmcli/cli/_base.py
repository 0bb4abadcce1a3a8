"""What every command shares: the streams, the DTM address, exit codes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, TextIO
from urllib.parse import urlsplit

from .._consts import DEFAULT_DTM
from .._dtm_servers import env_urls
from ..client import DtmClient

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "Io", "client_for", "dtm_url", "redact",
           "shown_url"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


@dataclass
class Io:
    """The streams a command reads and writes (the process's own unless a test passes others)."""

    stdin: TextIO
    stdout: TextIO
    stderr: TextIO

    def out(self, text: str) -> None:
        """Write ``text`` to stdout."""
        self.stdout.write(text)

    def err(self, text: str) -> None:
        """Write one line to stderr."""
        self.stderr.write(text.rstrip("\n") + "\n")


def dtm_url(given: Optional[str]) -> str:
    """``--dtm``, else the first entry of ``DTMCLI_SERVER`` (comma-separated), else the standard address."""
    if given:
        return given
    return next(iter(env_urls()), DEFAULT_DTM)


def client_for(url: str, timeout: float) -> DtmClient:
    """A client of its own (not the shared one) with the command's per-call ``timeout``."""
    return DtmClient(url, timeout=timeout)


_USERINFO = re.compile(r"(?<=://)[^\s@]*@")


def shown_url(url: str, what: str = "URL") -> str:
    """``url`` rebuilt from its parsed parts, for output: ``scheme://host:port/path``, never user info or query.

    When it does not parse, only its scheme, or ``(the <what>)``.
    """
    scheme, sep, _rest = url.partition("://")
    scheme = scheme if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,20}", scheme) else ""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host:
        return f"(a {scheme} URL)" if scheme else f"(the {what})"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}{'' if port is None else f':{port}'}{parts.path}"


def redact(text: str, url: Optional[str] = None) -> str:
    """``text`` without ``user:pass@`` in any URL in it, nor ``url``'s password and query string."""
    secrets = []
    if url:
        try:
            parts = urlsplit(url)
            secrets = [s for s in (parts.password, parts.query, parts.netloc.rpartition("@")[0]) if s]
        except ValueError:
            secrets = [url]
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _USERINFO.sub("", text)
