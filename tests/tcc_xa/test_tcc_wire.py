"""TCC global transactions on the wire, pinned to the Go client's recorded bodies (goclient_tcc_*)."""

from __future__ import annotations

import json
import threading
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
import responses
import traces
from traces import BUSI, DTM

from dtmcli import (
    DtmClient,
    DtmFailure,
    DtmInvalidInput,
    DtmOngoing,
    DtmServerError,
    DtmTransportError,
    RequestsTransport,
    Tcc,
    tcc_global_transaction,
)
from dtmcli.branch import BranchRequestError

OK = {"dtm_result": "SUCCESS"}


@pytest.fixture
def dtm() -> DtmClient:
    # ``responses`` intercepts ``requests``; pin that transport whatever the default is.
    return DtmClient(DTM, transport=RequestsTransport())


@pytest.fixture
def rsps() -> Any:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as r:
        for path in ("prepare", "registerBranch", "submit", "abort"):
            r.post(f"{DTM}/{path}", json=OK)
        yield r


def calls(rsps: responses.RequestsMock) -> list[tuple[str, dict[str, str], Any]]:
    """(path, query, body) of every request, bodies parsed as JSON."""
    out = []
    for c in rsps.calls:
        parts = urlsplit(c.request.url)
        body = c.request.body
        if isinstance(body, bytes):
            body = body.decode()
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = body
        out.append((parts.path, dict(parse_qsl(parts.query)), parsed))
    return out


def trace_dtm_calls(name: str) -> list[tuple[str, Any]]:
    return [
        (e["request"]["path"], traces.with_port(e["request"]["body"]))
        for e in traces.events(name)
        if not e["request"]["path"].endswith("/query")
    ]


def trace_try_calls(name: str) -> list[tuple[str, dict[str, str], Any, dict[str, str]]]:
    return [
        (
            e["request"]["path"],
            traces.with_port(e["request"]["query"]),
            json.loads(e["request"]["body"]),
            e["request"]["headers"],
        )
        for e in traces.events(name, kind="client->branch")
    ]


def test_nested_tcc_matches_go_client(dtm: DtmClient, rsps: responses.RequestsMock) -> None:
    """goclient_tcc_nested: options on prepare and submit, registerBranch keys, try queries and headers."""
    rsps.post(f"{BUSI}/tcc/try1", json=OK)
    rsps.post(f"{BUSI}/tcc/try3", json=OK)

    def nested_try(request: Any) -> tuple[int, dict[str, str], str]:
        # What a try handler does: build a nested Tcc from its own query and call a sub-branch.
        query = dict(parse_qsl(urlsplit(request.url).query))
        child = Tcc.from_query(query, dtm=dtm)
        assert child.nested and child.gid == "GID"
        child.call_branch(
            {"amount": 7, "nested": True}, f"{BUSI}/tcc/try3", f"{BUSI}/tcc/confirm3", f"{BUSI}/tcc/cancel3"
        )
        return 200, {}, json.dumps(OK)

    rsps.add_callback(responses.POST, f"{BUSI}/tcc/try-nested", callback=nested_try)
    with tcc_global_transaction(
        dtm, "GID", timeout_to_fail=30, retry_interval=3, branch_headers={"X-Tenant": "t1"}
    ) as tcc:
        r1 = tcc.call_branch(
            {"amount": 30, "user_id": 1}, f"{BUSI}/tcc/try1", f"{BUSI}/tcc/confirm1", f"{BUSI}/tcc/cancel1"
        )
        tcc.call_branch(
            {"amount": 30, "user_id": 2}, f"{BUSI}/tcc/try-nested", f"{BUSI}/tcc/confirm2", f"{BUSI}/tcc/cancel2"
        )
    assert r1.status == 200 and r1.data == OK and r1.branch_id == "01"

    got = calls(rsps)
    dtm_calls = [(p, b) for p, q, b in got if p.startswith("/api/dtmsvr/")]
    assert dtm_calls == trace_dtm_calls("goclient_tcc_nested")
    # ``responses`` records a call when it completes, so the nested try (0201) comes before 02.
    try_calls = sorted(((p, q, b) for p, q, b in got if not p.startswith("/api/dtmsvr/")), key=lambda c: c[0])
    expected = sorted(trace_try_calls("goclient_tcc_nested"), key=lambda c: c[0])
    assert try_calls == [(p, q, b) for p, q, b, _ in expected]
    # Branch headers go on the client's own try calls, but the nested Tcc knows only its query.
    sent = {urlsplit(c.request.url).path: c.request.headers for c in rsps.calls if "/tcc/" in c.request.url}
    for path, _, _, want in expected:
        assert {k: sent[path].get(k) for k in want} == want
        assert ("X-Tenant" in sent[path]) == ("X-Tenant" in want)


@pytest.mark.parametrize(
    ("trace", "status", "body", "error"),
    [
        ("goclient_tcc_try_fail_abort", 409, {"error": "insufficient balance"}, DtmFailure),
        ("goclient_tcc_try_error_500_abort", 500, {"error": "db down"}, DtmServerError),
    ],
)
def test_failed_try_aborts_with_go_rollback_reason(
    dtm: DtmClient, rsps: responses.RequestsMock, trace: str, status: int, body: Any, error: type
) -> None:
    prefix = "tf" if status == 409 else "te"
    rsps.post(f"{BUSI}/{prefix}/try1", json=OK)
    # Compact JSON, as the Go branch wrote it: the rollback reason is the raw body text.
    rsps.post(f"{BUSI}/{prefix}/try2", body=json.dumps(body, separators=(",", ":")), status=status)
    with pytest.raises(error) as e, tcc_global_transaction(dtm, "GID") as tcc:
        for i in (1, 2):
            tcc.call_branch(
                {"amount": 30}, f"{BUSI}/{prefix}/try{i}", f"{BUSI}/{prefix}/confirm{i}", f"{BUSI}/{prefix}/cancel{i}"
            )
        pytest.fail("the second try must raise")
    assert e.value.gid == "GID" and e.value.branch_id == "02" and e.value.op == "try"
    dtm_calls = [(p, b) for p, q, b in calls(rsps) if p.startswith("/api/dtmsvr/")]
    assert dtm_calls == trace_dtm_calls(trace)


def test_business_exception_aborts_and_is_reraised(dtm: DtmClient, rsps: responses.RequestsMock) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom, match="out of stock") as e, tcc_global_transaction(dtm, "G1", wait_result=True) as tcc:
        raise Boom("out of stock")
    assert e.value.args == ("out of stock",)
    (prepare, abort) = calls(rsps)
    assert prepare[0].endswith("/prepare") and abort[0].endswith("/abort")
    assert abort[2] == {**prepare[2], "rollback_reason": "Boom: out of stock"}
    assert prepare[2]["wait_result"] is True
    with pytest.raises(DtmInvalidInput, match="already"):
        tcc.call_branch({}, f"{BUSI}/t", "", "")


def test_rollback_reason_is_clipped(dtm: DtmClient, rsps: responses.RequestsMock) -> None:
    with pytest.raises(ValueError), tcc_global_transaction(dtm, "G1"):
        raise ValueError("x" * 5000)
    reason = calls(rsps)[-1][2]["rollback_reason"]
    assert reason.startswith("ValueError: xxx") and len(reason) <= 1024


def test_failed_abort_does_not_hide_the_original_error(dtm: DtmClient, caplog: pytest.LogCaptureFixture) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json=OK)
        rsps.post(f"{DTM}/abort", json={"message": "boom"}, status=500)
        with pytest.raises(KeyError), tcc_global_transaction(dtm, "G1"):
            raise KeyError("k")
    assert "abort" in caplog.text


def test_caught_branch_error_still_aborts(dtm: DtmClient, rsps: responses.RequestsMock) -> None:
    """A try that answered ONGOING was registered: confirming it would be wrong, so the tcc aborts."""
    rsps.post(f"{BUSI}/t1", json={"dtm_result": "ONGOING"}, status=425)
    with pytest.raises(DtmOngoing), tcc_global_transaction(dtm, "G1") as tcc:
        try:
            tcc.call_branch({"a": 1}, f"{BUSI}/t1", f"{BUSI}/c1", f"{BUSI}/x1")
        except DtmOngoing:
            pass  # the caller swallows it; the transaction must still not submit
    paths = [p for p, _, _ in calls(rsps)]
    assert paths[-1] == "/api/dtmsvr/abort" and "/api/dtmsvr/submit" not in paths


def test_transport_error_on_try_aborts(dtm: DtmClient, rsps: responses.RequestsMock) -> None:
    rsps.post(f"{BUSI}/t1", body=requests.ConnectionError("refused"))
    with pytest.raises(DtmTransportError) as e, tcc_global_transaction(dtm, "G1") as tcc:
        tcc.call_branch({}, f"{BUSI}/t1", "", "")
    assert (e.value.gid, e.value.branch_id, e.value.op) == ("G1", "01", "try")
    assert calls(rsps)[-1][0] == "/api/dtmsvr/abort"


def test_register_409_means_no_try(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json=OK)
        rsps.post(f"{DTM}/registerBranch", json={"dtm_result": "FAILURE", "message": "no trans"}, status=409)
        rsps.post(f"{DTM}/abort", json=OK)
        with pytest.raises(DtmFailure), tcc_global_transaction(dtm, "G1") as tcc:
            tcc.call_branch({}, f"{BUSI}/t1", "", "")
        assert not any("/t1" in c.request.url for c in rsps.calls)


def test_bad_input_is_rejected_before_sending(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:  # any request would fail: nothing is registered
        with pytest.raises(DtmInvalidInput):
            tcc_global_transaction(dtm, "bad gid")
        with pytest.raises(DtmInvalidInput):
            tcc_global_transaction(dtm, "G1", timeout_to_fail="30")
        with pytest.raises(DtmInvalidInput):
            tcc_global_transaction(dtm, "G1", no_such_option=1)
        tcc = Tcc(dtm, "G1")
        with pytest.raises(DtmInvalidInput, match="prepare"):
            tcc.call_branch({}, f"{BUSI}/t", "", "")
        tcc._state = "prepared"  # skip the prepare round trip
        with pytest.raises(DtmInvalidInput, match="URL"):
            tcc.call_branch({}, "/relative", "", "")
        with pytest.raises(DtmInvalidInput, match="URL"):
            tcc.call_branch({}, f"{BUSI}/t", "ftp://x", "")
        with pytest.raises(DtmInvalidInput, match="serialisable"):
            tcc.call_branch({"x": object()}, f"{BUSI}/t", "", "")
        assert tcc.branch_error is None
        assert len(rsps.calls) == 0


def test_callback_form_returns_the_result(dtm: DtmClient, rsps: responses.RequestsMock) -> None:
    rsps.post(f"{BUSI}/t1", json={"dtm_result": "SUCCESS", "reserved": 3})
    result = tcc_global_transaction(
        dtm, "G1", lambda tcc: tcc.call_branch({"n": 1}, f"{BUSI}/t1", f"{BUSI}/c1", f"{BUSI}/x1").data["reserved"]
    )
    assert result == 3
    assert [p for p, _, _ in calls(rsps)] == [f"/api/dtmsvr/{p}" for p in ("prepare", "registerBranch")] + [
        "/t1",
        "/api/dtmsvr/submit",
    ]


def test_decorator_form_uses_a_new_gid_per_call(dtm: DtmClient, rsps: responses.RequestsMock) -> None:
    seen: list[str] = []

    @tcc_global_transaction(dtm, timeout_to_fail=9)
    def transfer(tcc: Tcc, amount: int) -> int:
        seen.append(tcc.gid)
        return amount * 2

    assert transfer(2) == 4 and transfer(3) == 6
    assert len(set(seen)) == 2
    submits = [b for p, _, b in calls(rsps) if p.endswith("/submit")]
    assert [b["gid"] for b in submits] == seen and all(b["timeout_to_fail"] == 9 for b in submits)


def test_decorator_exception_aborts(dtm: DtmClient, rsps: responses.RequestsMock) -> None:
    @tcc_global_transaction(dtm)
    def fails(tcc: Tcc) -> None:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        fails()
    assert calls(rsps)[-1][0] == "/api/dtmsvr/abort"


def test_prepare_failure_propagates_without_abort(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/prepare", json={"dtm_result": "FAILURE", "message": "cannot prepare"}, status=409)
        entered = False
        with pytest.raises(DtmFailure), tcc_global_transaction(dtm, "G1"):
            entered = True
        assert not entered and len(rsps.calls) == 1


def test_concurrent_branches_from_threads(dtm: DtmClient, rsps: responses.RequestsMock) -> None:
    rsps.post(f"{BUSI}/t", json=OK)
    errors: list[BaseException] = []
    with tcc_global_transaction(dtm, "G1") as tcc:

        def work() -> None:
            try:
                for _ in range(5):
                    tcc.call_branch({}, f"{BUSI}/t", "", "")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    got = calls(rsps)
    registered = [b["branch_id"] for p, _, b in got if p.endswith("/registerBranch")]
    tried = [q["branch_id"] for p, q, _ in got if p == "/t"]
    assert sorted(registered) == [f"{i:02d}" for i in range(1, 41)]
    assert sorted(tried) == sorted(registered)
    assert got[-1][0] == "/api/dtmsvr/submit"


def test_wait_result_submit_settles_with_query(dtm: DtmClient, rsps: responses.RequestsMock) -> None:
    """A 425 from a wait_result submit (a confirm answered ONGOING) is checked with /query."""
    rsps.replace(responses.POST, f"{DTM}/submit", json={"dtm_result": "ONGOING", "message": "ONGOING"}, status=425)
    rsps.get(
        f"{DTM}/query", json={"transaction": {"gid": "G1", "trans_type": "tcc", "status": "succeed"}, "branches": []}
    )
    with tcc_global_transaction(dtm, "G1", wait_result=True):
        pass
    assert calls(rsps)[-1][0] == "/api/dtmsvr/query"


# -- nesting ---------------------------------------------------------------------------------

TRY_Q = {"dtm": DTM, "gid": "G1", "branch_id": "03", "trans_type": "tcc", "op": "try"}


def test_nested_ids_and_payloads(dtm: DtmClient, rsps: responses.RequestsMock) -> None:
    rsps.post(f"{BUSI}/sub", json=OK)
    child = Tcc.from_query(TRY_Q, dtm=dtm)
    child.call_branch("raw", f"{BUSI}/sub", "", "")
    child.call_branch(None, f"{BUSI}/sub", "", "")
    got = calls(rsps)
    regs = [b for p, _, b in got if p.endswith("/registerBranch")]
    assert [(r["branch_id"], r["data"]) for r in regs] == [("0301", "raw"), ("0302", "null")]
    assert all(set(r) == {"gid", "trans_type", "branch_id", "data", "confirm", "cancel"} for r in regs)
    assert [q["branch_id"] for p, q, _ in got if p == "/sub"] == ["0301", "0302"]
    for what in (child.prepare, child.submit, lambda: child.abort("x")):
        with pytest.raises(DtmInvalidInput, match="nested"):
            what()


def test_nested_uses_dtm_from_the_query() -> None:
    child = Tcc.from_query(TRY_Q)
    assert child.dtm == DTM and child.gid == "G1"


@pytest.mark.parametrize(
    ("over", "error", "match"),
    [
        ({"dtm": ""}, BranchRequestError, "dtm"),
        ({"trans_type": "saga", "op": "action"}, BranchRequestError, "try handler"),
        ({"op": "confirm"}, BranchRequestError, "try handler"),
        ({"gid": ""}, BranchRequestError, "gid"),
        ({"branch_id": "0" * 20}, DtmInvalidInput, "too deep"),
    ],
)
def test_nested_bad_query(over: dict[str, str], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        Tcc.from_query({**TRY_Q, **over})


def test_nested_limit_of_99_children(dtm: DtmClient, rsps: responses.RequestsMock) -> None:
    rsps.post(f"{BUSI}/sub", json=OK)
    child = Tcc.from_query({**TRY_Q, "branch_id": "0" * 19}, dtm=dtm)
    for _ in range(99):
        child.call_branch({}, f"{BUSI}/sub", "", "")
    n = len(rsps.calls)
    with pytest.raises(DtmInvalidInput, match="more than 99"):
        child.call_branch({}, f"{BUSI}/sub", "", "")
    assert len(rsps.calls) == n
    assert calls(rsps)[-1][1]["branch_id"] == "0" * 19 + "99"


def test_nested_from_flask_style_request(dtm: DtmClient) -> None:
    class FakeRequest:
        args = TRY_Q

    assert Tcc.from_request(FakeRequest(), dtm=dtm).gid == "G1"


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        # Flask's jsonify ends the body with a newline; Go reads replies trimmed (resty's String()).
        (409, '{"error":"insufficient balance"}\n', '{"error":"insufficient balance"} FAILURE'),
        (200, "  no stock FAILURE\r\n", "no stock FAILURE"),  # " FAILURE" is never doubled
        (500, '{"error":"db down"}\n', '{"error":"db down"}'),
    ],
)
def test_rollback_reason_reads_the_reply_as_go_does(
    dtm: DtmClient, rsps: responses.RequestsMock, status: int, body: str, reason: str
) -> None:
    rsps.post(f"{BUSI}/try", body=body, status=status)
    with pytest.raises((DtmFailure, DtmServerError)), tcc_global_transaction(dtm, "GID") as tcc:
        tcc.call_branch({"amount": 30}, f"{BUSI}/try", f"{BUSI}/confirm", f"{BUSI}/cancel")
    assert calls(rsps)[-1][2]["rollback_reason"] == reason
