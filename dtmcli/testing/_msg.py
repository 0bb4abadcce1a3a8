"""2-phase message processing: query_prepared for a timed-out prepared msg, then the actions."""

from __future__ import annotations

import logging
from typing import Optional

from .._consts import (
    FAILED,
    OP_ACTION,
    OP_MSG,
    PREPARED,
    RESULT_FAILURE,
    RESULT_ONGOING,
    RESULT_SUCCESS,
    SUBMITTED,
    SUCCEED,
)
from ._pass import BranchErr, Pass, Runner
from ._rules import msg_delay

__all__ = ["process_msg"]

logger = logging.getLogger("dtmcli.testing")


def process_msg(r: Runner, p: Pass) -> Optional[BranchErr]:
    """Resolve a timed-out prepared msg by its query_prepared answer; run the actions of a submitted one."""
    rec = p.rec
    if r.need_process(p) and p.status == PREPARED:
        result, text = r.call(p, rec.query_prepared, "00", OP_MSG, "")
        if result == RESULT_SUCCESS:
            r.change_status(p, SUBMITTED)
        elif result == RESULT_FAILURE:
            r.change_status(p, FAILED)
        elif result == RESULT_ONGOING:
            r.touch(p, "reset")
        else:
            logger.warning("query_prepared of %s: %s", rec.gid, text)
            r.touch(p, "backoff")
    if not r.need_process(p) or p.status == PREPARED:
        return None
    delay = msg_delay(rec.custom_data)
    due = rec.create_time + delay
    if p.status == SUBMITTED and r.clock.now() < due:
        r.touch(p, "keep", delay=max(due - r.clock.now(), 0.001))
        return None
    todo = [b for b in rec.branches if b.op == OP_ACTION and b.status == PREPARED]
    if p.opts.concurrent or rec.options.concurrent:
        futures = [r.pool.submit(r.exec_branch, p, b) for b in todo]
        errors = [f.result()[0] for f in futures]
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            return first
    else:
        for b in todo:
            err, _ = r.exec_branch(p, b)
            if err is not None:
                return err
            if b.status != SUCCEED:
                return None
    if all(b.status == SUCCEED for b in rec.branches if b.op == OP_ACTION):
        r.change_status(p, SUCCEED)
    return None
