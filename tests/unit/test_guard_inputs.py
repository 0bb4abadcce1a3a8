"""Checks on input and on DTM's answers that no other test noticed (issue 9.14).

DTM is played by a scripted HTTP server (``BranchService``), so the client's real transport reads
each malformed answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from dtmcli import DtmClient, DtmInvalidInput, DtmServerError, Saga, new_gid
from dtmcli.testing import BranchService

UNREACHABLE = "http://127.0.0.1:9/api/dtmsvr"


@pytest.fixture
def fake_dtm() -> Iterator[tuple[BranchService, DtmClient]]:
    with BranchService(default=(404, "no route")) as svc:
        client = DtmClient(f"{svc.base_url}/api/dtmsvr", timeout=5)
        try:
            yield svc, client
        finally:
            client.close()


# -- saga branch orders ------------------------------------------------------------------------


@pytest.mark.parametrize(("branch", "pres"), [(True, [0]), (1, [False]), (1, [0, True])])
def test_bool_is_not_a_step_index(branch: Any, pres: Any) -> None:
    saga = Saga(UNREACHABLE).add("http://b/a", "http://b/c", {}).add("http://b/a", "http://b/c", {})
    with pytest.raises(DtmInvalidInput, match="step index"):
        saga.add_branch_order(branch, pres)


def test_repeated_branch_orders_are_merged_once() -> None:
    saga = Saga(UNREACHABLE).enable_concurrent()
    for _ in range(3):
        saga.add("http://b/a", "http://b/c", {})
    saga.add_branch_order(2, [0]).add_branch_order(2, [0, 1]).add_branch_order(2, [1])
    custom = json.loads(saga.build_body()["custom_data"])
    assert custom == {"concurrent": True, "orders": {"2": [0, 1]}}


def test_branch_orders_need_concurrent(fake_dtm: tuple[BranchService, DtmClient]) -> None:
    svc, client = fake_dtm
    saga = Saga(client).add("http://b/a", "http://b/c", {}).add("http://b/a", "http://b/c", {})
    saga.add_branch_order(1, [0])
    with pytest.raises(DtmInvalidInput, match="enable_concurrent"):
        saga.submit()
    assert svc.calls() == []


# -- answers from DTM --------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [{}, {"gid": ""}, {"gid": 5}, {"gid": None}])
def test_new_gid_without_a_gid_is_a_server_error(fake_dtm: tuple[BranchService, DtmClient], answer: Any) -> None:
    svc, client = fake_dtm
    svc.route("/api/dtmsvr/newGid", (200, answer))
    with pytest.raises(DtmServerError, match="no gid"):
        client.new_gid()


def test_new_gid_refuses_what_is_not_a_dtm() -> None:
    with pytest.raises(DtmInvalidInput, match="URL or a DtmClient"):
        new_gid(123)  # type: ignore[arg-type]


@pytest.mark.parametrize("trans", ["text", ["a"], 5, None])
def test_query_of_an_unusable_transaction_is_none(fake_dtm: tuple[BranchService, DtmClient], trans: Any) -> None:
    svc, client = fake_dtm
    svc.route("/api/dtmsvr/query", (200, {"transaction": trans, "branches": []}))
    assert client.query("g1") is None


@pytest.mark.parametrize("gid", ["", "a\nb", "a;b", "x" * 200])
def test_query_checks_the_gid_before_sending(fake_dtm: tuple[BranchService, DtmClient], gid: str) -> None:
    svc, client = fake_dtm
    with pytest.raises(DtmInvalidInput):
        client.query(gid)
    assert svc.calls() == []


def test_all_keeps_only_transaction_objects(fake_dtm: tuple[BranchService, DtmClient]) -> None:
    svc, client = fake_dtm
    svc.route("/api/dtmsvr/all", (200, {"transactions": [{"gid": "g1", "status": "succeed"}, "junk", 5, None],
                                        "next_position": ""}))
    page = client.all()
    assert [t.gid for t in page.transactions] == ["g1"] and page.next_position == ""


def test_iter_all_stops_at_an_empty_page_with_a_position(fake_dtm: tuple[BranchService, DtmClient]) -> None:
    svc, client = fake_dtm
    # A second request would get a 500: iter_all must not follow next_position from an empty page.
    svc.route("/api/dtmsvr/all", (200, {"transactions": [], "next_position": "7"}), 500)
    assert list(client.iter_all()) == []
    assert len(svc.calls("/api/dtmsvr/all")) == 1


def test_iter_all_follows_positions(fake_dtm: tuple[BranchService, DtmClient]) -> None:
    svc, client = fake_dtm
    svc.route("/api/dtmsvr/all", (200, {"transactions": [{"gid": "g1"}], "next_position": "1"}),
              (200, {"transactions": [{"gid": "g2"}], "next_position": ""}), 500)
    assert [t.gid for t in client.iter_all(page_size=1)] == ["g1", "g2"]
    assert [c.query.get("position", "") for c in svc.calls("/api/dtmsvr/all")] == ["", "1"]
