"""Parsing ``/query`` answers: well-formed rows, and malformed or hostile fields degrade to empty values
instead of raising or leaking a wrong type (issue 9.14: one test per guard in dtmcli/_models.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from dtmcli._models import Branch, Transaction

ROW = {
    "gid": "g1", "trans_type": "saga", "status": "submitted", "protocol": "http",
    "options": json.dumps({"retry_interval": 10}), "create_time": "2024-01-01 00:00:00",
    "next_cron_interval": 10, "steps": [{"action": "http://a"}], "payloads": ["{}"],
}
BRANCH = {"gid": "g1", "branch_id": "01", "op": "action", "status": "prepared", "url": "http://a",
          "bin_data": base64.b64encode(b'{"x":1}').decode(), "create_time": "2024-01-01 00:00:00"}


def test_well_formed_row() -> None:
    t = Transaction.from_json(ROW, [BRANCH, {**BRANCH, "op": "compensate"}])
    assert (t.gid, t.trans_type, t.status, t.protocol) == ("g1", "saga", "submitted", "http")
    assert t.options == {"retry_interval": 10} and t.next_cron_interval == 10
    assert t.steps == ({"action": "http://a"},) and t.payloads == ("{}",)
    b = t.branch("01", "action")
    assert b is not None and b.data == b'{"x":1}' and b.create_time == "2024-01-01 00:00:00"
    assert t.branch("01", "compensate") is not b and t.branch("02", "action") is None


@pytest.mark.parametrize("bad", [123, ["x"], {"a": 1}, True])
def test_non_string_fields_become_empty(bad: Any) -> None:
    t = Transaction.from_json({**ROW, "gid": bad, "status": bad, "create_time": bad}, [{**BRANCH, "url": bad}])
    assert t.gid == "" and t.status == "" and t.create_time is None
    assert t.branches[0].url == ""


def test_empty_time_is_none() -> None:
    assert Transaction.from_json({**ROW, "finish_time": ""}).finish_time is None


@pytest.mark.parametrize("bad", ["not base64!", "QQ=", "QUJD\n\x00", 5])
def test_bad_bin_data_is_empty_bytes(bad: Any) -> None:
    assert Branch.from_json({**BRANCH, "bin_data": bad}).data == b""


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", '"text"', "null", 42])
def test_bad_options_are_empty(bad: Any) -> None:
    assert Transaction.from_json({**ROW, "options": bad}).options == {}


@pytest.mark.parametrize("bad", ["abc", {"a": 1}, 5])
def test_steps_and_payloads_must_be_lists(bad: Any) -> None:
    t = Transaction.from_json({**ROW, "steps": bad, "payloads": bad})
    assert t.steps == () and t.payloads == ()


def test_steps_payloads_and_branches_keep_only_well_typed_items() -> None:
    t = Transaction.from_json({**ROW, "steps": [{"a": "b"}, "x", 1], "payloads": ["p", 2, None]},
                              [BRANCH, "junk", 3])
    assert t.steps == ({"a": "b"},) and t.payloads == ("p",) and len(t.branches) == 1


@pytest.mark.parametrize("bad", ["10", 1.5, None])
def test_cron_interval_must_be_an_int(bad: Any) -> None:
    assert Transaction.from_json({**ROW, "next_cron_interval": bad}).next_cron_interval is None


@pytest.mark.parametrize(("status", "final"), [("succeed", True), ("failed", True), ("submitted", False),
                                               ("aborting", False), ("prepared", False)])
def test_is_final(status: str, final: bool) -> None:
    assert Transaction.from_json({**ROW, "status": status}).is_final is final
