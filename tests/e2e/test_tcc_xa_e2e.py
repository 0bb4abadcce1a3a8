"""TCC and XA end to end over real HTTP: dtmcli client → coordinator → BranchService, with the sync API
and with ``dtmcli.asyncio`` (each test runs in both flavours).

Runs against the in-process coordinator, or a real DTM with ``--dtm-server``. The branch handlers
are written with dtmcli's own branch-side helpers (``handle_query``, ``Tcc.from_query``,
``register_xa_branch``).
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Awaitable, Callable

import pytest
from flavours import Flavour, both

from dtmcli import BranchInfo, DtmFailure, Tcc, local_gid, register_xa_branch
from dtmcli.branch import handle_query
from dtmcli.testing import Answer, BranchService, Call, DtmFacade

pytestmark = both


async def aw(value: Any) -> Any:
    """``value``, awaited when the flavour's call returned an awaitable."""
    return await value if inspect.isawaitable(value) else value


def run_global(flavour: Flavour, kind: str, dtm_url: str, gid: str, body: Callable[[Any], Awaitable[Any]]) -> None:
    """Run ``body(trans)`` inside ``tcc_global_transaction``/``xa_global_transaction`` of the flavour."""
    runner = getattr(flavour.m, f"{kind}_global_transaction")(dtm_url, gid)

    async def main() -> None:
        if flavour.is_async:
            async with runner as trans:
                await body(trans)
        else:
            with runner as trans:
                await body(trans)

    asyncio.run(main())


def handler(func: Any) -> Any:
    """A BranchService answer running ``func(info, call)`` through dtmcli's branch mapping."""

    def answer(call: Call) -> Answer:
        resp = handle_query(call.query, lambda info: func(info, call))
        return Answer(resp.status, resp.content)

    return answer


def ops(svc: BranchService, prefix: str) -> list[tuple[str, str, str]]:
    return [(c.path, c.branch_id, c.op) for c in svc.calls() if c.path.startswith(prefix)]


def test_tcc_success_confirms_in_reverse(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    urls = {n: svc.route(f"/tcc/{n}") for n in ("try1", "confirm1", "cancel1", "try2", "confirm2", "cancel2")}
    gid = local_gid()

    async def body(tcc: Any) -> None:
        for i in (1, 2):
            reply = await aw(tcc.call_branch({"amount": i}, urls[f"try{i}"], urls[f"confirm{i}"], urls[f"cancel{i}"]))
            assert reply.status == 200

    run_global(flavour, "tcc", dtm.url, gid, body)
    assert dtm.wait_status(gid).status == "succeed"
    svc.wait_calls(1, "/tcc/confirm1")
    assert [(p, b, o) for p, b, o in ops(svc, "/tcc/") if o == "confirm"] == [
        ("/tcc/confirm2", "02", "confirm"),
        ("/tcc/confirm1", "01", "confirm"),
    ]
    (try1,) = svc.calls("/tcc/try1")
    assert try1.query["dtm"] == dtm.url and try1.query["op"] == "try" and try1.json() == {"amount": 1}
    assert svc.calls("/tcc/confirm1")[0].json() == {"amount": 1}
    assert not svc.calls("/tcc/cancel1")


def test_tcc_try_failure_cancels_everything(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    t1, c1, x1 = svc.route("/f/try1"), svc.route("/f/confirm1"), svc.route("/f/cancel1")

    def try2(info: BranchInfo, call: Call) -> None:
        raise DtmFailure("insufficient balance")

    t2, c2, x2 = svc.route("/f/try2", handler(try2)), svc.route("/f/confirm2"), svc.route("/f/cancel2")
    gid = local_gid()

    async def body(tcc: Any) -> None:
        await aw(tcc.call_branch({"n": 1}, t1, c1, x1))
        await aw(tcc.call_branch({"n": 2}, t2, c2, x2))

    with pytest.raises(DtmFailure) as e:
        run_global(flavour, "tcc", dtm.url, gid, body)
    assert e.value.branch_id == "02"
    trans = dtm.wait_status(gid)
    assert trans.status == "failed"
    assert "insufficient balance" in trans.rollback_reason
    svc.wait_calls(1, "/f/cancel1")
    assert [(p, o) for p, _, o in ops(svc, "/f/") if o == "cancel"] == [
        ("/f/cancel2", "cancel"),
        ("/f/cancel1", "cancel"),
    ]
    assert not [c for c in svc.calls() if c.op == "confirm"]


def test_nested_tcc_children_confirm_first(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    child_urls = [svc.route(f"/n/{n}") for n in ("try3", "confirm3", "cancel3")]

    def nested_try(info: BranchInfo, call: Call) -> dict[str, str]:
        child = Tcc.from_query(call.query)  # the dtm URL comes from the query
        reply = child.call_branch({"nested": True}, *child_urls)
        return {"child": reply.branch_id}

    t2 = svc.route("/n/try2", handler(nested_try))
    t1, c1, x1 = (svc.route(f"/n/{n}") for n in ("try1", "confirm1", "cancel1"))
    c2, x2 = svc.route("/n/confirm2"), svc.route("/n/cancel2")
    gid = local_gid()

    async def body(tcc: Any) -> None:
        await aw(tcc.call_branch({"n": 1}, t1, c1, x1))
        assert (await aw(tcc.call_branch({"n": 2}, t2, c2, x2))).data == {"dtm_result": "SUCCESS", "child": "0201"}

    run_global(flavour, "tcc", dtm.url, gid, body)
    assert dtm.wait_status(gid).status == "succeed"
    svc.wait_calls(1, "/n/confirm1")
    assert [b for _, b, o in ops(svc, "/n/") if o == "confirm"] == ["0201", "02", "01"]
    trans = dtm.query(gid)
    assert trans is not None and {b.branch_id for b in trans.branches} == {"01", "02", "0201"}


def xa_action(info: BranchInfo, call: Call) -> None:
    """A stand-in for an XA branch: on the action, register with DTM (the local XA is the barrier's job)."""
    if info.op == "action":
        if call.json() == {"fail": True}:
            raise DtmFailure("local xa failed")
        register_xa_branch(info)


def test_xa_success_commits_in_order(flavour: Flavour, dtm: DtmFacade, branch_service: BranchService) -> None:
    svc = branch_service
    u1, u2 = svc.route("/xa/b1", handler(xa_action)), svc.route("/xa/b2", handler(xa_action))
    gid = local_gid()

    async def body(xa: Any) -> None:
        await aw(xa.call_branch({"amount": 1}, u1))
        await aw(xa.call_branch({"amount": 2}, u2))

    run_global(flavour, "xa", dtm.url, gid, body)
    assert dtm.wait_status(gid).status == "succeed"
    svc.wait_calls(2, "/xa/b2")
    assert [(p, b, o) for p, b, o in ops(svc, "/xa/")] == [
        ("/xa/b1", "01", "action"),
        ("/xa/b2", "02", "action"),
        ("/xa/b1", "01", "commit"),
        ("/xa/b2", "02", "commit"),
    ]
    action = svc.calls("/xa/b1")[0]
    assert action.query["phase2_url"] == u1 and action.query["dtm"] == dtm.url


def test_xa_failure_rolls_back_registered_branches(
    flavour: Flavour, dtm: DtmFacade, branch_service: BranchService
) -> None:
    svc = branch_service
    u1, u2 = svc.route("/xf/b1", handler(xa_action)), svc.route("/xf/b2", handler(xa_action))
    gid = local_gid()

    async def body(xa: Any) -> None:
        await aw(xa.call_branch({"amount": 1}, u1))
        await aw(xa.call_branch({"fail": True}, u2))

    with pytest.raises(DtmFailure):
        run_global(flavour, "xa", dtm.url, gid, body)
    trans = dtm.wait_status(gid)
    assert trans.status == "failed" and "local xa failed" in trans.rollback_reason
    svc.wait_calls(2, "/xf/b1")
    assert [(p, o) for p, _, o in ops(svc, "/xf/") if o != "action"] == [("/xf/b1", "rollback")]
