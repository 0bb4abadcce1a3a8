"""Saga from asyncio code: several transfers in flight at once on one event loop.

The same Saga as saga_transfer.py, from ``dtmcli.asyncio``: building it is identical, ``submit`` is
awaited. Ten transfers of 3 from user 1 to user 2 run concurrently; one of them goes to the
missing account 3, so DTM compensates that one alone and its submit raises DtmFailure.

Run on its own against a DTM server and a running bank service (pip install 'dtmcli[asyncio]'):
    DTM_SERVER=http://localhost:36789/api/dtmsvr BANK_URL=http://localhost:8081/api/busi python async_saga_transfer.py
"""

from __future__ import annotations

import asyncio

from dtmcli import DtmFailure
from dtmcli.asyncio import Saga


async def transfer(dtm: str, busi: str, to_user: int, amount: int) -> str:
    saga = (
        Saga(dtm, wait_result=True)  # wait_result: submit returns once DTM has run the saga
        .add(f"{busi}/TransOut", f"{busi}/TransOutCom", {"user_id": 1, "amount": amount})
        .add(f"{busi}/TransIn", f"{busi}/TransInCom", {"user_id": to_user, "amount": amount})
    )
    try:
        await saga.submit()
    except DtmFailure as exc:
        return f"{saga.gid} rolled back: {exc.message}"
    return f"{saga.gid} succeeded"


async def run(dtm: str, busi: str, transfers: int = 10, amount: int = 3) -> list[str]:
    """Submit ``transfers`` sagas concurrently; the last one goes to the missing account 3."""
    targets = [2] * (transfers - 1) + [3]
    return list(await asyncio.gather(*(transfer(dtm, busi, to, amount) for to in targets)))


if __name__ == "__main__":
    from _common import BUSI, DTM

    for line in asyncio.run(run(DTM, BUSI)):
        print(line)
