"""A small threaded HTTP/1.1 server base: keep-alive, TCP_NODELAY, chunked request bodies, clean close.

Request bodies are bounded (:data:`MAX_BODY`); a whole request (line, headers, body) must arrive within
``read_timeout`` seconds of its first byte (:mod:`._reader`). A request that breaks a rule is answered
400/408/413/501 and its connection closed.
"""

from __future__ import annotations

import email.parser
import http.client
import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import parse_qsl, urlsplit

from ._reader import DeadlineReader, RequestTimeout

__all__ = ["Server", "Handler", "BodyError", "MAX_BODY", "READ_TIMEOUT"]

logger = logging.getLogger("dtmcli.testing")

MAX_BODY = 8 * 1024 * 1024
"""Largest request body in bytes (Content-Length or the sum of the chunks); larger answers 413."""
READ_TIMEOUT = 30.0
"""Seconds a whole request may take to arrive from its first byte (an idle keep-alive has no limit)."""

_LINE = 65536
_DIGITS = re.compile(rb"[0-9]+")
_HEX = re.compile(rb"[0-9A-Fa-f]+")
_MAX_HEADER_LINE: int = getattr(http.client, "_MAXLINE", 65536)
_MAX_HEADERS: int = getattr(http.client, "_MAXHEADERS", 100)
# A header line the email parser (what http.server uses) reads as "name: value" and nothing else: a name of
# the characters its header pattern allows (so no "From " envelope line), no line folding, no CR inside.
_SIMPLE_HEADER = re.compile("([!-9;-~]+):([^\r\n]*)\r?\n\\Z")


def _read_header_lines(rfile: Any) -> list[bytes]:
    """The header lines up to and including the blank one, with http.client's limits and errors."""
    lines = []
    while True:
        line = rfile.readline(_MAX_HEADER_LINE + 1)
        if len(line) > _MAX_HEADER_LINE:
            raise http.client.LineTooLong("header line")
        lines.append(line)
        if len(lines) > _MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
        if line in (b"\r\n", b"\n", b""):
            return lines


def _parse_header_lines(lines: list[bytes], message_class: Any) -> Any:
    """The message ``http.client.parse_headers`` would build from ``lines``, without the email parser
    when every line is a plain ``name: value`` (the parser's result is then exactly this)."""
    text = b"".join(lines).decode("iso-8859-1")
    headers = []
    for line in lines[:-1]:
        m = _SIMPLE_HEADER.match(line.decode("iso-8859-1"))
        if m is None:
            return email.parser.Parser(_class=message_class).parsestr(text)
        headers.append((m.group(1), m.group(2).lstrip(" \t")))
    msg = message_class()
    msg._headers = headers
    msg._payload = ""
    return msg


_date_cache: tuple[int, str] = (0, "")


class BodyError(Exception):
    """A request body that cannot be read; ``status`` is the answer (the connection is closed after it)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that sets TCP_NODELAY and can close its open keep-alive connections."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    max_body = MAX_BODY
    read_timeout: Optional[float] = READ_TIMEOUT

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

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in a daemon thread named ``http-PORT-conn`` (findable in thread dumps)."""
        threading.Thread(target=self.process_request_thread, args=(request, client_address), daemon=True,
                         name=f"http-{self.port}-conn").start()

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

    rfile: DeadlineReader  # type: ignore[assignment]
    raw_requestline: bytes

    def setup(self) -> None:
        """Read the connection through a :class:`DeadlineReader` (one deadline per request)."""
        super().setup()
        self.rfile.close()  # the buffered reader socketserver made: replaced, not used
        self.rfile = DeadlineReader(self.connection)

    def parse_request(self) -> bool:
        """``BaseHTTPRequestHandler.parse_request`` with a faster header parser for plain HTTP/1.x
        requests (same checks, same answers, the same headers object); anything else goes the
        standard way."""
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = requestline.split()
        if len(words) != 3 or words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            return bool(super().parse_request())
        self.requestline = requestline
        self.command, self.path, self.request_version = words
        self.close_connection = words[2] != "HTTP/1.1"
        if self.path.startswith("//"):  # as the standard parser does (gh-87389)
            self.path = "/" + self.path.lstrip("/")
        try:
            self.headers = _parse_header_lines(_read_header_lines(self.rfile), self.MessageClass)
        except http.client.LineTooLong as err:
            self.send_error(431, "Line too long", str(err))
            return False
        except http.client.HTTPException as err:
            self.send_error(431, "Too many headers", str(err))
            return False
        conntype = self.headers.get("Connection", "").lower()
        if conntype == "close":
            self.close_connection = True
        elif conntype == "keep-alive":
            self.close_connection = False
        if self.headers.get("Expect", "").lower() == "100-continue" and words[2] == "HTTP/1.1":
            return bool(self.handle_expect_100())
        return True

    def date_time_string(self, timestamp: Optional[float] = None) -> str:
        """The Date header, formatted once per second."""
        global _date_cache
        if timestamp is not None:
            return str(super().date_time_string(timestamp))
        now = int(time.time())
        cached = _date_cache
        if cached[0] != now:
            cached = _date_cache = (now, str(super().date_time_string(now)))
        return cached[1]

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        """The access log line (DEBUG), formatted only when it is logged."""
        if logger.isEnabledFor(logging.DEBUG):
            super().log_request(code, size)

    def handle_one_request(self) -> None:
        """Wait for the next request without a limit; once its first byte is in, all of it has ``read_timeout``.

        A request line or headers not in by then are answered 408 and the connection closed (the
        body's own 408 is :meth:`read_body`'s).
        """
        self.rfile.next_request(getattr(self.server, "read_timeout", READ_TIMEOUT))
        self.command, self.requestline, self.request_version = "", "", self.protocol_version
        try:
            super().handle_one_request()
        except RequestTimeout as exc:
            logger.info("%s: refused request: 408 %s", self.address_string(), exc)
            self.close_connection = True
            try:
                self.send_bytes(408, json.dumps({"message": "request not received in time"}).encode())
            except OSError:
                pass

    def read_body(self) -> Optional[bytes]:
        """The request body (Content-Length or chunked), or ``None`` after answering why it was refused.

        A refused body is answered 400 (malformed), 408 (too slow), 413 (over ``max_body``) or 501
        (another transfer coding), and the connection is closed: the rest of the stream is unread.
        """
        try:
            return self._read_body(getattr(self.server, "max_body", MAX_BODY))
        except BodyError as exc:
            status, message = exc.status, str(exc)
        except RequestTimeout:
            status, message = 408, "request body not received in time"
        except OSError as exc:
            status, message = 400, f"request body unreadable: {exc}"
        logger.info("%s %s: refused body: %d %s", self.command, self.path, status, message)
        self.close_connection = True
        self.send_bytes(status, json.dumps({"message": message}).encode())
        return None

    def _read_exact(self, size: int) -> bytes:
        data = self.rfile.read(size)
        if len(data) < size:
            raise BodyError(400, f"request body ended after {len(data)} of {size} bytes")
        return data

    def _read_line(self) -> bytes:
        line = self.rfile.readline(_LINE + 1)
        if len(line) > _LINE:
            raise BodyError(400, "chunk line too long")
        if not line:
            raise BodyError(400, "request body ended inside a chunk")
        return line

    def _read_body(self, max_body: int) -> bytes:
        coding = self.headers.get("Transfer-Encoding")
        if coding is not None:
            if coding.strip().lower() != "chunked":
                raise BodyError(501, f"unsupported transfer encoding: {coding!r}")
            return self._read_chunked(max_body)
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or []}
        if not lengths:
            return b""
        if len(lengths) > 1:
            raise BodyError(400, "conflicting Content-Length headers")
        raw = lengths.pop().encode("latin-1", "replace")
        if not _DIGITS.fullmatch(raw):
            raise BodyError(400, f"bad Content-Length: {raw.decode('latin-1')!r}")
        if len(raw) > 20 or int(raw) > max_body:
            raise BodyError(413, f"request body over {max_body} bytes")
        length = int(raw)
        return self._read_exact(length) if length else b""

    def _read_chunked(self, max_body: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            field = self._read_line().split(b";", 1)[0].strip()
            if not _HEX.fullmatch(field):
                raise BodyError(400, f"bad chunk size: {field[:40]!r}")
            size = int(field, 16) if len(field) <= 16 else max_body + 1
            if total + size > max_body:
                raise BodyError(413, f"request body over {max_body} bytes")
            if size == 0:
                break
            parts.append(self._read_exact(size))
            total += size
            if self._read_line() not in (b"\r\n", b"\n"):
                raise BodyError(400, "chunk not followed by CRLF")
        for _ in range(100):  # trailer lines up to the blank line
            if self.rfile.readline(_LINE + 1) in (b"\r\n", b"\n", b""):
                return b"".join(parts)
        raise BodyError(400, "too many trailer lines")

    def split_path(self) -> tuple[str, dict[str, str]]:
        """Path and (single-valued) query of the request."""
        parts = urlsplit(self.path)
        return parts.path, dict(parse_qsl(parts.query, keep_blank_values=True))

    def send_bytes(self, status: int, body: bytes, content_type: str = "application/json; charset=utf-8",
                   headers: Optional[dict[str, str]] = None) -> None:
        """Answer with a Content-Length so the connection stays usable (head and body in one write)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.request_version == "HTTP/0.9":
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            return
        buffer: list[bytes] = self._headers_buffer  # type: ignore[attr-defined]
        buffer.append(b"\r\n")
        if self.command != "HEAD" and body:
            buffer.append(body)
        self.flush_headers()
