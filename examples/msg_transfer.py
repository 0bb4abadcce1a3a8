"""2-phase message: take 20 from user 1 in a local transaction, and let DTM deliver the matching
credit to user 2 until it succeeds.

``prepare_and_submit`` prepares the message, runs the local work, then submits. Had the process
died in between, DTM would ask ``QueryPrepared`` whether the local transaction committed.
With MariaDB the local work runs inside the barrier (``do_and_submit_db``), so QueryPrepared's
answer is exact.
"""

from __future__ import annotations

from typing import Any

from dtmcli import Msg


def run(dtm: str, busi: str, ledger: Any, amount: int = 20) -> str:
    msg = Msg(dtm).add(f"{busi}/TransIn", {"user_id": 2, "amount": amount})
    if hasattr(ledger, "connect"):  # MariaDB: the barrier row commits with the debit
        conn = ledger.connect()
        try:
            msg.do_and_submit_db(f"{busi}/QueryPrepared", conn, lambda c: ledger.update(c, 1, -amount))
        finally:
            conn.close()
    else:
        msg.prepare_and_submit(f"{busi}/QueryPrepared", lambda bb: ledger.adjust_local(bb.gid, 1, -amount))
    return msg.gid
