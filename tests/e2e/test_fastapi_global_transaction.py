"""A TCC opened by a sync FastAPI ``yield`` dependency, over real HTTP (uvicorn).

FastAPI runs the dependency's enter and exit in two thread-pool calls, each in its own copy of
the request's context, so the exit cannot see what the enter put in a ContextVar. The transaction
must still be submitted after a clean route, and aborted after a failing one.
"""

from collections.abc import Iterator
from typing import Annotated, Any

import requests
from fastapi import Depends, FastAPI
from web_servers import serve_asgi

from dtmcli import Tcc, tcc_global_transaction
from dtmcli.testing import BranchService, DtmFacade


def serve_transfer_app(dtm_url: str, busi: BranchService, gids: list[str]) -> Any:
    def tcc_dep() -> Iterator[Tcc]:
        with tcc_global_transaction(dtm_url) as tcc:
            gids.append(tcc.gid)
            yield tcc

    app = FastAPI()

    @app.post("/transfer")
    def transfer(tcc: Annotated[Tcc, Depends(tcc_dep)], fail: bool = False) -> dict[str, str]:
        tcc.call_branch({"amount": 30}, busi.route("/try"), busi.route("/confirm"), busi.route("/cancel"))
        if fail:
            raise RuntimeError("route failed after the try")
        return {"gid": tcc.gid}

    return serve_asgi(app)


def test_sync_yield_dependency_submits_the_tcc(dtm: DtmFacade, branch_service: BranchService) -> None:
    gids: list[str] = []
    with serve_transfer_app(dtm.url, branch_service, gids) as base:
        resp = requests.post(f"{base}/transfer", timeout=10)
    assert resp.status_code == 200 and [resp.json()["gid"]] == gids
    assert dtm.wait_status(gids[0]).status == "succeed"
    assert len(branch_service.wait_calls(1, "/confirm")) == 1
    assert branch_service.calls("/cancel") == []


def test_sync_yield_dependency_aborts_the_tcc_when_the_route_fails(
    dtm: DtmFacade, branch_service: BranchService
) -> None:
    gids: list[str] = []
    with serve_transfer_app(dtm.url, branch_service, gids) as base:
        resp = requests.post(f"{base}/transfer", params={"fail": "true"}, timeout=10)
    assert resp.status_code == 500 and len(gids) == 1
    trans = dtm.wait_status(gids[0])
    assert trans.status == "failed" and "route failed after the try" in trans.rollback_reason
    assert len(branch_service.wait_calls(1, "/cancel")) == 1
    assert branch_service.calls("/confirm") == []
