"""Saga: move 30 from user 1 to user 2. Both actions succeed, so nothing is compensated.

Run on its own against a DTM server and a running bank service:
    DTM_SERVER=http://localhost:36789/api/dtmsvr BANK_URL=http://localhost:8081/api/busi python saga_transfer.py
"""

from __future__ import annotations

from dtmcli import Saga


def run(dtm: str, busi: str, amount: int = 30) -> str:
    saga = (
        Saga(dtm, wait_result=True)  # wait_result: submit returns once DTM has run the saga
        .add(f"{busi}/TransOut", f"{busi}/TransOutCom", {"user_id": 1, "amount": amount})
        .add(f"{busi}/TransIn", f"{busi}/TransInCom", {"user_id": 2, "amount": amount})
    )
    saga.submit()
    return saga.gid


if __name__ == "__main__":
    from _common import BUSI, DTM

    print("saga succeeded:", run(DTM, BUSI))
