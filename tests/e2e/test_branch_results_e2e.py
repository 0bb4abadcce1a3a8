"""A saga whose second action *returns* ``{"dtm_result": "FAILURE"}`` rolls back, end to end.

Client (sync and asyncio) → coordinator (in process, or ``--dtm-server``) → real Flask / FastAPI
branch services over HTTP. Before the fix the returned FAILURE was answered 200 SUCCESS and the saga
succeeded.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import flask
import pytest
from fastapi import APIRouter, FastAPI
from flavours import Flavour, both
from web_servers import serve_asgi, serve_wsgi

from dtmcli import BranchInfo, local_gid
from dtmcli.contrib.fastapi import BranchDep, DtmRoute, PayloadDep
from dtmcli.contrib.flask import branch_handler, branch_payload
from dtmcli.testing import DtmFacade


class Ledger:
    """Balances and the ops each branch saw."""

    def __init__(self) -> None:
        self.balance = {"out": 100, "in": 0}
        self.ops: list[str] = []
        self._lock = threading.Lock()

    def apply(self, info: BranchInfo, account: str, amount: int) -> Any:
        with self._lock:
            self.ops.append(f"{account}:{info.op}")
            if account == "in" and info.op == "action":
                return {"dtm_result": "FAILURE", "message": "account closed"}  # the Go SDK idiom
            if account == "in":
                return None  # nothing to undo: the action did nothing
            self.balance[account] += amount if info.op == "action" else -amount
            return None


@contextlib.contextmanager
def flask_service(ledger: Ledger) -> Iterator[str]:
    app = flask.Flask(__name__)

    @app.post("/<account>/<sign>")
    @branch_handler
    def busi(account: str, sign: str, info: BranchInfo) -> Any:
        amount = branch_payload(info)["amount"]
        return ledger.apply(info, account, -amount if sign == "debit" else amount)

    with serve_wsgi(app) as base:
        yield base


@contextlib.contextmanager
def fastapi_service(ledger: Ledger) -> Iterator[str]:
    app = FastAPI()
    router = APIRouter(route_class=DtmRoute)

    @router.post("/{account}/{sign}")
    def busi(account: str, sign: str, info: BranchDep, body: PayloadDep) -> Any:
        amount = body["amount"]
        return ledger.apply(info, account, -amount if sign == "debit" else amount)

    app.include_router(router)
    with serve_asgi(app) as base:
        yield base


SERVICES: dict[str, Callable[[Ledger], Any]] = {"flask": flask_service, "fastapi": fastapi_service}


@both
@pytest.mark.parametrize("framework", sorted(SERVICES))
def test_returned_failure_compensates_the_saga(flavour: Flavour, dtm: DtmFacade, framework: str) -> None:
    ledger = Ledger()
    with SERVICES[framework](ledger) as busi:
        gid = local_gid()
        saga = flavour.m.Saga(dtm.url, gid)
        saga.add(f"{busi}/out/debit", f"{busi}/out/debit", {"amount": 30})
        saga.add(f"{busi}/in/credit", f"{busi}/in/credit", {"amount": 30})
        flavour.run(saga.submit())
        trans = dtm.wait_status(gid)
        assert trans.status == "failed"
        assert "account closed" in (trans.rollback_reason or "")
        assert "out:compensate" in ledger.ops and "in:action" in ledger.ops
        assert ledger.balance == {"out": 100, "in": 0}  # the debit was compensated
