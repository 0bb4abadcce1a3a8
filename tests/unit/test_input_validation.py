"""Bad input is a DtmInvalidInput before anything is sent (issue 9 items 5-9).

Headers that would let a payload smuggle a second request, URLs and payloads DTM cannot store or
carry, integer options beyond DTM's int64, and gids received from DTM with control or separator
characters. The smuggling tests run the real client against the in-process coordinator and a raw
socket branch service that records every byte it receives.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pydantic
import pytest

from dtmcli import DtmClient, DtmInvalidInput, Msg, Saga, Tcc, Xa, local_gid
from dtmcli._consts import MAX_INT64, MAX_URL_LEN
from dtmcli._protocol import dumps, encode_payload
from dtmcli._transport import RequestsTransport, Transport, Urllib3Transport
from dtmcli._validate import _url_problem, check_headers, check_received_gid
from dtmcli.branch import BranchInfo, BranchRequestError
from dtmcli.testing import BranchService, DtmTestServer

SMUGGLED = "GET /admin/delete-everything HTTP/1.1\r\nHost: branch\r\n\r\n"
_REQUEST_LINE = re.compile(rb"^([A-Z]+ \S+ HTTP/1\.[01])\r$", re.M)


class RawBranchService:
    """A branch 'service' on a bare socket: records the raw bytes of every connection.

    It answers ``200 SUCCESS`` to every request line it sees, so a smuggled request shows up as a
    second request line in the bytes of one connection.
    """

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/try"
        self.received: list[bytes] = []
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            reader = threading.Thread(target=self._read, args=(conn,), daemon=True)
            with self._lock:
                self._readers.append(reader)
            reader.start()

    def _read(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data, answered = b"", 0
        with conn:
            try:
                while chunk := conn.recv(65536):
                    data += chunk
                    for _ in range(len(_REQUEST_LINE.findall(data)) - answered):
                        conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 24\r\n\r\n{"dtm_result":"SUCCESS"}')
                        answered += 1
            except OSError:
                pass
        with self._lock:
            self.received.append(data)

    def request_lines(self) -> list[str]:
        """Every request line received, once the client has closed its connections."""
        with self._lock:
            readers = list(self._readers)
        for reader in readers:
            reader.join(10)
        with self._lock:
            return [line.decode() for data in self.received for line in _REQUEST_LINE.findall(data)]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dtm_server() -> Iterator[DtmTestServer]:
    with DtmTestServer() as server:
        yield server


@pytest.fixture
def raw_branch() -> Iterator[RawBranchService]:
    svc = RawBranchService()
    yield svc
    svc.close()


# -- 9.5 branch headers -----------------------------------------------------------------------

FORBIDDEN_NAMES = [
    "Content-Length",
    "content-length",
    "Transfer-Encoding",
    "TRANSFER-ENCODING",
    "Host",
    "Connection",
    "Keep-Alive",
    "TE",
    "Trailer",
    "Upgrade",
    "Expect",
    "Proxy-Authorization",
    "Proxy-Connection",
    "HTTP2-Settings",
]

BAD_VALUES = {
    "NUL": "a\x00b",
    "C0": "a\x01b",
    "CR LF": "a\r\nX-Injected: 1",
    "LF": "a\nb",
    "DEL": "a\x7fb",
    "C1 NEL": "a\x85b",
    "non-latin-1": "\u20ac5",
    "lone surrogate": "a\ud800",
    "leading space": " token",
    "trailing tab": "token\t",
}


@pytest.mark.parametrize("name", FORBIDDEN_NAMES)
def test_framing_and_hop_by_hop_headers_are_refused(name: str) -> None:
    with pytest.raises(DtmInvalidInput, match="hop-by-hop"):
        Saga("http://127.0.0.1:1/api/dtmsvr", branch_headers={name: "0"})


@pytest.mark.parametrize("value", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_header_values_http_cannot_carry_are_refused(value: str) -> None:
    with pytest.raises(DtmInvalidInput, match="X-Tenant"):
        check_headers({"X-Tenant": value})


@pytest.mark.parametrize("name", ["X-A\x00", "X A", "X-A:", "", "X-\u00e9", "X-\ud800"])
def test_header_names_must_be_tokens(name: str) -> None:
    with pytest.raises(DtmInvalidInput, match="not a valid HTTP header name"):
        check_headers({name: "1"})


def test_header_names_differing_only_in_case_are_refused() -> None:
    with pytest.raises(DtmInvalidInput, match="given twice"):
        check_headers({"X-Tenant": "a", "x-tenant": "b"})


def test_headers_http_can_carry_are_kept() -> None:
    headers = {"Authorization": "Bearer a.b.c", "X-Name": "caf\u00e9", "X-Tab": "a\tb", "X-Empty": "", "Cookie": "k=v"}
    assert check_headers(headers) == headers
    saga = Saga("http://127.0.0.1:1/api/dtmsvr", branch_headers=headers).add("http://h/a", "", {})
    assert saga.build_body()["branch_headers"] == headers


@pytest.mark.parametrize(
    "set_headers",
    [
        lambda t, h: t.set_branch_headers(h),
        lambda t, h: t.set_options(branch_headers=h),
    ],
    ids=["set_branch_headers", "set_options"],
)
def test_refused_headers_leave_the_options_unchanged(set_headers: Callable[[Any, dict[str, str]], Any]) -> None:
    saga = Saga("http://127.0.0.1:1/api/dtmsvr", branch_headers={"X-Ok": "1"})
    with pytest.raises(DtmInvalidInput):
        set_headers(saga, {"X-Ok": "2", "Content-Length": "0"})
    assert saga.options.branch_headers == {"X-Ok": "1"}


SMUGGLING = [
    # urllib3 sends a caller's Content-Length as given: the payload becomes a second request.
    pytest.param(Urllib3Transport, {"Content-Length": "0"}, SMUGGLED, id="urllib3-content-length"),
    # requests adds its own Content-Length next to the caller's chunked framing (TE.CL desync).
    pytest.param(RequestsTransport, {"Transfer-Encoding": "chunked"}, "0\r\n\r\n" + SMUGGLED, id="requests-chunked"),
]


@pytest.mark.parametrize(("transport", "headers", "payload"), SMUGGLING)
def test_tcc_try_cannot_smuggle_a_request_to_the_branch(
    dtm_server: DtmTestServer,
    raw_branch: RawBranchService,
    transport: Callable[[], Transport],
    headers: dict[str, str],
    payload: str,
) -> None:
    """Before the fix the raw service received ``POST /try`` *and* ``GET /admin/...`` on one connection."""
    gid = local_gid()
    client = DtmClient(dtm_server.url, transport=transport())
    error = None
    try:
        tcc = Tcc(client, gid, branch_headers=headers)
        tcc.prepare()
        tcc.call_branch(payload, raw_branch.url, "", "")
        tcc.submit()
    except DtmInvalidInput as exc:
        error = exc
    finally:
        client.close()
    assert raw_branch.request_lines() == []
    assert error is not None and "hop-by-hop" in error.message
    assert dtm_server.query(gid) is None  # refused before prepare


@pytest.mark.parametrize("build", [Saga, Msg, Tcc, Xa])
def test_every_builder_refuses_smuggling_headers_at_the_setter(build: Callable[..., Any]) -> None:
    trans = build("http://127.0.0.1:1/api/dtmsvr")
    for headers in ({"Content-Length": "0"}, {"Transfer-Encoding": "chunked"}, {"X-A": "1\r\nContent-Length: 0"}):
        with pytest.raises(DtmInvalidInput):
            trans.set_branch_headers(headers)
        with pytest.raises(DtmInvalidInput):
            build("http://127.0.0.1:1/api/dtmsvr", branch_headers=headers)
    assert trans.options.branch_headers == {}


# -- 9.6 URLs ---------------------------------------------------------------------------------

BAD_URLS = {
    "NUL": "http://h/\x00a",
    "C0": "http://h/a\x1fb",
    "TAB": "http://h/a\tb",
    "LF": "http://h/a\nb",
    "DEL": "http://h/a\x7f",
    "C1 NEL": "http://h/a\x85",
    "C1 CSI": "http://h/a\x9b",
    "U+2028": "http://h/a\u2028",
    "lone surrogate": "http://h/a\udc80",
    "leading NUL": "\x00http://h/a",
    "too long": "http://h/" + "a" * (MAX_URL_LEN - len("http://h/") + 1),
}


@pytest.mark.parametrize("url", BAD_URLS.values(), ids=BAD_URLS.keys())
def test_bad_urls_are_refused_by_every_builder(url: str) -> None:
    dtm = "http://127.0.0.1:1/api/dtmsvr"
    saga, msg = Saga(dtm), Msg(dtm)
    for add in (
        lambda: saga.add(url, "", {}),
        lambda: saga.add("http://h/a", url, {}),
        lambda: msg.add(url, {}),
        lambda: msg.prepare(url),
        lambda: DtmClient(url),
    ):
        with pytest.raises(DtmInvalidInput):
            add()
    assert saga.steps == () and saga.payloads == () and msg.steps == ()


def test_a_url_of_exactly_the_stored_length_is_accepted() -> None:
    url = "http://h/" + "a" * (MAX_URL_LEN - len("http://h/"))
    assert len(url) == MAX_URL_LEN
    assert Saga("http://127.0.0.1:1/api/dtmsvr").add(url, url, {}).steps == ({"action": url, "compensate": url},)


def test_overlong_urls_are_not_kept_in_the_url_cache() -> None:
    before = _url_problem.cache_info().currsize
    for i in range(20):
        with pytest.raises(DtmInvalidInput, match="characters long"):
            Saga("http://127.0.0.1:1/api/dtmsvr").add(f"http://h/{i}" + "a" * 100_000, "", {})
    assert _url_problem.cache_info().currsize == before


@pytest.mark.parametrize("url", [BAD_URLS["NUL"], BAD_URLS["lone surrogate"], BAD_URLS["too long"]])
def test_tcc_and_xa_refuse_a_bad_url_before_registering(dtm_server: DtmTestServer, url: str) -> None:
    branch_svc = BranchService()
    try:
        ok = branch_svc.route("/ok")
        tcc = Tcc(dtm_server.url, local_gid())
        tcc.prepare()
        for args in ((url, ok, ok), (ok, url, ok), (ok, ok, url)):
            with pytest.raises(DtmInvalidInput):
                tcc.call_branch({}, *args)
        xa = Xa(dtm_server.url, local_gid())
        xa.prepare()
        with pytest.raises(DtmInvalidInput):
            xa.call_branch({}, url)
        for gid in (tcc.gid, xa.gid):
            assert dtm_server.query_json(gid)["branches"] == []
        assert branch_svc.calls() == []
        tcc.abort()
        xa.abort()
    finally:
        branch_svc.close()


# -- 9.7 payloads -----------------------------------------------------------------------------


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": [value]}
    return value


def _circular() -> dict[str, Any]:
    value: dict[str, Any] = {}
    value["self"] = value
    return value


@dataclasses.dataclass
class Order:
    order_id: int
    items: list[str]
    placed: str = "2026-01-02"


class Money(pydantic.BaseModel):
    amount: int
    currency: str


class Transfer(pydantic.BaseModel):
    money: Money
    when: datetime.date
    order: Order


BAD_PAYLOADS = {
    "deeply nested": _nested(sys.getrecursionlimit() * 2),
    "lone surrogate str": "caf\udce9",
    "lone surrogate in a value": {"name": "a\ud83d"},
    "lone surrogate in a key": {"\udfffkey": 1},
    "circular": _circular(),
    "dataclass type": Order,
    "not JSON": {"when": datetime.date(2026, 1, 1)},
}


@pytest.mark.parametrize("payload", BAD_PAYLOADS.values(), ids=BAD_PAYLOADS.keys())
def test_bad_payloads_are_refused_at_add(payload: Any) -> None:
    dtm = "http://127.0.0.1:1/api/dtmsvr"
    saga, msg = Saga(dtm), Msg(dtm)
    with pytest.raises(DtmInvalidInput, match="payload"):
        saga.add("http://h/a", "", payload)
    with pytest.raises(DtmInvalidInput, match="payload"):
        msg.add("http://h/a", payload)
    with pytest.raises(DtmInvalidInput, match="payload"):
        msg.add_topic("orders", payload)
    assert saga.steps == () and msg.steps == ()
    assert saga.payloads == () and msg.payloads == ()


def test_deep_but_encodable_payloads_still_work() -> None:
    assert encode_payload(_nested(50)).count("[") == 50


def test_surrogate_pairs_written_as_escapes_are_fine() -> None:
    # A real astral character is one code point; only an unpaired surrogate is refused.
    assert encode_payload({"emoji": "\U0001f600"}) == '{"emoji":"\U0001f600"}'


def test_dumps_refuses_a_lone_surrogate_as_invalid_input() -> None:
    with pytest.raises(DtmInvalidInput, match="lone surrogate") as exc:
        dumps({"rollback_reason": "x\ud800"})
    assert isinstance(exc.value, ValueError)  # what the branch-side error mapping catches


def test_dataclass_and_pydantic_payloads_are_encoded_as_json() -> None:
    transfer = Transfer(money=Money(amount=30, currency="EUR"), when=datetime.date(2026, 3, 4), order=Order(7, ["x"]))
    saga = (
        Saga("http://127.0.0.1:1/api/dtmsvr")
        .add("http://h/a", "", Order(1, ["a", "b"]))
        .add("http://h/b", "", transfer)
        .add("http://h/c", "", {"orders": [Order(2, [])], "money": Money(amount=1, currency="USD")})
    )
    assert saga.payloads == (
        '{"order_id":1,"items":["a","b"],"placed":"2026-01-02"}',
        '{"money":{"amount":30,"currency":"EUR"},"when":"2026-03-04","order":{"order_id":7,"items":["x"],"placed":"2026-01-02"}}',
        '{"orders":[{"order_id":2,"items":[],"placed":"2026-01-02"}],"money":{"amount":1,"currency":"USD"}}',
    )


def test_pydantic_payload_reaches_the_branch(dtm_server: DtmTestServer) -> None:
    with BranchService() as svc:
        gid = local_gid()
        Saga(dtm_server.url, gid).add(svc.route("/out"), svc.route("/comp"), Money(amount=5, currency="EUR")).submit()
        assert dtm_server.wait_final(gid).status == "succeed"
        assert svc.calls("/out")[0].json() == {"amount": 5, "currency": "EUR"}


def test_pydantic_is_not_imported_by_the_sdk() -> None:
    # Payloads that reach the dataclass/pydantic hook, and one that goes through it and fails.
    code = (
        "import sys, dataclasses, dtmcli, dtmcli.saga, dtmcli.msg, dtmcli.tcc, dtmcli.xa, dtmcli.branch\n"
        "D = dataclasses.make_dataclass('D', ['a'])\n"
        "saga = dtmcli.Saga('http://127.0.0.1:1/api/dtmsvr').add('http://h/a', '', {'a': D(1)})\n"
        "try:\n    saga.add('http://h/a', '', object())\nexcept dtmcli.DtmInvalidInput:\n    pass\n"
        "assert saga.payloads == ('{\"a\":{\"a\":1}}',), saga.payloads\n"
        "assert 'pydantic' not in sys.modules, 'pydantic imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- 9.8 integer options ----------------------------------------------------------------------

INT_OPTIONS = ["timeout_to_fail", "retry_interval", "request_timeout", "retry_limit"]


@pytest.mark.parametrize("name", INT_OPTIONS)
@pytest.mark.parametrize("value", [MAX_INT64 + 1, 2**64, -1])
def test_int_options_beyond_int64_are_refused(dtm_server: DtmTestServer, name: str, value: int) -> None:
    gid = local_gid()
    with pytest.raises(DtmInvalidInput, match=name):
        Saga(dtm_server.url, gid, **{name: value})
    saga = Saga(dtm_server.url, gid).add("http://127.0.0.1:1/a", "", {})
    with pytest.raises(DtmInvalidInput, match=name):
        saga.set_options(**{name: value})
    assert getattr(saga.options, name) is None
    assert dtm_server.query(gid) is None


@pytest.mark.parametrize("name", INT_OPTIONS)
def test_int_options_up_to_int64_max_are_sent(name: str) -> None:
    saga = Saga("http://127.0.0.1:1/api/dtmsvr").set_options(**{name: MAX_INT64}).add("http://h/a", "", {})
    assert saga.build_body()[name] == MAX_INT64


def test_msg_delay_is_bounded_to_int64() -> None:
    msg = Msg("http://127.0.0.1:1/api/dtmsvr")
    with pytest.raises(DtmInvalidInput, match="delay"):
        msg.set_delay(2**64)
    assert msg.set_delay(MAX_INT64).delay == MAX_INT64


# -- 9.9 gids received from DTM ---------------------------------------------------------------

BAD_RECEIVED_GIDS = {
    "NUL": "a\x00b",
    "VT": "a\x0bb",
    "FS": "a\x1cb",
    "DEL": "a\x7fb",
    "C1 NEL": "a\x85b",
    "C1 APC": "a\x9fb",
    "LINE SEPARATOR": "a\u2028b",
    "PARAGRAPH SEPARATOR": "a\u2029b",
    "lone surrogate": "a\udc00b",
    "semicolon": "a;b",
}


@pytest.mark.parametrize("gid", BAD_RECEIVED_GIDS.values(), ids=BAD_RECEIVED_GIDS.keys())
def test_received_gids_with_controls_or_separators_are_refused(gid: str) -> None:
    with pytest.raises(DtmInvalidInput):
        check_received_gid(gid)
    with pytest.raises(BranchRequestError):
        BranchInfo.from_query({"gid": gid, "trans_type": "saga", "branch_id": "01", "op": "action"})


@pytest.mark.parametrize("gid", ["order:42", "caf\u00e9-1", "\u8ba2\u5355-7", "a b", "x" * 128])
def test_received_gids_other_sdks_create_are_accepted(gid: str) -> None:
    assert check_received_gid(gid) == gid
