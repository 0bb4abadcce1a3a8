"""`make demo`: a bank transfer in every DTM mode, on the embedded coordinator. No server to install.

Starts dtmcli's in-process DTM-compatible coordinator (a development tool: production uses the real
DTM server) and the example bank service, runs each example, and prints what happened and the
balances. Point it at a real DTM server instead with DTM_SERVER=http://host:36789/api/dtmsvr
(and DTM_GRPC_SERVER=host:36790 for the gRPC transfer, which runs when the grpc extra is installed).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import async_saga_transfer
import msg_transfer
import saga_rollback
import saga_transfer
import tcc_transfer
import workflow_transfer
import xa_transfer
from bank_service import BankServer, MysqlLedger

from dtmcli import DtmClient
from dtmcli.testing import DtmTestServer

try:
    import grpc_transfer  # needs the grpc extra ('.[dev]', which make demo installs, has it)
except ModuleNotFoundError as exc:  # only the extra missing; any other import error is a bug to show
    if (exc.name or "").partition(".")[0] not in ("grpc", "google"):
        raise
    grpc_transfer = None  # type: ignore[assignment]


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with ExitStack() as stack:
        real = os.environ.get("DTM_SERVER")
        if real:
            dtm_url = real
            print(f"DTM server: {dtm_url} (real)")
        else:
            server = stack.enter_context(DtmTestServer(clock="real", grpc_port=0 if grpc_transfer else None))
            dtm_url = server.url
            print(f"DTM server: {dtm_url} (dtmcli's embedded coordinator)")
        bank = stack.enter_context(BankServer())
        print(f"bank service: {bank.url} ({bank.ledger.kind} ledger)")
        print(f"balances at start: {bank.ledger.balances()}\n")
        client = DtmClient.for_url(dtm_url)

        def step(title: str, outcome: str) -> None:
            balances = bank.ledger.balances()
            print(f"{title:<34} {outcome}")
            print(f"{'':<34} balances {balances}  total {sum(balances.values())}\n")

        step("saga: 30 from user 1 to user 2", saga_transfer.run(dtm_url, bank.url))
        step("saga to a missing account", saga_rollback.run(dtm_url, bank.url))
        step("tcc: 10 from user 1 to user 2", tcc_transfer.run(dtm_url, bank.url))
        gid = msg_transfer.run(dtm_url, bank.url, bank.ledger)
        status = _wait_final(client, gid)
        step("msg: 20 from user 1 to user 2", f"{gid} {status}")
        if isinstance(bank.ledger, MysqlLedger):
            step("xa: 5 from user 1 to user 2", xa_transfer.run(dtm_url, bank.url))
        else:
            print("xa: skipped (needs MariaDB)\n")
        outcomes = asyncio.run(async_saga_transfer.run(dtm_url, bank.url))  # dtmcli.asyncio, one event loop
        done = sum(o.endswith("succeeded") for o in outcomes)
        step("asyncio: 10 sagas of 3 at once", f"{done} succeeded, {len(outcomes) - done} rolled back (no account 3)")
        for title, outcome in workflow_transfer.run(dtm_url, bank.url):  # 3 + 3 moved, one crash resumed
            step(title, outcome)
        grpc_target = os.environ.get("DTM_GRPC_SERVER") if real else (server.grpc_target if grpc_transfer else "")
        grpc_ok = True
        if grpc_transfer is not None and grpc_target:  # over DTM's gRPC API, with its own gRPC bank (in memory)
            pairs = grpc_transfer.run(grpc_target, dtm_url)
            for title, outcome in pairs:
                print(f"{title:<34} {outcome}\n")
            grpc_ok = pairs[-1][1].startswith("{1: 60, 2: 140}")
        else:
            print("grpc: skipped (needs the grpc extra, and DTM_GRPC_SERVER with a real DTM)\n")
        final = bank.ledger.balances()
    # The asyncio step moves 9 x 3 = 27 (the 10th goes to the missing account 3 and is compensated), workflow 6.
    expected = {1: 2, 2: 198} if isinstance(bank.ledger, MysqlLedger) else {1: 7, 2: 193}
    ok = final == expected and grpc_ok
    print("final balances", final, "as expected" if ok else f"EXPECTED {expected}")
    return 0 if ok else 1


def _wait_final(client: DtmClient, gid: str, timeout: float = 10.0) -> str:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        trans = client.query(gid)
        if trans is not None and trans.is_final:
            return trans.status
        time.sleep(0.05)
    return "not final after 10 s"


if __name__ == "__main__":
    sys.exit(main())
