"""``python -m dtmcli.testing``: run the DTM-compatible test coordinator in real time."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Optional, Sequence

from .server import DtmTestServer


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m dtmcli.testing") -> int:
    """Parse options, serve until SIGINT/SIGTERM (also ``dtmcli coordinator``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=36789)
    parser.add_argument("--sqlite", metavar="PATH", help="keep state in this SQLite file (resumed on restart)")
    parser.add_argument("--retry-interval", type=int, default=10)
    parser.add_argument("--timeout-to-fail", type=int, default=35)
    parser.add_argument("--request-timeout", type=int, default=3)
    parser.add_argument("--cron-interval", type=float, default=0.5, help="seconds between cron polls")
    parser.add_argument("--grpc-port", type=int, default=None,
                        help="also serve DTM's gRPC API on this port (DTM uses 36790; needs the grpc extra)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = DtmTestServer(
        host=args.host,
        port=args.port,
        clock="real",
        sqlite_path=args.sqlite,
        retry_interval=args.retry_interval,
        timeout_to_fail=args.timeout_to_fail,
        request_timeout=args.request_timeout,
        cron_interval=args.cron_interval,
        grpc_port=args.grpc_port,
    )
    with server:
        logging.getLogger("dtmcli.testing").info("serving DTM API at %s (Ctrl-C to stop)", server.url)
        if args.grpc_port is not None:
            logging.getLogger("dtmcli.testing").info("serving DTM's gRPC API at %s", server.grpc_target)
        stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
