"""HTTP transport: the one place that does network I/O for the sync client.

``Transport`` is the seam: builders and the client only call ``request()``, so another
implementation (a custom session, an asyncio twin, a test double) plugs in without touching them.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping, Optional, Protocol, runtime_checkable

import requests
from requests.adapters import HTTPAdapter

from ._protocol import Response
from .errors import DtmTimeout, DtmTransportError

__all__ = ["Transport", "RequestsTransport"]

logger = logging.getLogger("dtmcli")

_JSON_HEADERS = {"Content-Type": "application/json"}


@runtime_checkable
class Transport(Protocol):
    """What the client needs from HTTP: one blocking request, and close()."""

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Optional[Mapping[str, str]] = None,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Response:
        """Send one request and return its answer; raise DtmTransportError below HTTP."""
        ...

    def close(self) -> None:
        """Release pooled connections."""
        ...


class RequestsTransport:
    """A thread-safe, keep-alive connection pool on ``requests``.

    Pass your own ``session`` to reuse its TLS, proxy and auth settings. ``trust_env=False``
    skips per-request proxy/netrc lookups from the environment (noticeably faster).
    """

    def __init__(
        self,
        session: Optional[requests.Session] = None,
        *,
        timeout: float = 10.0,
        pool_maxsize: int = 32,
        trust_env: Optional[bool] = None,
    ) -> None:
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=8, pool_maxsize=pool_maxsize)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        if trust_env is not None:
            session.trust_env = trust_env
        self.session = session
        self.timeout = timeout

    def request(
        self,
        method: str,
        url: str,
        *,
        params: Optional[Mapping[str, str]] = None,
        body: Optional[bytes] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: Optional[float] = None,
    ) -> Response:
        """Send one request; connection problems become DtmTransportError / DtmTimeout."""
        if headers is None:
            headers = _JSON_HEADERS if body is not None else None
        started = time.perf_counter()
        try:
            r = self.session.request(
                method,
                url,
                params=params,
                data=body,
                headers=headers,
                timeout=self.timeout if timeout is None else timeout,
                allow_redirects=False,
            )
            content = r.content
        except requests.Timeout as exc:
            raise DtmTimeout(f"{method} {url} timed out: {exc}") from exc
        except requests.RequestException as exc:
            raise DtmTransportError(f"{method} {url} failed: {exc}") from exc
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s -> %d in %.1f ms (%d bytes)",
                method,
                url,
                r.status_code,
                (time.perf_counter() - started) * 1000,
                len(content),
            )
        return Response(r.status_code, content)

    def close(self) -> None:
        """Close the pool (only a session this transport created)."""
        if self._owns_session:
            self.session.close()
