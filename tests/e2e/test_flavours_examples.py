"""examples/async_saga_transfer.py end to end: concurrent async sagas against the real HTTP bank service.

Uses the ``dtm`` facade, so it runs against the in-process coordinator or, with ``--dtm-server URL``,
against a real DTM server (which must be able to reach 127.0.0.1 of this machine).
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import services

from dtmcli.testing import DtmFacade

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import async_saga_transfer
import bank_service
import workflow_transfer


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


def test_workflow_transfer_with_a_crash_and_resume(dtm: DtmFacade, bank: bank_service.BankServer) -> None:
    def advance(gid: str) -> None:  # let the coordinator's resume cron come due (manual clock, or real time)
        dtm.advance(workflow_transfer.TIMEOUT_TO_FAIL + 1, gids=[gid])

    (_, done), (_, rolled_back), (_, resumed) = workflow_transfer.run(dtm.url, bank.url, advance=advance)
    assert done == "moved 3 from 1 to 2"
    assert rolled_back.startswith("rolled back") and "no account 3" in rolled_back
    gid, status, *_ = resumed.split()
    assert status == "succeed" and resumed.endswith(f"(crashed child exit {-signal.SIGKILL})")
    assert dtm.wait_status(gid).status == "succeed"
    assert bank.ledger.balances() == {1: 94, 2: 106}


def test_grpc_transfer_saga_rollback_and_tcc(dtm_grpc: DtmFacade, bank: bank_service.BankServer) -> None:
    """examples/grpc_transfer.py over DTM's gRPC API (``dtm_grpc``: in process, or ``--dtm-grpc-server``)."""
    if not services.in_ci():
        pytest.importorskip("grpc")
    import grpc_transfer

    assert dtm_grpc.grpc_target is not None
    (_, saga), (_, rolled_back), (_, tcc), (_, balances) = grpc_transfer.run(
        dtm_grpc.grpc_target, dtm_grpc.url, bank.ledger  # the gRPC bank on this ledger (MariaDB + barrier, or memory)
    )
    assert saga.endswith(" succeed") and tcc.endswith(" succeed")
    assert " rolled back (" in rolled_back and rolled_back.endswith("no account 3)")
    assert dtm_grpc.wait_status(rolled_back.split()[0]).status == "failed"
    assert bank.ledger.balances() == {1: 60, 2: 140} and balances.startswith("{1: 60, 2: 140}")
