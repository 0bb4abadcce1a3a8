"""Saga processing: actions forward (in order, concurrently, or by ``orders``), compensations backward.

Branches are laid out as DTM lays them out: index ``2k`` is step k's compensate, ``2k+1`` its action.
"""

from __future__ import annotations

import logging
import queue
from typing import Optional

from .._consts import ABORTING, FAILED, OP_ACTION, PREPARED, SUBMITTED, SUCCEED
from ._pass import BranchErr, Conflict, Pass, Runner
from ._rules import parse_saga_custom

__all__ = ["process_saga"]

logger = logging.getLogger("dtmcli.testing")


def process_saga(r: Runner, p: Pass) -> Optional[BranchErr]:
    """One saga pass: run what may run, wait for the answers, then succeed, or abort and compensate."""
    rec, opts = p.rec, p.opts
    timeout_reason = f"Timeout after {opts.timeout_to_fail} seconds"
    if p.status == SUBMITTED and r.is_timeout(p):
        r.change_status(p, ABORTING, timeout_reason)
    branches = list(rec.branches)
    n = len(branches)
    custom = parse_saga_custom(rec.custom_data, n // 2)
    conc, orders = custom.concurrent, custom.orders
    corders: dict[int, list[int]] = {}
    for k, pres in orders.items():
        for pre in pres:
            corders.setdefault(pre, []).append(k)
    st = [b.status for b in branches]
    started = [False] * n
    a_to_start = sum(1 for b in branches if b.op == OP_ACTION and b.status == PREPARED)
    a_failed = sum(1 for b in branches if b.op == OP_ACTION and b.status == FAILED)
    a_succeed = c_to_start = c_succeed = 0
    failure = ""
    results: queue.Queue[tuple[int, str, str]] = queue.Queue()
    inflight = 0

    def should_run(cur: int) -> bool:
        if not conc and cur >= 2 and st[cur - 2] != SUCCEED:
            return False
        return all(st[pre * 2 + 1] == SUCCEED for pre in orders.get(cur // 2, ()))

    def rolled_back(i: int) -> bool:
        return st[i] == SUCCEED or st[i + 1] == PREPARED

    def should_rollback(cur: int) -> bool:
        if rolled_back(cur):
            return False
        if not conc and cur < n - 2 and not rolled_back(cur + 2):
            return False
        return all(rolled_back(2 * nxt) for nxt in corders.get(cur // 2, ()))

    def pick_actions() -> list[int]:
        return [c for c in range(1, n, 2) if not started[c] and st[c] == PREPARED and should_run(c)]

    def pick_compensates() -> list[int]:
        return [c for c in range(n - 2, -1, -2) if not started[c] and st[c] == PREPARED and should_rollback(c)]

    def run_one(i: int) -> None:
        reason = ""
        try:
            _, reason = r.exec_branch(p, branches[i])
        except Conflict:
            reason = "conflict"
        except Exception:
            logger.exception("saga %s branch %s failed", rec.gid, branches[i].branch_id)
        results.put((i, branches[i].status, reason))

    def launch(picked: list[int]) -> None:
        nonlocal inflight
        for i in picked:
            started[i] = True
        for i in picked:
            inflight += 1
            if len(picked) == 1 and inflight == 1:
                run_one(i)
            else:
                r.pool.submit(run_one, i)

    def wait_one(drain: bool = False) -> None:
        nonlocal inflight, a_failed, a_succeed, c_succeed, failure
        i, status, reason = results.get()
        inflight -= 1
        st[i] = status
        if branches[i].op == OP_ACTION:
            if not drain and opts.retry_limit > 0 and status == PREPARED:
                if p.retry_count < opts.retry_limit:
                    p.retry_count += 1
                    rec.retry_count = p.retry_count
                    launch_retry(i)
                    return
                r.change_status(p, ABORTING, f"RetryCount is greater than RetryLimit, RetryLimit: {opts.retry_limit}")
                return
            if status == FAILED:
                a_failed += 1
                failure = reason
            elif status == SUCCEED:
                a_succeed += 1
        elif status == SUCCEED:
            c_succeed += 1

    def launch_retry(i: int) -> None:
        nonlocal inflight
        inflight += 1
        if inflight == 1:
            run_one(i)
        else:
            r.pool.submit(run_one, i)

    while p.status == SUBMITTED and not r.is_timeout(p) and a_failed == 0:
        launch(pick_actions())
        if inflight == 0:
            break
        wait_one()
    while inflight:  # let actions already sent answer before deciding what to compensate
        wait_one(drain=True)
    if p.status == SUBMITTED and a_failed == 0 and a_to_start == a_succeed:
        r.change_status(p, SUCCEED)
        return None
    if p.status == SUBMITTED and a_failed > 0:
        r.change_status(p, ABORTING, failure or "fail message lost")
    if p.status == SUBMITTED and r.is_timeout(p):
        r.change_status(p, ABORTING, timeout_reason)
    if p.status == ABORTING:
        for i in pick_actions():  # runnable actions may have run: compensate them too
            started[i] = True
        for i in range(1, n, 2):
            if started[i] and st[i] == PREPARED:
                st[i] = SUCCEED
        c_to_start = sum(1 for i in range(0, n, 2) if st[i] != SUCCEED and st[i + 1] != PREPARED)
    while p.status == ABORTING:
        launch(pick_compensates())
        if inflight == 0:
            break
        wait_one()
    if p.status == ABORTING and c_to_start == c_succeed:
        r.change_status(p, FAILED)
    return None
