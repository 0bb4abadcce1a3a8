"""BranchInfo parsing and the pure outcome → HTTP mapping of dtmcli.branch."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qs

import pytest

from dtmcli import DtmDuplicated, DtmFailure, DtmInvalidInput, DtmOngoing, DtmServerError
from dtmcli.branch import (
    SUCCESS,
    BranchInfo,
    BranchRequestError,
    error_response,
    failure_allowed,
    handle,
    handle_query,
    load_payload,
    success_response,
)

DTM = "http://127.0.0.1:36789/api/dtmsvr"
Q = {"gid": "g-1", "trans_type": "tcc", "branch_id": "01", "op": "try"}


def info(**over: str) -> BranchInfo:
    return BranchInfo.from_query({**Q, **over})


# -- parsing ---------------------------------------------------------------------------------


def test_parses_dtm_callback_query() -> None:
    i = BranchInfo.from_query({"gid": "GID", "trans_type": "saga", "branch_id": "01", "op": "compensate"})
    assert (i.gid, i.trans_type, i.branch_id, i.op, i.dtm, i.phase2_url) == (
        "GID",
        "saga",
        "01",
        "compensate",
        None,
        None,
    )


def test_parses_client_call_with_dtm_and_phase2_url() -> None:
    q = {
        "gid": "GID",
        "trans_type": "xa",
        "branch_id": "02",
        "op": "action",
        "dtm": DTM,
        "phase2_url": "http://busi/xa",
    }
    i = BranchInfo.from_query(q)
    assert i.require_dtm() == DTM and i.require_phase2_url() == "http://busi/xa"
    assert i.query() == q


def test_parses_lists_from_parse_qs() -> None:
    i = BranchInfo.from_query(parse_qs("gid=G&trans_type=msg&branch_id=00&op=msg&dtm="))
    assert (i.gid, i.op, i.dtm) == ("G", "msg", None)  # empty dtm counts as absent


@pytest.mark.parametrize("missing", ["gid", "trans_type", "branch_id", "op"])
def test_missing_field_is_400(missing: str) -> None:
    q = {k: v for k, v in Q.items() if k != missing}
    with pytest.raises(BranchRequestError, match=missing) as e:
        BranchInfo.from_query(q)
    assert isinstance(e.value, DtmInvalidInput) and e.value.status == 400


def test_empty_field_is_missing() -> None:
    with pytest.raises(BranchRequestError, match="gid"):
        BranchInfo.from_query({**Q, "gid": ""})


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"trans_type": "sagaa"}, "unknown trans_type"),
        ({"op": "branch_type"}, "unknown op"),
        ({"trans_type": "saga", "op": "try"}, "unknown op"),
        ({"trans_type": "xa", "op": "confirm"}, "unknown op"),
        ({"gid": "a;b"}, "gid"),
        ({"gid": "g" * 129}, "128"),
        ({"branch_id": "0" * 129}, "branch_id"),
        ({"branch_id": "01;drop"}, "branch_id"),
        ({"dtm": "ftp://x"}, "dtm"),
        ({"dtm": "not a url"}, "dtm"),
        ({"phase2_url": "/relative"}, "phase2_url"),
    ],
)
def test_malformed_fields_are_400(over: dict[str, str], match: str) -> None:
    with pytest.raises(BranchRequestError, match=match):
        BranchInfo.from_query({**Q, **over})


def test_repeated_parameter_rejected() -> None:
    with pytest.raises(BranchRequestError, match="given 2 times"):
        BranchInfo.from_query({**Q, "gid": ["a", "b"]})


def test_non_string_value_rejected() -> None:
    with pytest.raises(BranchRequestError, match="must be a string"):
        BranchInfo.from_query({**Q, "branch_id": 1})


def test_workflow_op_is_free_form() -> None:
    assert BranchInfo.from_query({**Q, "trans_type": "workflow", "branch_id": "00", "op": "my-wf"}).op == "my-wf"
    with pytest.raises(BranchRequestError):
        BranchInfo.from_query({**Q, "trans_type": "workflow", "op": "x\ny"})


def test_require_dtm_on_dtm_callback_is_400() -> None:
    with pytest.raises(BranchRequestError, match="dtm"):
        info(op="confirm").require_dtm()
    with pytest.raises(BranchRequestError, match="phase2_url"):
        info().require_phase2_url()


def test_from_request_needs_a_query() -> None:
    with pytest.raises(BranchRequestError, match="query"):
        BranchInfo.from_request(object())


def test_barrier_from_info() -> None:
    from dtmcli.barrier import BranchBarrier

    b = BranchBarrier.from_info(info(op="cancel"), table="app.my_barrier")
    assert (b.trans_type, b.gid, b.branch_id, b.op, b.origin_op) == ("tcc", "g-1", "01", "cancel", "try")
    assert b.table == "app.my_barrier"
    assert b.next_barrier_id() == "01" and b.next_barrier_id() == "02"
    assert not hasattr(BranchInfo, "barrier")  # branch.py no longer reaches into the barrier


def test_load_payload() -> None:
    assert load_payload(b'{"amount": 30}') == {"amount": 30}
    assert load_payload(b"") is None and load_payload(None) is None and load_payload("  ") is None
    with pytest.raises(BranchRequestError, match="not JSON"):
        load_payload(b"amount=30")
    with pytest.raises(BranchRequestError, match="UTF-8"):
        load_payload(b"\xff\xfe")


# -- mapping ---------------------------------------------------------------------------------


def body_text(resp: Any) -> str:
    return json.dumps(resp.body)


def test_success() -> None:
    r = success_response()
    assert (r.status, r.body) == (200, {"dtm_result": "SUCCESS"})
    assert r.content == b'{"dtm_result":"SUCCESS"}' and r.headers["Content-Type"] == "application/json"
    assert dict(SUCCESS) == {"dtm_result": "SUCCESS"}


def test_success_with_values() -> None:
    assert success_response({"balance": 3}).body == {"dtm_result": "SUCCESS", "balance": 3}
    assert success_response({"dtm_result": "SUCCESS", "n": 1}).body == {"dtm_result": "SUCCESS", "n": 1}
    assert success_response([1, 2]).body == {"dtm_result": "SUCCESS", "data": [1, 2]}


def test_success_value_that_dtm_would_misread_is_500(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="dtmcli"):
        r = success_response({"note": "previous FAILURE"}, info())
    assert r.status == 500 and "FAILURE" not in body_text(r) and "ONGOING" not in body_text(r)
    assert "misread" in caplog.text
    assert success_response({"x": object()}).status == 500


@pytest.mark.parametrize(("trans_type", "op"), [("saga", "action"), ("tcc", "try"), ("xa", "action")])
def test_failure_allowed_is_409(trans_type: str, op: str) -> None:
    r = error_response(DtmFailure("insufficient balance"), info(trans_type=trans_type, op=op))
    assert (r.status, r.body) == (409, {"dtm_result": "FAILURE", "message": "insufficient balance"})


@pytest.mark.parametrize(
    ("trans_type", "op"),
    [
        ("saga", "compensate"),
        ("tcc", "confirm"),
        ("tcc", "cancel"),
        ("xa", "commit"),
        ("xa", "rollback"),
        ("msg", "action"),
        ("workflow", "commit"),
    ],
)
def test_failure_where_dtm_retries_forever_is_logged_500(
    trans_type: str, op: str, caplog: pytest.LogCaptureFixture
) -> None:
    i = info(trans_type=trans_type, op=op)
    with caplog.at_level(logging.ERROR, logger="dtmcli"):
        r = error_response(DtmFailure("nope"), i)
    assert r.status == 500
    assert "FAILURE" not in body_text(r)  # DTM would read the word FAILURE in the body
    assert "gid=g-1" in caplog.text and "branch_id=01" in caplog.text and f"op={op}" in caplog.text
    assert caplog.records[-1].levelno == logging.ERROR and caplog.records[-1].name == "dtmcli"
    assert not failure_allowed(trans_type, op)


def test_failure_table() -> None:
    assert failure_allowed("saga", "action") and failure_allowed("tcc", "try") and failure_allowed("xa", "action")
    assert failure_allowed("workflow", "action") and failure_allowed("workflow", "my_wf")
    assert not failure_allowed("saga", "compensate") and not failure_allowed("nope", "action")


def test_failure_message_cannot_turn_into_ongoing() -> None:
    r = error_response(DtmFailure("was ONGOING before"), info())
    assert r.status == 409 and "ONGOING" not in body_text(r)


def test_ongoing_duplicated_bad_request_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    assert error_response(DtmOngoing("later"), info(op="confirm")).body == {"dtm_result": "ONGOING", "message": "later"}
    assert error_response(DtmOngoing("later"), info()).status == 425
    assert error_response(DtmDuplicated("seen"), info(op="confirm")).body == {"dtm_result": "SUCCESS"}
    assert error_response(BranchRequestError("gid missing")).status == 400
    with caplog.at_level(logging.ERROR, logger="dtmcli"):
        r = error_response(RuntimeError("db down, FAILURE code 7"), info())
    assert r.status == 500 and r.body == {"message": "RuntimeError: db down, failure code 7"}
    assert caplog.records[-1].exc_info is not None
    assert error_response(DtmServerError("x", status=502, body=""), info()).status == 500


def test_handle_runs_the_function() -> None:
    assert handle(info(), lambda: None).status == 200
    assert handle(info(), lambda: {"k": 1}).body == {"dtm_result": "SUCCESS", "k": 1}

    def fail() -> None:
        raise DtmFailure("no")

    assert handle(info(), fail).status == 409
    assert handle(info(op="cancel"), fail).status == 500


def test_handle_lets_base_exceptions_through() -> None:
    def stop() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        handle(info(), stop)


def test_handle_query() -> None:
    seen: list[BranchInfo] = []
    assert handle_query(Q, seen.append).status == 200 and seen[0].gid == "g-1"
    r = handle_query({"gid": "g"}, seen.append)
    assert r.status == 400 and len(seen) == 1 and "branch_id" in r.body["message"]


async def _coro_ok() -> dict[str, int]:
    return {"n": 1}


def test_handle_async() -> None:
    import asyncio

    from dtmcli.branch import handle_async

    async def boom() -> None:
        raise DtmOngoing("wait")

    assert asyncio.run(handle_async(info(), _coro_ok)).body == {"dtm_result": "SUCCESS", "n": 1}
    assert asyncio.run(handle_async(info(), boom)).status == 425


def test_import_dtmcli_does_not_import_frameworks() -> None:
    import subprocess
    import sys

    code = (
        "import sys, dtmcli, dtmcli.branch, dtmcli.tcc, dtmcli.xa, dtmcli.contrib;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flask', 'fastapi', 'starlette', 'django')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_query_prepared_failure_is_answered_409_not_500() -> None:
    """A msg's query_prepared answering FAILURE rolls the message back; a 500 would stall it forever."""
    from dtmcli import DtmFailure
    from dtmcli.branch import handle_query

    def rolled_back(info: object) -> None:
        raise DtmFailure("local transaction rolled back")

    answer = handle_query({"gid": "g1", "trans_type": "msg", "branch_id": "00", "op": "msg"}, rolled_back)
    assert answer.status == 409 and answer.body["dtm_result"] == "FAILURE"
    # a msg *action* still must not fail: DTM would retry it forever
    answer = handle_query({"gid": "g1", "trans_type": "msg", "branch_id": "01", "op": "action"}, rolled_back)
    assert answer.status == 500


def test_gids_made_by_other_clients_are_accepted() -> None:
    """DTM stores any gid but for \\n, \\r and ';': a callback for one must not get a 400 (retried forever)."""
    from dtmcli.branch import BranchInfo

    for gid in ("order:42", "a'b", "550e8400-e29b-41d4-a716-446655440000", "tenant/1.x"):
        assert BranchInfo.from_query({"gid": gid, "trans_type": "saga", "branch_id": "01", "op": "action"}).gid == gid
