"""What only the asyncio flavour has: many transactions in flight on one event loop, the shared
client across event loops, cancellation, and refusing a client of the other flavour.

Through the coordinator (in process, or ``--dtm-server``) and a real HTTP branch service.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import dtmcli
import dtmcli.asyncio as adtm
from dtmcli import DtmInvalidInput, local_gid
from dtmcli.testing import Answer, BranchService, DtmFacade


def saga(dtm: Any, svc: BranchService, gid: str = "", **options: Any) -> adtm.Saga:
    s = adtm.Saga(dtm, gid or local_gid(), **options)
    return s.add(svc.url("/out"), svc.url("/out_undo"), {"amount": 30}).add(svc.url("/in"), svc.url("/in_undo"), {})


def test_50_concurrent_sagas_from_one_loop(dtm: DtmFacade, branch_service: BranchService) -> None:
    branch_service.route("/out", Answer(200, delay=0.2))

    async def main() -> list[str]:
        sagas = [saga(dtm.url, branch_service, wait_result=True) for _ in range(50)]
        await asyncio.gather(*(s.submit() for s in sagas))
        return [s.gid for s in sagas]

    started = time.monotonic()
    gids = asyncio.run(main())
    assert time.monotonic() - started < 5  # in flight together: one after another takes 10 s
    assert len(set(gids)) == 50
    for gid in gids:
        trans = dtm.query(gid)
        assert trans is not None and trans.status == "succeed", gid
    out = branch_service.calls("/out")
    assert len(out) == 50 and {c.query["gid"] for c in out} == set(gids)
    assert len(branch_service.calls("/in")) == 50 and not branch_service.calls("/out_undo")


def test_shared_client_serves_successive_event_loops(dtm: DtmFacade, branch_service: BranchService) -> None:
    shared = adtm.AsyncDtmClient.for_url(dtm.url)
    own = adtm.AsyncDtmClient(dtm.url)

    async def one(client: adtm.AsyncDtmClient) -> str:
        s = saga(client, branch_service, wait_result=True)
        await s.submit()
        assert s.client is client
        return await client.query_status(s.gid) or ""

    for _ in range(2):  # each asyncio.run has its own loop; the client's pool follows it
        assert asyncio.run(one(shared)) == "succeed"
        assert asyncio.run(one(own)) == "succeed"
    assert adtm.AsyncDtmClient.for_url(dtm.url + "/") is shared
    asyncio.run(own.aclose())
    assert asyncio.run(one(own)) == "succeed"  # closing drops the pools; the next call opens one


def test_a_client_of_the_other_flavour_is_refused(dtm: DtmFacade, branch_service: BranchService) -> None:
    sync_client: Any = dtmcli.DtmClient(dtm.url)
    async_client: Any = adtm.AsyncDtmClient(dtm.url)
    builds = [(adtm.Saga, sync_client, "use AsyncDtmClient"), (adtm.Msg, sync_client, "use AsyncDtmClient"),
              (dtmcli.Saga, async_client, "not AsyncDtmClient"), (dtmcli.Msg, async_client, "not AsyncDtmClient")]
    for cls, client, message in builds:
        with pytest.raises(DtmInvalidInput, match=message):
            cls(client)
    with pytest.raises(DtmInvalidInput):
        asyncio.run(adtm.new_gid(sync_client))
    sync_client.close()
    assert branch_service.calls() == []


def test_concurrent_submits_of_one_saga_send_one(dtm: DtmFacade, branch_service: BranchService) -> None:
    s = saga(dtm.url, branch_service)

    async def main() -> list[Any]:
        return await asyncio.gather(*(s.submit() for _ in range(5)), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert outcomes.count(None) == 1
    assert all(isinstance(o, DtmInvalidInput) for o in outcomes if o is not None)
    assert dtm.wait_status(s.gid).status == "succeed"
    assert len(branch_service.calls("/out")) == 1


def test_cancelled_submit_is_never_sent_again(dtm: DtmFacade, branch_service: BranchService) -> None:
    """A submit cancelled while DTM runs the pass may have arrived: the saga stays submitted."""
    branch_service.route("/out", Answer(200, delay=0.5))
    s = saga(dtm.url, branch_service, wait_result=True)

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(s.submit(), 0.1)
        assert s.state == "submitted"
        with pytest.raises(DtmInvalidInput, match="already submitted"):
            await s.submit(recover=True)

    asyncio.run(main())
    assert dtm.wait_status(s.gid).status == "succeed"
    assert len(branch_service.calls("/out")) == 1


def test_do_and_submit_takes_a_plain_function(dtm: DtmFacade, branch_service: BranchService) -> None:
    msg = adtm.Msg(dtm.url, local_gid()).add(branch_service.url("/act"), {"n": 1})
    result = asyncio.run(msg.do_and_submit(branch_service.url("/qp"), lambda barrier: barrier.gid))
    assert result == msg.gid and msg.state == "submitted"
    assert dtm.wait_status(msg.gid).status == "succeed"


def test_sagas_from_threads_each_with_its_own_loop(dtm: DtmFacade, branch_service: BranchService) -> None:
    """One shared client used by several threads, each running its own event loop."""
    gids: list[str] = []
    errors: list[BaseException] = []

    def worker() -> None:
        async def main() -> None:
            ss = [saga(dtm.url, branch_service, wait_result=True) for _ in range(5)]
            await asyncio.gather(*(x.submit() for x in ss))
            gids.extend(x.gid for x in ss)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(set(gids)) == 20
    assert all(dtm.query(g).status == "succeed" for g in gids)  # type: ignore[union-attr]
