"""``dtmcli``: operate DTM from the command line (also ``python -m dtmcli``).

Commands: ``query GID``, ``list``, ``watch GID``, ``force-stop GID``, ``retry GID``, ``doctor``,
``ddl DIALECT``, ``coordinator``. The DTM address is ``--dtm URL``, else the first entry of
``DTMCLI_SERVER`` (comma-separated), else ``http://localhost:36789/api/dtmsvr``. Read commands
(``query``, ``list``, ``watch``, ``doctor``) take ``--json`` for scripts.

Exit codes:

- 0: done (``watch``: the transaction succeeded; ``doctor``: no check failed)
- 1: failed or not found (an unknown gid, ``watch`` ending ``failed`` or at ``--timeout``, DTM
  refusing the call, e.g. ``force-stop`` of a finished transaction, a ``doctor`` check failing)
- 2: usage (bad arguments or gid, ``force-stop`` without ``--yes`` when stdin is not a terminal)
- 3: cannot reach DTM (connection refused, timeout, other transport errors, HTTP 502/503/504 from a
  proxy at its address); ``doctor`` exits 3
  when DTM being unreachable is its only failing check, 1 when anything else failed too
- 130: interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence, TextIO

from .._consts import TRANS_TYPES
from ..errors import DtmError, DtmInvalidInput, DtmServerError, DtmTransportError
from ._base import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, Io, client_for, dtm_url, redact, shown_url
from ._render import clean, parse_since

__all__ = ["main"]

EXIT_INTERRUPTED = 130  # as a shell reports SIGINT
_GATEWAY_DOWN = (502, 503, 504)
_STATUSES = ("prepared", "submitted", "aborting", "succeed", "failed")
_DDL_DIALECTS = ("mysql", "mariadb", "postgres", "postgresql", "mongo")


def _since(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors raise instead of exiting, so :func:`main` returns 2 rather than killing its caller."""

    def exit(self, status: int = 0, message: Optional[str] = None) -> Any:
        if message:
            self._print_message(message, sys.stderr)
        raise _Exit(status)


class _Exit(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def build_parser() -> argparse.ArgumentParser:
    """The ``dtmcli`` argument parser."""
    # --dtm/--json/--timeout are accepted before or after the command; SUPPRESS keeps a sub-command
    # default from overwriting what was given before it.
    common = _Parser(add_help=False)
    common.add_argument("--dtm", metavar="URL", default=argparse.SUPPRESS,
                        help="DTM server (default: first of DTMCLI_SERVER, else http://localhost:36789/api/dtmsvr)")
    common.add_argument("--timeout-per-call", dest="call_timeout", type=_positive, metavar="S",
                        default=argparse.SUPPRESS, help="deadline of each call to DTM in seconds (default 10)")
    read = _Parser(add_help=False)
    read.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON for scripts")

    parser = _Parser(prog="dtmcli", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtm", metavar="URL", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--timeout-per-call", dest="call_timeout", type=_positive, default=10.0, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("query", parents=[common, read], help="show a transaction and its branches")
    p.add_argument("gid")

    p = sub.add_parser("list", parents=[common, read], help="list transactions, page by page as DTM returns them")
    p.add_argument("--status", choices=_STATUSES)
    p.add_argument("--type", choices=sorted(TRANS_TYPES))
    p.add_argument("--since", type=_since, metavar="DURATION", help="created within this long, e.g. 15m, 1h, 2d")
    p.add_argument("--limit", type=_positive_int, default=50, help="at most this many (default %(default)s)")

    p = sub.add_parser("watch", parents=[common, read], help="follow a transaction until it is final")
    p.add_argument("gid")
    p.add_argument("--interval", type=_positive, default=1.0, metavar="S", help="poll every S seconds (default 1)")
    p.add_argument("--timeout", type=_positive, default=None, metavar="S", help="give up (exit 1) after S seconds")

    p = sub.add_parser("force-stop", parents=[common], help="move an unfinished transaction to failed, no compensation")
    p.add_argument("gid")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")

    p = sub.add_parser("retry", parents=[common], help="make DTM retry a transaction now (resetNextCronTime)")
    p.add_argument("gid")

    p = sub.add_parser("doctor", parents=[common, read], help="check DTM, barrier tables, XA and Redis; explain fixes")
    p.add_argument("--db", action="append", metavar="URL",
                   help="mysql://user:pass@host:3306/db or postgresql://... (repeatable)")
    p.add_argument("--redis", metavar="URL", help="redis://[:pass@]host:6379/0")
    p.add_argument("--table", default=None, help="barrier table (default dtm_barrier.barrier)")
    p.add_argument("--xa", action="store_true", help="also check that the databases can run XA branches")

    p = sub.add_parser("ddl", help="print the barrier table DDL (as python -m dtmcli.sql ddl)")
    p.add_argument("dialect", choices=_DDL_DIALECTS)
    p.add_argument("--table", default=None, help="barrier table (default dtm_barrier.barrier)")

    sub.add_parser("coordinator", add_help=False, prefix_chars="\0",
                   help="run the embedded test coordinator (options as python -m dtmcli.testing; never production)"
                   ).add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _dispatch(args: argparse.Namespace, io: Io) -> int:
    if args.command == "ddl":
        from ..barrier import DEFAULT_TABLE, ddl

        io.out(ddl(args.dialect, args.table or DEFAULT_TABLE))
        return 0
    if args.command == "coordinator":
        from ..testing.__main__ import main as coordinator

        try:
            return coordinator(args.args, prog="dtmcli coordinator")
        except SystemExit as exc:  # its argparse: --help, or a usage error
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        except OSError as exc:  # e.g. the port is in use
            io.err(f"dtmcli coordinator: cannot start: {exc.strerror or exc}")
            return EXIT_USAGE
    url = dtm_url(args.dtm)
    if args.command == "doctor":
        from ..barrier import DEFAULT_TABLE
        from ._doctor import run_doctor

        args.table = args.table or DEFAULT_TABLE
        args.timeout = args.call_timeout
        return run_doctor(url, args, io)
    from ._admin import run_force_stop, run_retry
    from ._query import run_list, run_query, run_watch

    commands = {"query": run_query, "list": run_list, "watch": run_watch, "force-stop": run_force_stop,
                "retry": run_retry}
    with client_for(url, args.call_timeout) as dtm:
        return commands[args.command](dtm, args, io)


def main(
    argv: Optional[Sequence[str]] = None,
    *,
    stdin: Optional[TextIO] = None,
    stdout: Optional[TextIO] = None,
    stderr: Optional[TextIO] = None,
) -> int:
    """Run ``dtmcli`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code (see the module doc)."""
    io = Io(stdin or sys.stdin, stdout or sys.stdout, stderr or sys.stderr)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _Exit as exc:
        return exc.status
    url = dtm_url(getattr(args, "dtm", None))

    def say(text: object) -> None:  # what DTM or a transport error said: no secrets, no terminal escapes
        io.err(clean(redact(str(text), url)))

    try:
        return _dispatch(args, io)
    except KeyboardInterrupt:
        io.err("dtmcli: interrupted")
        return EXIT_INTERRUPTED
    except DtmInvalidInput as exc:
        say(f"dtmcli: error: {exc}")
        return EXIT_USAGE
    except DtmTransportError as exc:
        say(f"dtmcli: cannot reach DTM: {exc}")
        return EXIT_UNREACHABLE
    except DtmServerError as exc:
        if exc.status in _GATEWAY_DOWN:  # a proxy in front of DTM answers, DTM does not
            say(f"dtmcli: cannot reach DTM: HTTP {exc.status} from {shown_url(url, '--dtm URL')}")
            return EXIT_UNREACHABLE
        say(f"dtmcli: {exc}")
        return EXIT_FAILED
    except DtmError as exc:
        say(f"dtmcli: {exc}")
        return EXIT_FAILED
