"""The coordinator's default branch caller: http(s) URLs over HTTP, the others over gRPC (the grpc extra)."""

from __future__ import annotations

import threading
from typing import Mapping, Optional

from ._branch_client import BranchAnswer, BranchCaller, HttpBranchCaller

__all__ = ["DispatchingBranchCaller"]


class DispatchingBranchCaller:
    """http(s) URLs over :class:`HttpBranchCaller`, any other URL over gRPC (created on first use)."""

    def __init__(self, http: Optional[BranchCaller] = None) -> None:
        self.http = http if http is not None else HttpBranchCaller()
        self._grpc: Optional[BranchCaller] = None
        self._lock = threading.Lock()

    def call(
        self,
        method: str,
        url: str,
        query: Mapping[str, str],
        body: Optional[bytes],
        headers: Mapping[str, str],
        timeout: float,
    ) -> BranchAnswer:
        """Route one call by its URL."""
        if url.startswith(("http://", "https://")):
            return self.http.call(method, url, query, body, headers, timeout)
        with self._lock:
            if self._grpc is None:
                try:
                    from ._grpc_branch import GrpcBranchCaller
                except ImportError as exc:  # grpcio missing: an error DTM would retry, with the reason
                    return BranchAnswer(0, f"gRPC branch {url}: the grpc extra is not installed ({exc})")
                self._grpc = GrpcBranchCaller()
            caller = self._grpc
        return caller.call(method, url, query, body, headers, timeout)

    def close(self) -> None:
        """Close the HTTP pool and the gRPC channels."""
        self.http.close()
        with self._lock:
            if self._grpc is not None:
                self._grpc.close()
