"""The coordinator's calls to gRPC branches (the ``grpc`` extra), made as DTM makes them (protocol.md §4, §11)."""

from __future__ import annotations

import logging
import threading
from typing import Mapping, Optional, Union

import grpc

from .._consts import RESULT_FAILURE, RESULT_ONGOING, RESULT_SUCCESS
from ..errors import DtmInvalidInput
from ..grpc._wire import branch_result, go_code_name, rpc_error_text, split_grpc_url
from ._branch_client import BranchAnswer

__all__ = ["GrpcBranchCaller", "grpc_answer"]

logger = logging.getLogger("dtmcli.testing")

# Headers the engine adds for HTTP branches; gRPC calls carry only the dtm-* keys and branch_headers.
_HTTP_ONLY = {"content-type": "application/json", "accept": "application/json"}


def grpc_answer(code: grpc.StatusCode, details: str) -> BranchAnswer:
    """A branch's gRPC status as the engine's HTTP-shaped answer (read then as DTM reads gRPC, §4)."""
    result = branch_result(code.name, details)
    if result == RESULT_SUCCESS:
        return BranchAnswer(200, "")
    if result == RESULT_FAILURE:
        # Only the exact message means ONGOING here; the engine reads the word anywhere in a body.
        return BranchAnswer(409, details.replace(RESULT_ONGOING, RESULT_ONGOING.lower()))
    if result == RESULT_ONGOING:
        return BranchAnswer(425, details if code == grpc.StatusCode.FAILED_PRECONDITION else RESULT_ONGOING)
    # Status 0: an error whatever the text says (DTM retries it with backoff).
    return BranchAnswer(0, rpc_error_text(go_code_name(code.name), details))


class GrpcBranchCaller:
    """Calls gRPC branch URLs ``host:port/package.Service/Method`` as DTM does, one channel per target."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def _channel(self, target: str) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(target)
            if channel is None:
                # grpc-core retries off, as DTM's own calls: the engine decides every retry.
                channel = self._channels[target] = grpc.insecure_channel(target, options=[("grpc.enable_retries", 0)])
            return channel

    def call(
        self,
        method: str,
        url: str,
        query: Mapping[str, str],
        body: Optional[bytes],
        headers: Mapping[str, str],
        timeout: float,
    ) -> BranchAnswer:
        """Send ``body`` (raw payload bytes) to the method of ``url``; never raises (status 0 instead)."""
        try:
            target, path = split_grpc_url(url)
        except DtmInvalidInput as exc:  # not host:port/pkg.Svc/Method (the API refuses those): an error
            return BranchAnswer(0, f"gRPC branch {exc}")
        metadata: list[tuple[str, Union[str, bytes]]] = [
            (f"dtm-{k}", query.get(k, "")) for k in ("gid", "trans_type", "branch_id", "op")
        ]
        metadata.append(("dtm-dtm", ""))  # DTM's own calls carry an empty dtm-dtm
        for key, value in headers.items():
            if _HTTP_ONLY.get(key.lower()) != value:
                metadata.append((key.lower(), value))
        try:
            rpc: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self._channel(target).unary_unary(
                path  # no (de)serialisers: the payload bytes go out as they are
            )
            rpc(body or b"", timeout=timeout, metadata=tuple(metadata))
        except grpc.RpcError as exc:
            code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
            details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
            logger.debug("grpc branch %s -> %s %s", url, code, details)
            return grpc_answer(code, details or "")
        except Exception as exc:  # bad metadata, a closed channel: an unknown result, retried
            logger.debug("grpc branch %s failed: %s", url, exc)
            return BranchAnswer(0, f"{type(exc).__name__}: {exc}")
        return BranchAnswer(200, "")

    def close(self) -> None:
        """Close every channel."""
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()
