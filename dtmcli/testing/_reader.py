"""A connection's request stream, read against one deadline per request (slow clients cannot hold a thread).

The clock of a request starts with its first byte (an idle keep-alive connection waits without a limit,
as pooled clients expect) and covers the request line, the headers and the body: before each receive the
socket timeout is set to the time left, so a client dripping one byte at a time gets no extra time.
"""

from __future__ import annotations

import socket
import time
from typing import Optional

__all__ = ["DeadlineReader", "RequestTimeout"]

_RECV = 65536
_RECV_MAX = 1 << 20


class RequestTimeout(Exception):
    """The request did not arrive in full within the deadline (answered 408, connection closed)."""


class DeadlineReader:
    """The ``rfile`` of a request handler: ``readline``/``read`` bounded by the current request's deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._eof = False
        self._timeout: Optional[float] = None
        self._deadline: Optional[float] = None
        self._idle = True

    def next_request(self, timeout: Optional[float]) -> None:
        """Expect a new request: ``timeout`` seconds from its first byte (``None``: no limit).

        Bytes of it already received (a pipelined request) start its clock now.
        """
        self._timeout = timeout
        self._deadline = None
        self._idle = not self._buf
        if not self._idle:
            self._start()

    def _start(self) -> None:
        self._idle = False
        if self._timeout is not None:
            self._deadline = time.monotonic() + self._timeout

    def _fill(self, want: int = _RECV) -> bool:
        """Receive more bytes of the stream (up to ``want``, at least 64 KiB); False at its end."""
        if self._eof:
            return False
        if self._deadline is None:
            self._sock.settimeout(None)
        else:
            left = self._deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout(f"request not received within {self._timeout} s")
            self._sock.settimeout(left)
        try:
            data = self._sock.recv(min(max(want, _RECV), _RECV_MAX))
        except socket.timeout:  # TimeoutError from Python 3.10 on
            raise RequestTimeout(f"request not received within {self._timeout} s") from None
        finally:
            self._sock.settimeout(self._timeout)  # answers are written with the same per-send limit
        if not data:
            self._eof = True
            return False
        if self._idle:
            self._start()
        self._buf += data
        return True

    def _take(self, size: int) -> bytes:
        if size >= len(self._buf):
            data = bytes(self._buf)
            self._buf.clear()
            return data
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def readline(self, limit: int = -1) -> bytes:
        """One line including its ``\\n`` (at most ``limit`` bytes; less at the end of the stream)."""
        scanned = 0
        while True:
            end = self._buf.find(b"\n", scanned)
            if end >= 0 and (limit < 0 or end < limit):
                return self._take(end + 1)
            if 0 <= limit <= len(self._buf):
                return self._take(limit)
            scanned = len(self._buf)
            if not self._fill():
                return self._take(len(self._buf))

    def read(self, size: int = -1) -> bytes:
        """``size`` bytes (all up to the end of the stream when negative; fewer when it ends first)."""
        while (size < 0 or len(self._buf) < size) and self._fill(size - len(self._buf)):
            pass
        return self._take(len(self._buf) if size < 0 else min(size, len(self._buf)))

    def close(self) -> None:
        """Nothing to release: the socket belongs to the server."""
