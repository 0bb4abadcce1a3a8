"""A raw TCP listener for transport tests: 127.0.0.1, a free port, one thread per accepted connection."""

from __future__ import annotations

import socket
import threading
from typing import Optional


class Listener:
    """Listens at once; each accepted connection is handed to :meth:`serve` (``number`` counts them from 1)
    in a thread of its own. Subclasses set their attributes before calling ``super().__init__()``."""

    scheme = "http"

    def __init__(self) -> None:
        self.connections = 0
        self.threads: list[threading.Thread] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"{self.scheme}://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self.serve, args=(conn, self.connections), daemon=True)
            self.threads.append(t)
            t.start()

    def serve(self, conn: socket.socket, number: int) -> None:
        raise NotImplementedError


def read_message(conn: socket.socket, buf: bytearray) -> Optional[tuple[bytes, bytes]]:
    """The next request's head and body (per Content-Length) from ``conn``, both taken out of ``buf``
    (what was received past them stays there); ``None`` when the peer closes first."""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, _ = bytes(buf).partition(b"\r\n\r\n")
    del buf[: len(head) + 4]
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buf) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    body = bytes(buf[:length])
    del buf[:length]
    return head, body
