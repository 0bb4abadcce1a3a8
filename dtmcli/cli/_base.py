"""What every command shares: the streams, the DTM address, exit codes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, TextIO

from .._consts import DEFAULT_DTM
from .._dtm_servers import ENV_VAR
from ..client import DtmClient

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_UNREACHABLE", "EXIT_USAGE", "Io", "client_for", "dtm_url"]

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
    first = next((u.strip() for u in os.environ.get(ENV_VAR, "").split(",") if u.strip()), "")
    return first or DEFAULT_DTM


def client_for(url: str, timeout: float) -> DtmClient:
    """A client of its own (not the shared one) with the command's per-call ``timeout``."""
    return DtmClient(url, timeout=timeout)
