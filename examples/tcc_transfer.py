"""TCC: reserve with Try, then DTM calls Confirm on every branch (or Cancel if anything raised).

The ``with`` block prepares the global transaction, each ``call_branch`` registers a branch and
calls its Try; leaving the block submits, and an exception aborts and is re-raised.
"""

from __future__ import annotations

from dtmcli import DtmClient
from dtmcli.tcc import tcc_global_transaction


def run(dtm: str, busi: str, amount: int = 10) -> str:
    with tcc_global_transaction(dtm, wait_result=True) as tcc:
        tcc.call_branch({"user_id": 1, "amount": -amount}, f"{busi}/TccTry", f"{busi}/TccConfirm", f"{busi}/TccCancel")
        tcc.call_branch({"user_id": 2, "amount": amount}, f"{busi}/TccTry", f"{busi}/TccConfirm", f"{busi}/TccCancel")
    trans = DtmClient.for_url(dtm).query(tcc.gid)
    return f"{tcc.gid} {trans.status if trans else 'unknown'}"


if __name__ == "__main__":
    from _common import BUSI, DTM

    print("tcc:", run(DTM, BUSI))
