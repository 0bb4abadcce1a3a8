"""examples/async_saga_transfer.py end to end: concurrent async sagas against the real HTTP bank service.

Uses the ``dtm`` facade, so it runs against the in-process coordinator or, with ``--dtm-server URL``,
against a real DTM server (which must be able to reach 127.0.0.1 of this machine).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import services

from dtmcli.testing import DtmFacade

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import async_saga_transfer
import bank_service


@pytest.fixture(params=["mysql", "memory"])
def bank(request: pytest.FixtureRequest) -> Iterator[bank_service.BankServer]:
    if request.param == "mysql":
        services.require("mysql")
        ledger: bank_service.Ledger = bank_service.MysqlLedger(services.MYSQL["host"])
    else:
        ledger = bank_service.MemoryLedger()
    with bank_service.BankServer(ledger) as server:
        yield server


def test_concurrent_async_transfers_move_money_and_conserve_it(
    dtm: DtmFacade, bank: bank_service.BankServer
) -> None:
    assert bank.ledger.balances() == {1: 100, 2: 100}
    lines = asyncio.run(async_saga_transfer.run(dtm.url, bank.url, transfers=10, amount=3))
    assert sum(line.endswith("succeeded") for line in lines) == 9
    assert "rolled back" in lines[-1] and "no account 3" in lines[-1]
    gids = [line.split()[0] for line in lines]
    assert len(set(gids)) == 10
    assert all(dtm.wait_status(g).status == ("failed" if g == gids[-1] else "succeed") for g in gids)
    assert bank.ledger.balances() == {1: 73, 2: 127}
