"""Saga that fails: the money leaves user 1, but account 3 does not exist, so TransIn answers
FAILURE. DTM compensates in reverse order (TransInCom, then TransOutCom) and user 1 gets the
money back. With wait_result, submit raises DtmFailure carrying DTM's rollback reason.
"""

from __future__ import annotations

from dtmcli import DtmFailure, Saga


def run(dtm: str, busi: str) -> str:
    saga = (
        Saga(dtm, wait_result=True)
        .add(f"{busi}/TransOut", f"{busi}/TransOutCom", {"user_id": 1, "amount": 30})
        .add(f"{busi}/TransIn", f"{busi}/TransInCom", {"user_id": 3, "amount": 30})
    )
    try:
        saga.submit()
    except DtmFailure as exc:
        return f"{saga.gid} rolled back: {exc.message}"
    raise AssertionError("the saga should have failed")


if __name__ == "__main__":
    from _common import BUSI, DTM

    print(run(DTM, BUSI))
