"""The runnable examples as end-to-end tests: real HTTP bank service, MariaDB accounts under the barrier.

Uses the ``dtm`` facade, so it runs against the in-process coordinator or, with ``--dtm-server URL``,
against a real DTM server (which must be able to reach 127.0.0.1 of this machine).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import services

from dtmcli import local_gid
from dtmcli.testing import DtmFacade

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import bank_service
import msg_transfer
import saga_rollback
import saga_transfer
import tcc_transfer
import xa_transfer


@pytest.fixture(params=["mysql", "memory"])
def bank(request: pytest.FixtureRequest) -> Iterator[bank_service.BankServer]:
    if request.param == "mysql":
        services.require("mysql")
        ledger: bank_service.Ledger = bank_service.MysqlLedger(services.MYSQL["host"])
    else:
        ledger = bank_service.MemoryLedger()
    with bank_service.BankServer(ledger) as server:
        yield server


def test_every_mode_moves_money_and_conserves_it(dtm: DtmFacade, bank: bank_service.BankServer) -> None:
    ledger = bank.ledger
    assert ledger.balances() == {1: 100, 2: 100}
    saga_transfer.run(dtm.url, bank.url)
    assert ledger.balances() == {1: 70, 2: 130}
    outcome = saga_rollback.run(dtm.url, bank.url)  # TransIn to a missing account: compensated
    assert "rolled back" in outcome and "no account 3" in outcome
    assert ledger.balances() == {1: 70, 2: 130}
    assert tcc_transfer.run(dtm.url, bank.url).endswith("succeed")
    assert ledger.balances() == {1: 60, 2: 140}
    gid = msg_transfer.run(dtm.url, bank.url, ledger)
    assert dtm.wait_status(gid, ["succeed", "failed"]).status == "succeed"
    assert ledger.balances() == {1: 40, 2: 160}
    if isinstance(ledger, bank_service.MysqlLedger):
        assert xa_transfer.run(dtm.url, bank.url).endswith("succeed")
        assert ledger.balances() == {1: 35, 2: 165}
    assert sum(ledger.balances().values()) == 200


def test_duplicate_compensation_is_harmless(dtm: DtmFacade, bank: bank_service.BankServer) -> None:
    """Deliver the same compensate twice, and a compensate whose action never ran: no money appears."""
    import requests

    def call(op_path: str, gid: str, op: str, body: dict[str, int]) -> int:
        query = {"gid": gid, "trans_type": "saga", "branch_id": "01", "op": op}
        return requests.post(f"{bank.url}/{op_path}", params=query, json=body, timeout=5).status_code

    gid = local_gid()
    assert call("TransOut", gid, "action", {"user_id": 1, "amount": 10}) == 200
    assert call("TransOutCom", gid, "compensate", {"user_id": 1, "amount": 10}) == 200
    assert call("TransOutCom", gid, "compensate", {"user_id": 1, "amount": 10}) == 200  # duplicate
    assert bank.ledger.balances() == {1: 100, 2: 100}
    null_gid = gid + "-null"
    assert call("TransOutCom", null_gid, "compensate", {"user_id": 1, "amount": 10}) == 200  # null compensation
    assert call("TransOut", null_gid, "action", {"user_id": 1, "amount": 10}) == 200  # suspended action: no effect
    assert bank.ledger.balances() == {1: 100, 2: 100}
