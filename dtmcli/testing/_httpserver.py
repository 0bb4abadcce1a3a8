"""A small threaded HTTP/1.1 server base: keep-alive, TCP_NODELAY, chunked request bodies, clean close."""

from __future__ import annotations

import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qsl, urlsplit

__all__ = ["Server", "Handler"]

logger = logging.getLogger("dtmcli.testing")


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that sets TCP_NODELAY and can close its open keep-alive connections."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept with Nagle off: without it a keep-alive answer stalls ~40 ms on delayed ACKs."""
        conn, addr = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._conns_lock:
            self._conns.add(conn)
        return conn, addr

    def shutdown_request(self, request: Any) -> None:
        """Forget a finished connection, then close it."""
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                        name=f"http-{self.server_address[1]}")
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close idle keep-alive connections and the listening socket."""
        if self._thread is not None:
            self.shutdown()
            self._thread.join()
            self._thread = None
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.server_close()

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.server_address[1])


class Handler(BaseHTTPRequestHandler):
    """Request handler base: HTTP/1.1, body reading (Content-Length or chunked), JSON/raw answers."""

    protocol_version = "HTTP/1.1"
    server_version = "dtmcli-testing"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        """Route http.server's access log to the ``dtmcli.testing`` logger at DEBUG."""
        logger.debug("%s " + format, self.address_string(), *args)

    def read_body(self) -> bytes:
        """The request body; accepts ``Transfer-Encoding: chunked``."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline(65537)
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def split_path(self) -> tuple[str, dict[str, str]]:
        """Path and (single-valued) query of the request."""
        parts = urlsplit(self.path)
        return parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))

    def send_bytes(self, status: int, body: bytes, content_type: str = "application/json; charset=utf-8",
                   headers: Optional[dict[str, str]] = None) -> None:
        """Answer with a Content-Length so the connection stays usable."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
