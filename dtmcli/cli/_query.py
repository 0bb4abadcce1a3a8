"""``dtmcli query``, ``list`` and ``watch``: reading transactions."""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Callable, Optional

from .._models import Transaction
from ..client import DtmClient
from ._base import EXIT_FAILED, EXIT_OK, Io
from ._render import changes, clean, list_table, to_json, transaction_json, transaction_text

__all__ = ["run_list", "run_query", "run_watch", "since_to_ms", "watch_exit_code"]

_PAGE = 100


def run_query(dtm: DtmClient, args: argparse.Namespace, io: Io) -> int:
    """Show one transaction with its branches; 1 when DTM does not know the gid."""
    trans = dtm.query(args.gid)
    if trans is None:
        io.err(f"transaction {args.gid} not found")
        return EXIT_FAILED
    io.out(to_json(transaction_json(trans)) if args.json else transaction_text(trans))
    return EXIT_OK


def since_to_ms(seconds: Optional[float], now: float) -> Optional[int]:
    """The ``createTimeStart`` (epoch ms) for ``--since``: ``now`` minus ``seconds``."""
    return None if seconds is None else max(0, int((now - seconds) * 1000))


def run_list(dtm: DtmClient, args: argparse.Namespace, io: Io) -> int:
    """Page through ``/all`` with the filters, up to ``--limit`` transactions."""
    found = dtm.iter_all(
        page_size=min(args.limit, _PAGE),
        status=args.status or "",
        trans_type=args.type or "",
        create_time_start=since_to_ms(args.since, time.time()),
    )
    rows = list(itertools.islice(found, args.limit))
    if args.json:
        io.out(to_json([dict(t.raw) for t in rows]))
    else:
        io.out(list_table(rows) if rows else "no transactions\n")
    return EXIT_OK


_PENDING = ("prepared", "submitted", "aborting")


def watch_exit_code(trans: Transaction) -> Optional[int]:
    """0 once ``succeed``, 1 once ``failed`` (or a status DTM never uses), ``None`` while not final."""
    if trans.status == "succeed":
        return EXIT_OK
    if trans.status in _PENDING:
        return None
    return EXIT_FAILED


def run_watch(
    dtm: DtmClient,
    args: argparse.Namespace,
    io: Io,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Poll until the transaction is final, printing what changed; 1 on failed, not found or ``--timeout``."""
    deadline = None if args.timeout is None else clock() + args.timeout
    before: Optional[Transaction] = None
    while True:
        trans = dtm.query(args.gid)
        if trans is None:
            io.err(f"transaction {args.gid} not found")
            return EXIT_FAILED
        if before is None or changes(before, trans):
            io.out(to_json(transaction_json(trans)) if args.json else "".join(f"{x}\n" for x in changes(before, trans)))
            io.stdout.flush()
        before = trans
        code = watch_exit_code(trans)
        if code is not None:
            if trans.status not in ("succeed", "failed"):
                io.err(f"transaction {args.gid} has a status dtmcli does not know: {clean(trans.status)!r}")
            return code
        if deadline is not None and clock() + args.interval > deadline:
            io.err(f"transaction {args.gid} is still {clean(trans.status)} after {args.timeout:g} s")
            return EXIT_FAILED
        sleep(args.interval)
