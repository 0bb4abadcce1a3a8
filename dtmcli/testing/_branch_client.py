"""HTTP calls from the coordinator to branches, over a keep-alive connection pool."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Optional, Protocol
from urllib.parse import urlencode

import urllib3

__all__ = ["BranchAnswer", "BranchCaller", "HttpBranchCaller"]

logger = logging.getLogger("dtmcli.testing")


@dataclass(frozen=True)
class BranchAnswer:
    """A branch's HTTP answer; ``status`` 0 means the call itself failed (``text`` says why)."""

    status: int
    text: str


class BranchCaller(Protocol):
    """What the engine needs to reach a branch."""

    def call(
        self,
        method: str,
        url: str,
        query: Mapping[str, str],
        body: Optional[bytes],
        headers: Mapping[str, str],
        timeout: float,
    ) -> BranchAnswer:
        """Make one call; never raises for network problems (status 0 instead)."""
        ...

    def close(self) -> None:
        """Release pooled connections."""
        ...


class HttpBranchCaller:
    """Branch calls on a urllib3 pool (keep-alive, thread-safe)."""

    def __init__(self, maxsize: int = 32) -> None:
        self._pool = urllib3.PoolManager(num_pools=64, maxsize=maxsize, block=False, retries=False)

    def call(
        self,
        method: str,
        url: str,
        query: Mapping[str, str],
        body: Optional[bytes],
        headers: Mapping[str, str],
        timeout: float,
    ) -> BranchAnswer:
        """Call ``url`` with ``query`` appended; an empty POST body is sent chunked, as DTM does for xa."""
        full = f"{url}{'&' if '?' in url else '?'}{urlencode(dict(query))}"
        chunked = method == "POST" and not body
        try:
            resp = self._pool.request(
                method,
                full,
                body=[b""] if chunked else body,
                headers=dict(headers),
                timeout=urllib3.Timeout(total=timeout),
                redirect=False,
                chunked=chunked,
            )
            text = resp.data.decode("utf-8", "replace")
        except Exception as exc:  # any failure to get an answer is an "unknown result", retried
            logger.debug("branch %s %s failed: %s", method, full, exc)
            return BranchAnswer(0, f"{type(exc).__name__}: {exc}")
        logger.debug("branch %s %s -> %d", method, full, resp.status)
        return BranchAnswer(resp.status, text)

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.clear()
