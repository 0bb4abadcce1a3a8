"""TCC and XA processing: phase 2 (confirm/commit or cancel/rollback) over the registered branches."""

from __future__ import annotations

from typing import Optional

from .._consts import ABORTING, FAILED, OP_CANCEL, OP_COMMIT, OP_CONFIRM, OP_ROLLBACK, PREPARED, SUBMITTED, SUCCEED, TCC
from ._pass import BranchErr, Pass, Runner

__all__ = ["process_tcc_xa"]


def process_tcc_xa(r: Runner, p: Pass) -> Optional[BranchErr]:
    """Finish a submitted (commit) or aborting/timed-out (roll back) tcc or xa; TCC runs in reverse order."""
    if not r.need_process(p):
        return None
    if p.status == PREPARED and r.is_timeout(p):
        timeout = p.opts.timeout_to_fail or r.config.timeout_to_fail
        r.change_status(p, ABORTING, f"Timeout after {timeout} seconds")
    tcc = p.rec.trans_type == TCC
    if tcc:
        op = OP_CONFIRM if p.status == SUBMITTED else OP_CANCEL
    else:
        op = OP_COMMIT if p.status == SUBMITTED else OP_ROLLBACK
    branches = list(p.rec.branches)
    for b in reversed(branches) if tcc else branches:
        if b.op == op and b.status == PREPARED:
            err, _ = r.exec_branch(p, b)
            if err is not None:
                return err
    r.change_status(p, SUCCEED if p.status == SUBMITTED else FAILED)
    return None
