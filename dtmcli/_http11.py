"""A lean HTTP/1.1 transport on plain sockets: the default for DTM's small JSON calls.

Why: urllib3 spends most of a call in its own layers (URL parsing, pool lookup, header objects,
``email``-based header parsing, a wrapper per read for the total deadline), twice the CPU of a bare
``http.client`` request. This transport writes each request with one ``sendall`` and parses the
answer from the bytes it receives (usually one ``recv``), and keeps what :class:`Urllib3Transport`
guarantees:

* **pooling and thread safety**: idle keep-alive connections per (scheme, host, port) in a list;
  a call takes one (``list.pop`` is atomic) and gives it back when the answer was read completely
  and the server keeps the connection open; at most ``pool_maxsize`` idle ones are kept per host;
* **fork safety**: a forked child never uses (or closes) the connections it inherited;
* **TLS** through an ``ssl.SSLContext`` (default: ``ssl.create_default_context()``, which verifies
  the certificate and the host name);
* **a total deadline**: every connect, send and receive gets the time left of the call;
* **the same errors**: DtmConnectError (nothing sent), DtmConnectTimeout, DtmTimeout,
  DtmTransportError, raised for the same causes as the urllib3 transport;
* **the same request target**: the URL goes through urllib3's parser (percent-encoding, dot
  segments, no userinfo), cached per URL.

Proxies are not spoken here: :func:`~dtmcli._transport.default_transport` picks the requests
transport when a proxy is configured, and :class:`Urllib3Transport` takes ``proxy_url``.

**A stale keep-alive connection** (the server closed it while it was idle) is detected before use
with a zero-timeout poll and replaced. If a reused connection still fails, the request is sent again
on a new connection only when the server cannot have processed it: the send itself failed (so the
request never arrived complete), or the method is safe (GET, HEAD, OPTIONS) and not one byte of an
answer came back. A POST (submit, prepare, ...) that was sent completely is never resent: its
failure is raised and the client's flow decides (protocol.md §2).
"""

from __future__ import annotations

import logging
import os
import re
import select
import socket
import ssl
import threading
import time
import zlib
from typing import Any, Mapping, Optional
from urllib.parse import urlencode

from urllib3.util import parse_url

from ._protocol import Response
from .errors import DtmConnectError, DtmConnectTimeout, DtmInvalidInput, DtmTimeout, DtmTransportError

__all__ = ["Http11Transport", "MAX_TIMEOUT", "check_timeout"]

logger = logging.getLogger("dtmcli")

MAX_TIMEOUT = 1e9
"""The longest timeout in seconds (about 31 years); sockets refuse much larger ones with OverflowError."""


def check_timeout(value: Any, what: str = "timeout") -> Optional[float]:
    """``value`` if it is a positive, finite number of seconds or ``None`` (no deadline), else DtmInvalidInput."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT:
        raise DtmInvalidInput(
            f"{what} must be a positive number of seconds up to 1e9, or None for no deadline, not {value!r}"
        )
    return value


# -- fork safety: as in _transport, a global pid set by an at-fork hook (a global read costs ~15 ns,
# os.getpid() is a syscall). A child drops the inherited connections unused and never closes them:
# closing a TLS socket may send close_notify on a connection the parent still uses.
_pid = os.getpid()
_renew_lock = threading.Lock()
_inherited: list[Any] = []


def _after_fork_in_child() -> None:
    global _pid, _renew_lock
    _pid = os.getpid()
    _renew_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

MAX_HEADER_BYTES = 65536 + 100 * 1024
"""The longest status line plus header block read (http.client: 64 KiB a line, 100 headers)."""
MAX_HEADERS = 100
_RECV = 65536
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # sent with Content-Length: 0 when bodiless
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_BAD_RE = re.compile(r"[\x00\r\n]")
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
"""Header names a caller may not give: the transport writes them itself (lower case)."""
_CACHE_MAX = 1024
_MAX_HOSTS = 64  # (scheme, host, port) with idle connections; past it the oldest host's are closed
_USER_AGENT = "python-dtmcli"


class _Closed(Exception):
    """The server closed (or reset) the connection before one byte of the answer."""


class _Conn:
    """One keep-alive connection: its socket and a poller to see it was closed while idle."""

    __slots__ = ("poller", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)

    def stale(self) -> bool:
        """True when the idle connection has something to read: the server's FIN, a reset, or junk."""
        if self.poller.poll(0):
            return True
        pending = getattr(self.sock, "pending", None)  # TLS bytes already decrypted
        return bool(pending is not None and pending())

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _Target:
    """A parsed URL: where to connect and the bytes of the request line's target and Host header."""

    __slots__ = ("host", "host_header", "key", "port", "target", "tls")

    def __init__(self, url: str) -> None:
        try:
            parsed = parse_url(url)
        except Exception as exc:  # urllib3's LocationParseError and friends
            raise DtmInvalidInput(f"cannot send to {url!r}: {exc}") from None
        scheme = (parsed.scheme or "http").lower()
        if scheme not in ("http", "https") or not parsed.host:
            raise DtmInvalidInput(f"cannot send to {url!r}: not an http(s) URL with a host")
        self.tls = scheme == "https"
        default_port = 443 if self.tls else 80
        self.port = parsed.port or default_port
        host = parsed.host
        self.host = host[1:-1] if host.startswith("[") else host
        self.host_header = host if self.port == default_port else f"{host}:{self.port}"
        target = parsed.request_uri or "/"
        if _HEADER_VALUE_BAD_RE.search(target) or " " in target or _HEADER_VALUE_BAD_RE.search(self.host_header):
            raise DtmInvalidInput(f"cannot send to {url!r}: control characters or spaces in the URL")
        self.target = target
        self.key = (scheme, self.host, self.port)


def _header_bytes(headers: Mapping[str, str]) -> bytes:
    """The caller's headers as wire bytes, checked as http.client checks them (and no framing ones)."""
    out = []
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME_RE.fullmatch(name):
            raise DtmInvalidInput(f"{name!r} is not a valid HTTP header name")
        if name.lower() in FRAMING_HEADERS:
            raise DtmInvalidInput(f"header {name!r} is set by the transport itself")
        if not isinstance(value, str) or _HEADER_VALUE_BAD_RE.search(value):
            raise DtmInvalidInput(f"header {name!r} must be a str without CR, LF or NUL")
        out.append(f"{name}: {value}\r\n")
    try:
        return "".join(out).encode("latin-1")
    except UnicodeEncodeError as exc:
        raise DtmInvalidInput(f"a header value has characters outside latin-1: {exc}") from None


class _Answer:
    """Reads one response from a socket, each receive bounded by the call's deadline."""

    __slots__ = ("at", "buf", "got_any", "sock")

    def __init__(self, sock: Any, at: Optional[float]) -> None:
        self.sock = sock
        self.at = at
        self.buf = b""
        self.got_any = False

    def recv(self) -> bytes:
        at = self.at
        if at is not None:
            left = at - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out (total deadline)")
            self.sock.settimeout(left)
        data: bytes = self.sock.recv(_RECV)
        if data:
            self.got_any = True
        return data

    def more(self, what: str) -> None:
        data = self.recv()
        if not data:
            raise DtmTransportError(f"the server closed the connection in the middle of the {what}")
        self.buf += data

    def head(self) -> tuple[int, bytes, dict[bytes, bytes]]:
        """Status, version and the headers we use (lower-case names; repeated ones joined by commas)."""
        while True:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            skip = 4
            if end < 0:
                end, skip = buf.find(b"\n\n"), 2  # bare LF line ends, which http.client accepts too
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    raise DtmTransportError("the response header is too long")
                if not buf and not self.got_any:
                    try:
                        data = self.recv()
                    except (ConnectionResetError, BrokenPipeError) as exc:
                        raise _Closed(str(exc)) from exc
                    if not data:
                        raise _Closed("the server closed the connection without answering")
                    self.buf = data
                else:
                    self.more("response header")
                continue
            lines = buf[:end].split(b"\n")
            self.buf = buf[end + skip :]
            status_line = lines[0].rstrip(b"\r")
            version, _, rest = status_line.partition(b" ")
            code = rest[:3]
            if version not in (b"HTTP/1.1", b"HTTP/1.0") or not (code.isdigit() and len(code) == 3) or (
                rest[3:4] not in (b"", b" ")
            ):
                raise DtmTransportError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
            status = int(code)
            if len(lines) > MAX_HEADERS + 1:
                raise DtmTransportError(f"more than {MAX_HEADERS} response headers")
            headers: dict[bytes, bytes] = {}
            last = b""
            for line in lines[1:]:
                line = line.rstrip(b"\r")
                if line[:1] in (b" ", b"\t") and last:  # obsolete line folding
                    headers[last] += b" " + line.strip()
                    continue
                name, sep, value = line.partition(b":")
                if not sep:
                    raise DtmTransportError(f"malformed response header line {line[:80]!r}")
                last = name.strip().lower()
                value = value.strip()
                headers[last] = headers[last] + b"," + value if last in headers else value
            if 100 <= status < 200:
                if status == 101:
                    raise DtmTransportError("the server switched protocols (101), which was not asked for")
                continue  # an interim answer (103 Early Hints, ...): the real one follows
            return status, version, headers

    def exactly(self, n: int) -> bytes:
        """The next ``n`` bytes of the body."""
        buf = self.buf
        if len(buf) >= n:
            self.buf = buf[n:]
            return buf[:n] if len(buf) > n else buf
        out = bytearray(n)
        view = memoryview(out)
        view[: len(buf)] = buf
        got = len(buf)
        self.buf = b""
        sock = self.sock
        while got < n:
            at = self.at
            if at is not None:
                left = at - time.monotonic()
                if left <= 0:
                    raise socket.timeout("timed out (total deadline)")
                sock.settimeout(left)
            k = sock.recv_into(view[got:], min(n - got, 1 << 20))
            if not k:
                raise DtmTransportError(f"the server closed the connection after {got} of {n} body bytes")
            got += k
        return bytes(out)

    def line(self) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line, self.buf = self.buf[:end], self.buf[end + 1 :]
                return line.rstrip(b"\r")
            if len(self.buf) > 65536:
                raise DtmTransportError("a chunk header line is too long")
            self.more("chunked body")

    def chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size_text = self.line().split(b";", 1)[0].strip()
            try:
                if not size_text or size_text.lstrip(b"0123456789abcdefABCDEF"):
                    raise ValueError
                size = int(size_text, 16)
            except ValueError:
                raise DtmTransportError(f"invalid chunk size {size_text[:40]!r}") from None
            if size == 0:
                while self.line():  # trailers, up to the blank line
                    pass
                return b"".join(parts)
            parts.append(self.exactly(size))
            if self.exactly(2) not in (b"\r\n",):
                raise DtmTransportError("a chunk does not end with CRLF")

    def until_close(self) -> bytes:
        parts = [self.buf]
        self.buf = b""
        while True:
            data = self.recv()
            if not data:
                return b"".join(parts)
            parts.append(data)


def _decode(body: bytes, coding: bytes) -> bytes:
    """Undo a gzip/deflate Content-Encoding (urllib3 does too, although identity was asked for)."""
    coding = coding.strip().lower()
    try:
        if coding in (b"gzip", b"x-gzip"):
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if coding == b"deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise DtmTransportError(f"cannot decode the {coding.decode('latin-1')} response body: {exc}") from exc
    return body


def _read_response(answer: _Answer, method: str) -> tuple[int, bytes, bool]:
    """Status, body, and whether the connection may carry another request."""
    status, version, headers = answer.head()
    connection = headers.get(b"connection", b"").lower()
    if version == b"HTTP/1.1":
        keep = b"close" not in connection
    else:
        keep = b"keep-alive" in connection
    te = headers.get(b"transfer-encoding")
    if method == "HEAD" or status in (204, 304):
        body = b""
    elif te is not None:
        if te.lower().rsplit(b",", 1)[-1].strip() == b"chunked":
            body = answer.chunked()
        else:
            body, keep = answer.until_close(), False
        if b"content-length" in headers:
            keep = False  # both framings: answer read by Transfer-Encoding, connection not trusted again
    elif b"content-length" in headers:
        values = {v.strip() for v in headers[b"content-length"].split(b",")}
        length = values.pop() if len(values) == 1 else b""
        if not length.isdigit() or len(length) > 18:
            raise DtmTransportError(f"invalid Content-Length {headers[b'content-length'][:40]!r}")
        body = answer.exactly(int(length))
    else:
        body, keep = answer.until_close(), False
    if answer.buf:
        keep = False  # bytes after the answer: the connection is out of step
    coding = headers.get(b"content-encoding")
    if coding is not None and body:
        body = _decode(body, coding)
    return status, body, keep


class Http11Transport:
    """A thread-safe keep-alive HTTP/1.1 client on sockets (see the module docstring).

    ``timeout`` is a total deadline per request in seconds (``None``: none). ``pool_maxsize`` idle
    connections are kept per host. ``ssl_context`` is used for https (default: verified against
    the system's CAs). It speaks to servers directly: for a proxy use :class:`RequestsTransport`
    or :class:`Urllib3Transport` with ``proxy_url``.
    """

    def __init__(
        self,
        *,
        timeout: Optional[float] = 10.0,
        pool_maxsize: int = 32,
        ssl_context: Optional[ssl.SSLContext] = None,
    ) -> None:
        if isinstance(pool_maxsize, bool) or not isinstance(pool_maxsize, int) or pool_maxsize < 1:
            raise DtmInvalidInput(f"pool_maxsize must be a positive int, not {pool_maxsize!r}")
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise DtmInvalidInput(f"ssl_context must be an ssl.SSLContext, not {type(ssl_context).__name__}")
        self.timeout = check_timeout(timeout)
        self.pool_maxsize = pool_maxsize
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._targets: dict[str, _Target] = {}
        self._headers: dict[Any, bytes] = {}
        self._pid = _pid

    # -- connections -------------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    def _connect(self, t: _Target, at: Optional[float], method: str, url: str) -> _Conn:
        left = None if at is None else at - time.monotonic()
        if left is not None and left <= 0:
            raise DtmConnectTimeout(f"{method} {url}: connecting timed out: no time left")
        try:
            sock = socket.create_connection((t.host, t.port), timeout=left)
        except socket.timeout as exc:
            raise DtmConnectTimeout(f"{method} {url}: connecting timed out: {exc}") from exc
        except OSError as exc:  # refused, unreachable, DNS (gaierror)
            raise DtmConnectError(f"{method} {url}: cannot connect: {exc}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if t.tls:
                if at is not None:
                    sock.settimeout(max(at - time.monotonic(), 1e-3))
                sock = self._context().wrap_socket(sock, server_hostname=t.host)
        except socket.timeout as exc:
            sock.close()
            raise DtmTimeout(f"{method} {url} timed out: TLS handshake: {exc}") from exc
        except (OSError, ssl.CertificateError) as exc:  # ssl.SSLError is an OSError
            sock.close()
            raise DtmTransportError(f"{method} {url} failed: TLS: {exc}") from exc
        return _Conn(sock)

    def _take(self, key: tuple[str, str, int]) -> Optional[_Conn]:
        idle = self._idle.get(key)
        while idle:
            try:
                conn = idle.pop()
            except IndexError:  # another thread took the last one
                return None
            if not conn.stale():
                return conn
            conn.close()
        return None

    def _give_back(self, key: tuple[str, str, int], conn: _Conn, pid: int) -> None:
        idle = self._idle.get(key)
        if idle is None:
            if len(self._idle) >= _MAX_HOSTS:
                self._forget_oldest_host()
            idle = self._idle.setdefault(key, [])
        if pid == self._pid and len(idle) < self.pool_maxsize:
            idle.append(conn)
        else:
            conn.close()

    def _forget_oldest_host(self) -> None:
        """Close the idle connections of the host that got its first one longest ago (as urllib3's
        PoolManager bounds its pools): a process calling many hosts keeps no socket per host forever."""
        try:
            oldest = next(iter(self._idle))
            conns = self._idle.pop(oldest)
        except (StopIteration, KeyError, RuntimeError):  # emptied or changed by another thread
            return
        while conns:
            try:
                conns.pop().close()
            except IndexError:
                break

    def _target(self, url: str) -> _Target:
        t = self._targets.get(url)
        if t is None:
            t = _Target(url)
            if len(self._targets) >= _CACHE_MAX:
                self._targets.clear()
            self._targets[url] = t
        return t

    def _header_block(self, headers: Mapping[str, str]) -> bytes:
        key = tuple(headers.items())
        try:
            block = self._headers.get(key)
        except TypeError:  # an unhashable value: checked below, not cached
            return _header_bytes(headers)
        if block is None:
            block = _header_bytes(headers)
            if len(self._headers) >= _CACHE_MAX:
                self._headers.clear()
            self._headers[key] = block
        return block

    # -- the call ----------------------------------------------------------------------------

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
        if self._pid != _pid:
            self._after_fork()
        if timeout is None:
            timeout = self.timeout
        started = time.perf_counter()
        at = None if timeout is None else time.monotonic() + timeout
        if params:
            full = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
            if "#" in url:  # the parameters land in the fragment, as with urllib3
                t = _Target(full)
                target = t.target
            else:
                t = self._target(url)
                target = f"{t.target}{'&' if '?' in t.target else '?'}{urlencode(params)}"
        else:
            t = self._target(url)
            target = t.target
        if headers is None:
            block = b"Content-Type: application/json\r\n" if body is not None else b""
        elif headers:
            block = self._header_block(headers)
        else:
            block = b""
        if isinstance(body, str):  # as urllib3 takes it
            body = body.encode()
        if body is not None:
            length = len(body)
            block += b"Content-Length: %d\r\n" % length
        elif method in _BODY_METHODS:
            block += b"Content-Length: 0\r\n"
        if not method.isalpha() or not method.isascii():
            raise DtmInvalidInput(f"{method!r} is not an HTTP method")
        try:
            head = (
                f"{method} {target} HTTP/1.1\r\nHost: {t.host_header}\r\nUser-Agent: {_USER_AGENT}\r\n"
                "Accept-Encoding: identity\r\n"
            ).encode("ascii") + block + b"\r\n"
        except UnicodeEncodeError:
            raise DtmInvalidInput(f"cannot send to {url!r}: the request target is not ASCII") from None
        if body is not None and len(body) <= 65536:
            payload: Any = head + bytes(body)
            rest: Any = None
        else:
            payload, rest = head, body
        try:
            status, content = self._exchange(t, payload, rest, method, url, at)
        except socket.timeout as exc:
            raise DtmTimeout(f"{method} {url} timed out: {exc}") from exc
        except OSError as exc:
            raise DtmTransportError(f"{method} {url} failed: {exc}") from exc
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s %s -> %d in %.1f ms (%d bytes)",
                method, url, status, (time.perf_counter() - started) * 1000, len(content),
            )
        return Response(status, content)

    def _exchange(
        self, t: _Target, payload: bytes, rest: Optional[bytes], method: str, url: str, at: Optional[float]
    ) -> tuple[int, bytes]:
        key = t.key
        pid = self._pid
        conn = self._take(key)
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._connect(t, at, method, url)
            sock = conn.sock
            keep = False
            try:
                if at is not None:
                    left = at - time.monotonic()
                    if left <= 0:
                        raise socket.timeout("timed out (total deadline)")
                    sock.settimeout(left)
                else:
                    sock.settimeout(None)
                try:
                    sock.sendall(payload)
                    if rest is not None:
                        sock.sendall(rest)
                except (ConnectionResetError, BrokenPipeError) as exc:
                    if reused:  # the request never arrived whole: safe to send on a new connection
                        logger.debug("%s %s: kept-alive connection was closed (%s); new connection", method, url, exc)
                        conn.close()
                        conn, reused = None, False
                        continue
                    raise
                answer = _Answer(sock, at)
                try:
                    status, content, keep = _read_response(answer, method)
                except _Closed as exc:
                    if reused and method in _SAFE_METHODS:
                        logger.debug("%s %s: kept-alive connection was closed (%s); new connection", method, url, exc)
                        conn.close()
                        conn, reused = None, False
                        continue
                    raise DtmTransportError(
                        f"{method} {url} failed: {exc}; the request may have been processed"
                    ) from None
                return status, content
            finally:
                if conn is not None:
                    if keep:
                        self._give_back(key, conn, pid)
                    else:
                        conn.close()

    # -- lifecycle ---------------------------------------------------------------------------

    def _after_fork(self) -> None:
        """In a forked child: forget the inherited connections without closing them (the parent's)."""
        with _renew_lock:
            if self._pid != _pid:
                self._renew_pools()
                self._pid = _pid

    def _renew_pools(self) -> None:
        _inherited.append(self._idle)
        self._idle = {}

    def close(self) -> None:
        """Close every idle connection (in a forked child: drop the inherited ones unused)."""
        if self._pid != _pid:
            self._after_fork()
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            while conns:
                try:
                    conns.pop().close()
                except IndexError:
                    break
