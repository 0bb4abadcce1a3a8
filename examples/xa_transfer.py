"""XA: each branch runs its SQL as a local XA transaction on MariaDB and prepares it; DTM then
commits every branch (or rolls them all back if a branch failed).

The bank's TransInXa handler does the branch side (``xa_local_transaction`` / ``xa_handle_phase2``).
"""

from __future__ import annotations

from dtmcli import DtmClient
from dtmcli.xa import xa_global_transaction


def run(dtm: str, busi: str, amount: int = 5) -> str:
    with xa_global_transaction(dtm, wait_result=True) as xa:
        xa.call_branch({"user_id": 1, "amount": -amount}, f"{busi}/TransInXa")
        xa.call_branch({"user_id": 2, "amount": amount}, f"{busi}/TransInXa")
    trans = DtmClient.for_url(dtm).query(xa.gid)
    return f"{xa.gid} {trans.status if trans else 'unknown'}"


if __name__ == "__main__":
    from _common import BUSI, DTM

    print("xa:", run(DTM, BUSI))
