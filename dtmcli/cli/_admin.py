"""``dtmcli force-stop`` and ``retry``: steering one transaction."""

from __future__ import annotations

import argparse
from typing import Optional

from ..client import DtmClient
from ._base import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Io

__all__ = ["confirmed", "run_force_stop", "run_retry"]


def confirmed(yes: bool, is_tty: bool, answer: Optional[str]) -> Optional[bool]:
    """Whether to go ahead: ``--yes``, or a ``y``/``yes`` typed at a terminal.

    ``None`` means "refuse, this is a usage error": no ``--yes`` and no terminal to ask on.
    """
    if yes:
        return True
    if not is_tty:
        return None
    return (answer or "").strip().lower() in ("y", "yes")


def run_force_stop(dtm: DtmClient, args: argparse.Namespace, io: Io) -> int:
    """Move the transaction to ``failed`` without compensating, after confirmation."""
    is_tty = io.stdin.isatty()
    answer = None
    if not args.yes and is_tty:
        io.stderr.write(
            f"force-stop {args.gid}: it becomes 'failed' and NO compensation runs; branches that succeeded stay "
            "done. Continue? [y/N] "
        )
        io.stderr.flush()
        answer = io.stdin.readline()
    decision = confirmed(args.yes, is_tty, answer)
    if decision is None:
        io.err("force-stop needs --yes when stdin is not a terminal")
        return EXIT_USAGE
    if not decision:
        io.err("not stopped")
        return EXIT_FAILED
    dtm.force_stop(args.gid)
    io.out(f"{args.gid}: stopped (failed)\n")
    return EXIT_OK


def run_retry(dtm: DtmClient, args: argparse.Namespace, io: Io) -> int:
    """Make DTM retry the transaction now (``resetNextCronTime``)."""
    dtm.reset_next_cron_time(args.gid)
    io.out(f"{args.gid}: due for retry now\n")
    return EXIT_OK
