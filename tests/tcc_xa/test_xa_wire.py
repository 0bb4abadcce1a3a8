"""XA global transactions on the wire, pinned to the Go client's recorded bodies (goclient_xa_*)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import responses
import traces
from traces import BUSI, DTM

from dtmcli import (
    BranchInfo,
    DtmClient,
    DtmFailure,
    DtmInvalidInput,
    RequestsTransport,
    Xa,
    register_xa_branch,
    xa_global_transaction,
)
from dtmcli.branch import BranchRequestError

OK = {"dtm_result": "SUCCESS"}


@pytest.fixture
def dtm() -> DtmClient:
    return DtmClient(DTM, transport=RequestsTransport())


def calls(rsps: responses.RequestsMock) -> list[tuple[str, dict[str, str], Any]]:
    out = []
    for c in rsps.calls:
        parts = urlsplit(c.request.url)
        body = c.request.body
        if isinstance(body, bytes):
            body = body.decode()
        out.append((parts.path, dict(parse_qsl(parts.query)), json.loads(body) if body else None))
    return out


def trace(name: str) -> list[tuple[str, dict[str, str], Any]]:
    """The trace's client calls as (path, query, body); the branch-side registerBranch left out."""
    out = []
    for e in traces.load(name)["events"]:
        req = e["request"]
        if e["kind"] == "dtm->branch" or req["path"].endswith(("/query", "/registerBranch")):
            continue
        body = req["body"]
        out.append(
            (
                req["path"],
                traces.with_port(req["query"]),
                traces.with_port(json.loads(body) if isinstance(body, str) else body),
            )
        )
    return out


def test_xa_success_matches_go_client(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        for p in ("prepare", "submit"):
            rsps.post(f"{DTM}/{p}", json=OK)
        rsps.post(f"{BUSI}/xa/ok1", json=OK)
        rsps.post(f"{BUSI}/xa/ok2", json={"dtm_result": "SUCCESS", "n": 2})
        with xa_global_transaction(dtm, "GID", timeout_to_fail=30) as xa:
            xa.call_branch({"amount": 10, "user_id": 1}, f"{BUSI}/xa/ok1")
            reply = xa.call_branch({"amount": 10, "user_id": 2}, f"{BUSI}/xa/ok2")
        assert reply.data == {"dtm_result": "SUCCESS", "n": 2} and reply.branch_id == "02"
        assert calls(rsps) == trace("goclient_xa_success")
        for c in rsps.calls[1:3]:
            assert c.request.method == "POST" and c.request.headers["Content-Type"] == "application/json"


def test_xa_abort_matches_go_client_plus_rollback_reason(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        for p in ("prepare", "abort"):
            rsps.post(f"{DTM}/{p}", json=OK)
        rsps.post(f"{BUSI}/xa/ok1", json=OK)
        rsps.post(f"{BUSI}/xa/fail2", body='{"error":"insufficient balance FAILURE"}', status=409)
        with pytest.raises(DtmFailure) as e, xa_global_transaction(dtm, "GID") as xa:
            xa.call_branch({"amount": 10, "user_id": 1}, f"{BUSI}/xa/ok1")
            xa.call_branch({"amount": 10, "user_id": 2}, f"{BUSI}/xa/fail2")
        assert (e.value.branch_id, e.value.op) == ("02", "action")
        got = calls(rsps)
        expected = trace("goclient_xa_abort")
        # Go sends no rollback_reason on xa abort; we do (protocol.md §9), everything else is equal.
        assert got[-1][2].pop("rollback_reason") == '{"error":"insufficient balance FAILURE"} FAILURE'
        assert got == expected


def test_xa_options_and_branch_headers(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        for p in ("prepare", "submit"):
            rsps.post(f"{DTM}/{p}", json=OK)
        rsps.post(f"{BUSI}/x", json=OK)
        xa_global_transaction(
            dtm, "G1", lambda xa: xa.call_branch("", f"{BUSI}/x"), retry_interval=2, branch_headers={"X-T": "1"}
        )
        prepare, _action, submit = calls(rsps)
        assert prepare[2] == submit[2] and prepare[2]["retry_interval"] == 2
        assert prepare[2]["branch_headers"] == {"X-T": "1"}
        assert rsps.calls[1].request.headers["X-T"] == "1"


def test_xa_bad_input_and_state(dtm: DtmClient) -> None:
    with responses.RequestsMock():
        xa = Xa(dtm, "G1")
        with pytest.raises(DtmInvalidInput, match="prepare"):
            xa.call_branch({}, f"{BUSI}/x")
        xa._state = "prepared"
        with pytest.raises(DtmInvalidInput, match="URL"):
            xa.call_branch({}, "busi/x")
        with pytest.raises(DtmInvalidInput):
            xa_global_transaction(dtm, "G 1")


def test_xa_exception_aborts_with_reason(dtm: DtmClient) -> None:
    with responses.RequestsMock() as rsps:
        for p in ("prepare", "abort"):
            rsps.post(f"{DTM}/{p}", json=OK)
        with pytest.raises(LookupError), xa_global_transaction(dtm, "G1"):
            raise LookupError("missing row")
        assert calls(rsps)[-1][2]["rollback_reason"] == "LookupError: missing row"


ACTION = {
    "dtm": DTM,
    "gid": "GID",
    "branch_id": "01",
    "trans_type": "xa",
    "op": "action",
    "phase2_url": f"{BUSI}/xa/ok1",
}


def test_register_xa_branch_matches_go_branch(dtm: DtmClient) -> None:
    expected = traces.request_body("goclient_xa_success", "/registerBranch")
    with responses.RequestsMock() as rsps:
        rsps.post(f"{DTM}/registerBranch", json=OK)
        register_xa_branch(BranchInfo.from_query(ACTION), dtm=dtm)
        assert json.loads(rsps.calls[0].request.body) == expected


@pytest.mark.parametrize(
    "over", [{"op": "commit"}, {"trans_type": "tcc", "op": "try"}, {"phase2_url": ""}, {"dtm": ""}]
)
def test_register_xa_branch_bad_info(over: dict[str, str]) -> None:
    with responses.RequestsMock(), pytest.raises(BranchRequestError):
        register_xa_branch(BranchInfo.from_query({**ACTION, **over}))
