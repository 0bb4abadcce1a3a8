"""Sans-I/O HTTP/1.1 for the lean transports: request bytes, response parsing, the resend rule.

One core, two thin drivers: :class:`dtmcli._http11.Http11Transport` (blocking sockets) and
:class:`dtmcli.asyncio._http11.AsyncHttp11Transport` (an asyncio Protocol). Nothing here touches a
socket. A request is prepared by :class:`RequestWriter` (the URL parsed once and cached, the caller's
headers checked and cached, head and small body in one buffer). The exchange is the generator
:func:`exchange` (the style of :mod:`dtmcli._flow`): it yields what its driver must do next —
:data:`SEND` (write the request), :data:`RECONNECT` (drop the connection, open a new one), or a
positive number (receive up to that many bytes and send them in; ``b""`` at EOF), or :data:`CHECK`
(only look at the deadline) — has the socket's errors thrown in at the ``yield``, and returns
``(status, body, keep_alive)``.

**The resend rule** (protocol.md §2: never send a submit twice) lives in :func:`exchange` only. On a
reused keep-alive connection the request goes again on a new connection only when (a) not one byte
of it can have left: the driver's first write was refused outright (it throws :class:`Unsent`), or
(b) the method is safe (GET, HEAD, OPTIONS) and not one byte of an answer came back. Once any byte
left, a POST (PUT, PATCH, DELETE) is never resent, even when the rest of it could not be written: a
server may act on a request's head (a handler reading only the query, an auth or size limit layer)
and answer before reading the body. So after a reset or broken pipe on send the answer is read, as
urllib3 does: an early answer (the coordinator's 413 for a body over 8 MiB) comes back as the
response; without one the failure is a DtmTransportError saying the request may have been
processed, never DtmConnectError (which the client's flows read as "nothing sent"). On a fresh
connection nothing is resent.

**Bounds on what a server sends.** A body is read in parts of at most :data:`MAX_READ` whatever
length it announces (a hostile ``Content-Length`` or chunk size commits no memory), so the deadline
and the bytes actually received bound it, as with urllib3. A ``Content-Encoding`` the server used
although ``identity`` was asked for (gzip, several members too, or deflate) is decoded step by step
and refused past :data:`MAX_DECODED` bytes (urllib3 has no bound: a 1 MiB gzip bomb becomes 1 GiB).
Transfer codings other than ``chunked`` are refused.
"""

from __future__ import annotations

import errno
import logging
import re
import zlib
from typing import Any, Generator, Generic, Mapping, Optional, Protocol, TypeVar
from urllib.parse import urlencode

from urllib3.util import parse_url

from .errors import DtmInvalidInput, DtmTransportError

__all__ = [
    "RequestWriter", "Target", "exchange", "read_response", "SEND", "RECONNECT", "CHECK", "RECV_SIZE",
    "MAX_HEADER_BYTES", "MAX_HEADERS", "MAX_DECODED", "FRAMING_HEADERS", "MAX_HOSTS", "Closed", "Unsent",
    "IdleConnections",
]

logger = logging.getLogger("dtmcli")

MAX_HEADER_BYTES = 65536 + 100 * 1024
"""The longest status line plus header block read (http.client: 64 KiB a line, 100 headers)."""
MAX_HEADERS = 100
RECV_SIZE = 65536
"""What a driver asks for when reading a head (one receive is usually the whole answer)."""
MAX_READ = 1 << 20
"""The most one body read asks for."""
MAX_DECODED = 64 << 20
"""The largest response body decoded from a gzip/deflate Content-Encoding (8x the coordinator's 8 MiB
request limit); past it the answer is a DtmTransportError."""
_DECODE_STEP = 1 << 20
SEND = 0
"""Yielded by :func:`exchange`: write the prepared request. The driver sends ``None`` when all of it
was written, throws :class:`Unsent` when its first write was refused outright (not one byte left),
and throws the socket's error otherwise."""
RECONNECT = -1
"""Yielded by :func:`exchange`: close this connection and open a new one to the same host."""
CHECK = -2
"""Yielded while decoding a large body: the driver checks its deadline (throwing its timeout in) and
sends ``None``."""
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # sent with Content-Length: 0 when bodiless
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HEADER_VALUE_BAD_RE = re.compile(r"[\x00\r\n]")
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
"""Header names a caller may not give: the transport writes them itself (lower case)."""
_CACHE_MAX = 1024
MAX_HOSTS = 64
"""(scheme, host, port) with idle connections kept; past it the oldest host's are closed."""
_USER_AGENT = "python-dtmcli"
_INLINE_BODY = 65536  # bodies up to this size leave in the same write as the head


class Closed(Exception):
    """The server closed (or reset) the connection before one byte of the answer."""


class Unsent(Exception):
    """Thrown into :func:`exchange` by a driver at :data:`SEND`: the first write of the request was
    refused outright, so not one byte of it left (``cause``: the socket's error)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _broken(exc: BaseException) -> bool:
    """A reset / broken pipe (EPROTOTYPE on macOS) while writing: the server may have answered early."""
    return isinstance(exc, ConnectionError) or getattr(exc, "errno", None) == errno.EPROTOTYPE


# -- the request ----------------------------------------------------------------------------------


class Target:
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
        self.port: int = parsed.port or default_port
        host = parsed.host
        self.host: str = host[1:-1] if host.startswith("[") else host
        self.host_header = host if self.port == default_port else f"{host}:{self.port}"
        target = parsed.request_uri or "/"
        if _HEADER_VALUE_BAD_RE.search(target) or " " in target or _HEADER_VALUE_BAD_RE.search(self.host_header):
            raise DtmInvalidInput(f"cannot send to {url!r}: control characters or spaces in the URL")
        self.target = target
        self.key = (scheme, self.host, self.port)


def header_bytes(headers: Mapping[str, str]) -> bytes:
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


class RequestWriter:
    """Builds request bytes; caches parsed URLs and checked header sets (bounded, thread-safe enough:
    a lost cache entry is only recomputed)."""

    __slots__ = ("_headers", "_targets")

    def __init__(self) -> None:
        self._targets: dict[str, Target] = {}
        self._headers: dict[Any, bytes] = {}

    def target(self, url: str) -> Target:
        """The parsed ``url`` (cached)."""
        t = self._targets.get(url)
        if t is None:
            t = Target(url)
            if len(self._targets) >= _CACHE_MAX:
                self._targets.clear()
            self._targets[url] = t
        return t

    def _header_block(self, headers: Mapping[str, str]) -> bytes:
        key = tuple(headers.items())
        try:
            block = self._headers.get(key)
        except TypeError:  # an unhashable value: checked below, not cached
            return header_bytes(headers)
        if block is None:
            block = header_bytes(headers)
            if len(self._headers) >= _CACHE_MAX:
                self._headers.clear()
            self._headers[key] = block
        return block

    def prepare(
        self,
        method: str,
        url: str,
        params: Optional[Mapping[str, str]],
        body: Optional[bytes],
        headers: Optional[Mapping[str, str]],
    ) -> tuple[Target, bytes, Optional[bytes]]:
        """Where to send, the first bytes to write (head, and the body when small), the rest (a large body).

        Bad input (URL, header, method) is DtmInvalidInput, before anything is sent."""
        if params:
            full = f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"
            if "#" in url:  # the parameters land in the fragment, as with urllib3
                t = Target(full)
                target = t.target
            else:
                t = self.target(url)
                target = f"{t.target}{'&' if '?' in t.target else '?'}{urlencode(params)}"
        else:
            t = self.target(url)
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
            block += b"Content-Length: %d\r\n" % len(body)
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
        if body is not None and len(body) <= _INLINE_BODY:
            return t, head + bytes(body), None
        return t, head, body


# -- idle connections -------------------------------------------------------------------------------


class Idle(Protocol):
    """What the pool needs of a connection."""

    def stale(self) -> bool:
        """True when the server closed it (or sent something) while it was idle."""
        ...

    def close(self) -> None:
        """Close it (never raises)."""
        ...


C = TypeVar("C", bound=Idle)
Key = tuple[str, str, int]


class IdleConnections(dict[Key, list[C]], Generic[C]):
    """Idle keep-alive connections per (scheme, host, port), newest last.

    Safe across threads without a lock (``list.pop``/``append`` are atomic under the GIL; a race
    only closes a connection that could have been kept). At most :data:`MAX_HOSTS` hosts: past it
    the idle connections of the host that got its first one longest ago are closed (as urllib3's
    PoolManager bounds its pools), so a process calling many hosts keeps no socket per host forever.
    """

    def take(self, key: Key) -> Optional[C]:
        """An idle connection to ``key`` that is still open, or None; stale ones are closed."""
        idle = self.get(key)
        while idle:
            try:
                conn = idle.pop()
            except IndexError:  # another thread took the last one
                return None
            if not conn.stale():
                return conn
            conn.close()
        return None

    def put(self, key: Key, conn: C, maxsize: int) -> None:
        """Keep ``conn`` for reuse, or close it when ``maxsize`` are idle for its host already."""
        idle = self.get(key)
        if idle is None:
            if len(self) >= MAX_HOSTS:
                self.forget_oldest_host()
            idle = self.setdefault(key, [])
        if len(idle) < maxsize:
            idle.append(conn)
        else:
            conn.close()

    def forget_oldest_host(self) -> None:
        """Close the idle connections of the oldest host."""
        try:
            oldest = next(iter(self))
            conns = self.pop(oldest)
        except (StopIteration, KeyError, RuntimeError):  # emptied or changed by another thread
            return
        while conns:
            try:
                conns.pop().close()
            except IndexError:
                break

    def close_all(self) -> None:
        """Close every idle connection."""
        for conns in list(self.values()):
            while conns:
                try:
                    conns.pop().close()
                except IndexError:
                    break
        self.clear()


# -- the exchange ---------------------------------------------------------------------------------

Reading = Generator[int, bytes, Any]


def exchange(method: str, url: str, reused: bool) -> Generator[int, Any, tuple[int, bytes, bool]]:
    """One request on a connection (``reused``: taken from the pool), with the resend rule above.

    Yields SEND, RECONNECT, CHECK or a byte count to receive; returns status, body and whether the
    connection may carry another request."""
    while True:
        try:
            yield SEND
        except Unsent as unsent:
            if not reused:
                raise unsent.cause from None
            # Not one byte left: no server can have seen any of it, whatever the method.
            logger.debug("%s %s: kept-alive connection was closed (%s); new connection", method, url, unsent)
            reused = False
            yield RECONNECT
            continue
        except OSError as exc:
            if not _broken(exc):
                raise
            # Part of the request left and the server may have acted on its head: read what it answered.
            logger.debug("%s %s: the server stopped reading the request (%s); reading its answer", method, url, exc)
            try:
                status, body, _ = yield from read_response(method)
            except Closed:
                if reused and method in SAFE_METHODS:
                    reused = False
                    yield RECONNECT
                    continue
                raise DtmTransportError(
                    f"{method} {url} failed: {exc}; the request may have been processed"
                ) from None
            return status, body, False
        try:
            return (yield from read_response(method))
        except Closed as exc:
            if reused and method in SAFE_METHODS:
                logger.debug("%s %s: kept-alive connection was closed (%s); new connection", method, url, exc)
                reused = False
                yield RECONNECT
                continue
            raise DtmTransportError(f"{method} {url} failed: {exc}; the request may have been processed") from None


def _more(buf: bytes, what: str) -> Reading:
    data = yield RECV_SIZE
    if not data:
        raise DtmTransportError(f"the server closed the connection in the middle of the {what}")
    return buf + data


def _exactly(buf: bytes, n: int) -> Reading:
    """The next ``n`` bytes and what follows them in the buffer."""
    if len(buf) >= n:
        return (buf, b"") if len(buf) == n else (buf[:n], buf[n:])
    parts = [buf]
    got = len(buf)
    while got < n:
        data = yield min(n - got, MAX_READ)
        if not data:
            raise DtmTransportError(f"the server closed the connection after {got} of {n} body bytes")
        parts.append(data)
        got += len(data)
    whole = b"".join(parts)
    return (whole, b"") if got == n else (whole[:n], whole[n:])


def _line(buf: bytes) -> Reading:
    while True:
        end = buf.find(b"\n")
        if end >= 0:
            return buf[:end].rstrip(b"\r"), buf[end + 1 :]
        if len(buf) > 65536:
            raise DtmTransportError("a chunk header line is too long")
        buf = yield from _more(buf, "chunked body")


def _chunked(buf: bytes) -> Reading:
    parts: list[bytes] = []
    while True:
        line, buf = yield from _line(buf)
        size_text = line.split(b";", 1)[0].strip()
        try:
            if not size_text or len(size_text) > 16 or size_text.lstrip(b"0123456789abcdefABCDEF"):
                raise ValueError
            size = int(size_text, 16)
        except ValueError:
            raise DtmTransportError(f"invalid chunk size {size_text[:40]!r}") from None
        if size == 0:
            while True:  # trailers, up to the blank line
                line, buf = yield from _line(buf)
                if not line:
                    return b"".join(parts), buf
        part, buf = yield from _exactly(buf, size)
        parts.append(part)
        crlf, buf = yield from _exactly(buf, 2)
        if crlf != b"\r\n":
            raise DtmTransportError("a chunk does not end with CRLF")


def _until_close(buf: bytes) -> Reading:
    parts = [buf]
    while True:
        data = yield RECV_SIZE
        if not data:
            return b"".join(parts)
        parts.append(data)


def _inflate(data: bytes, wbits: int, parts: list[bytes], total: int) -> Generator[int, Any, tuple[int, bytes]]:
    """One zlib/gzip/raw-deflate stream of ``data`` into ``parts`` (at most :data:`MAX_DECODED` bytes
    in all, :data:`CHECK` between steps): the total, and what follows the stream's end."""
    d = zlib.decompressobj(wbits)
    while True:
        part = d.decompress(data, _DECODE_STEP)
        total += len(part)
        if total > MAX_DECODED:
            raise DtmTransportError(f"the decoded response body is too large: over {MAX_DECODED} bytes")
        parts.append(part)
        data = d.unconsumed_tail
        if d.eof:
            return total, d.unused_data
        if not data and not part:
            raise DtmTransportError("the response body ends in the middle of its compressed stream")
        if total > _DECODE_STEP:
            yield CHECK


def decode_body(body: bytes, coding: bytes) -> Generator[int, Any, bytes]:
    """Undo a gzip (every member, as urllib3) or deflate Content-Encoding, which urllib3 does too
    although identity was asked for; bounded by :data:`MAX_DECODED`, yielding :data:`CHECK`."""
    coding = coding.strip().lower()
    parts: list[bytes] = []
    try:
        if coding in (b"gzip", b"x-gzip"):
            total, rest = yield from _inflate(body, 16 + zlib.MAX_WBITS, parts, 0)
            while rest:  # another member; garbage after a complete one is ignored, as urllib3 and gzip do
                try:
                    total, rest = yield from _inflate(rest, 16 + zlib.MAX_WBITS, parts, total)
                except zlib.error:
                    break
        elif coding == b"deflate":
            try:
                yield from _inflate(body, zlib.MAX_WBITS, parts, 0)
            except zlib.error:  # raw deflate without the zlib wrapper, as some servers send it
                parts.clear()
                yield from _inflate(body, -zlib.MAX_WBITS, parts, 0)
        else:
            return body
    except zlib.error as exc:
        raise DtmTransportError(f"cannot decode the {coding.decode('latin-1')} response body: {exc}") from exc
    return b"".join(parts)


def _head_end(buf: bytes) -> tuple[int, int]:
    """Where the head ends (at its first empty line, ending in CRLF or a bare LF as http.client
    accepts) and the length of that line break plus the empty line; ``(-1, 0)`` if not yet there."""
    crlf = buf.find(b"\n\r\n")  # a line, then an empty CRLF line (the usual \r\n\r\n included)
    lf = buf.find(b"\n\n", 0, len(buf) if crlf < 0 else crlf + 2)  # an earlier empty bare-LF line
    if lf >= 0:
        return lf, 2
    if crlf >= 0:
        return (crlf - 1, 4) if buf[crlf - 1 : crlf] == b"\r" else (crlf, 3)
    return -1, 0


def read_response(method: str) -> Generator[int, bytes, tuple[int, bytes, bool]]:
    """Parse one response from the bytes sent in: status, body, and whether the connection may
    carry another request. Closed when the connection ends (EOF or reset) before its first byte."""
    try:
        buf = yield RECV_SIZE
    except (ConnectionResetError, BrokenPipeError) as exc:
        raise Closed(str(exc)) from exc
    if not buf:
        raise Closed("the server closed the connection without answering")
    while True:  # the head; interim (1xx) answers are skipped
        end, skip = _head_end(buf)
        if end < 0:
            if len(buf) > MAX_HEADER_BYTES:
                raise DtmTransportError("the response header is too long")
            buf = yield from _more(buf, "response header")
            continue
        lines = buf[:end].split(b"\n")
        buf = buf[end + skip :]
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
        break
    connection = headers.get(b"connection", b"").lower()
    if version == b"HTTP/1.1":
        keep = b"close" not in connection
    else:
        keep = b"keep-alive" in connection
    te = headers.get(b"transfer-encoding")
    if method == "HEAD" or status in (204, 304):
        body = b""
    elif te is not None:
        if te.strip().lower() != b"chunked":  # gzip, chunked / identity / ...: not asked for, not decoded
            raise DtmTransportError(f"unsupported response Transfer-Encoding {te[:40]!r}")
        body, buf = yield from _chunked(buf)
        if b"content-length" in headers:
            keep = False  # both framings: answer read by Transfer-Encoding, connection not trusted again
    elif b"content-length" in headers:
        values = {v.strip() for v in headers[b"content-length"].split(b",")}
        length = values.pop() if len(values) == 1 else b""
        if not length.isdigit() or len(length) > 18:
            raise DtmTransportError(f"invalid Content-Length {headers[b'content-length'][:40]!r}")
        n = int(length)
        if len(buf) >= n:  # the usual case: the whole answer came in one receive
            body, buf = (buf, b"") if len(buf) == n else (buf[:n], buf[n:])
        else:
            body, buf = yield from _exactly(buf, n)
    else:
        body, buf, keep = (yield from _until_close(buf)), b"", False
    if buf:
        keep = False  # bytes after the answer: the connection is out of step
    coding = headers.get(b"content-encoding")
    if coding is not None and body:
        body = yield from decode_body(body, coding)
    return status, body, keep
