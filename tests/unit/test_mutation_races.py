"""A change racing a prepare/submit of the same object either reaches DTM or is refused.

The lifecycle check and the change happen under the object's lock, which ``_run`` holds while it
sends: a change can never pass the check, miss the request, and then be applied to an object DTM
already holds (the step would silently never run). The fake DTM here is a BranchService that
records the bodies it gets, so each test compares what DTM received with what the object holds.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from typing import Any, Callable

import pytest
from races import race

import dtmcli._protocol
from dtmcli import DtmClient, DtmInvalidInput, Msg, Saga, TransOptions
from dtmcli._trans import TransBase
from dtmcli.testing import BranchService, DtmFacade


@pytest.fixture
def recorder() -> Iterator[tuple[BranchService, DtmClient]]:
    """A fake DTM answering SUCCESS to everything and recording each request."""
    with BranchService(default=200) as svc:
        client = DtmClient(f"{svc.base_url}/api/dtmsvr", timeout=5)
        try:
            yield svc, client
        finally:
            client.close()


def sent_body(svc: BranchService, path: str) -> dict[str, Any]:
    calls = svc.calls(f"/api/dtmsvr/{path}")
    assert len(calls) == 1
    body: dict[str, Any] = json.loads(calls[0].body)
    return body


# -- add() racing submit(), interleaved instruction by instruction ------------------------------


def add_racing_submit(trans: Saga | Msg, action: str) -> list[str]:
    """Submit in one thread and add ``action`` in another, interleaved; the sorted outcomes."""
    roles = itertools.count()

    def work() -> str:
        if next(roles) == 0:
            trans.submit()
            return "submitted"
        try:
            if isinstance(trans, Saga):
                trans.add(action, "", {"n": 2, "pad": "x" * 64})
            else:
                trans.add(action, {"n": 2, "pad": "x" * 64})
        except DtmInvalidInput:
            return "refused"
        return "added"

    return sorted(race(work, threads=2, slow=[TransBase._run, dtmcli._protocol]))


@pytest.mark.parametrize("kind", ["saga", "msg"])
def test_add_racing_submit_is_sent_or_refused(dtm: DtmFacade, branch_service: BranchService, kind: str) -> None:
    """The reviewer's case: add() passed the check, submit sent the saga without the step while
    add() was still encoding the payload, and add() returned normally. Now the added action is run
    by DTM, or add() raises. (Slowing the encoding widens that window.)"""
    runs = []
    for i in range(12):
        a1, a2 = branch_service.route(f"/race/{kind}/{i}/a1"), branch_service.route(f"/race/{kind}/{i}/a2")
        trans: Saga | Msg = Saga(dtm.url).add(a1, "", {"n": 1}) if kind == "saga" else Msg(dtm.url).add(a1, {"n": 1})
        runs.append((trans.gid, f"/race/{kind}/{i}/a2", add_racing_submit(trans, a2)))
    for gid, a2_path, outcome in runs:
        assert dtm.wait_status(gid).status == "succeed"
        calls = len(branch_service.calls(a2_path))
        assert (outcome, calls) in ((["added", "submitted"], 1), (["refused", "submitted"], 0)), (gid, outcome, calls)


# -- every change, paused right after its check while a submit runs -----------------------------


def _saga(client: DtmClient) -> Saga:
    return Saga(client).enable_concurrent().add("http://h/a1", "", {}).add("http://h/a2", "", {})


def _msg(client: DtmClient) -> Msg:
    return Msg(client).add("http://h/a1", {})


CHANGES: dict[str, tuple[Callable[[DtmClient], Any], Callable[[Any], None]]] = {
    "saga.add": (_saga, lambda s: s.add("http://h/a3", "", {})),
    "saga.add_branch_order": (_saga, lambda s: s.add_branch_order(1, [0])),
    "saga.concurrent": (lambda c: Saga(c).add("http://h/a1", "", {}), lambda s: setattr(s, "concurrent", True)),
    "saga.gid": (_saga, lambda s: setattr(s, "gid", s.gid + "x")),
    "saga.set_options": (_saga, lambda s: s.set_options(timeout_to_fail=9)),
    "saga.options.attr": (_saga, lambda s: setattr(s.options, "retry_interval", 7)),
    "saga.options": (_saga, lambda s: setattr(s, "options", TransOptions(request_timeout=3))),
    "msg.add_topic": (_msg, lambda m: m.add_topic("t1", {})),
    "msg.delay": (_msg, lambda m: m.set_delay(5)),
    "msg.query_prepared": (_msg, lambda m: setattr(m, "query_prepared", "http://h/qp")),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_a_change_checked_before_a_submit_is_in_the_submit(
    recorder: tuple[BranchService, DtmClient], change: tuple[Callable[[DtmClient], Any], Callable[[Any], None]]
) -> None:
    """The change stops right after its lifecycle check passed, until the submit was sent (or
    0.2 s, as the submit waits for the lock). Without the lock the submit goes out first and the
    change is applied afterwards to a transaction DTM already holds."""
    svc, client = recorder
    build, mutate = change
    trans = build(client)
    checked, sent = threading.Event(), threading.Event()
    check_mutable = trans._check_mutable

    def paused_check(what: str, **kwargs: Any) -> None:
        check_mutable(what, **kwargs)
        checked.set()
        sent.wait(0.2)

    trans._check_mutable = paused_check
    changer = threading.Thread(target=mutate, args=(trans,))
    changer.start()
    assert checked.wait(5)
    trans.submit()
    sent.set()
    changer.join()
    assert sent_body(svc, "submit") == trans.build_body()
