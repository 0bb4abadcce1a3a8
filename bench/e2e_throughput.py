"""End-to-end throughput: two-step sagas per second through a coordinator, with real HTTP branches.

By default the coordinator is dtmcli's in-process one; ``--dtm-server URL`` points the same script
at a real DTM server. Branches are served by dtmcli.testing.BranchService (HTTP/1.1, TCP_NODELAY).
Baseline, measured in the same run with the same client threads: the plain HTTP calls one saga
implies (one POST to the coordinator's ping endpoint plus two POSTs to the branch service), so the
ratio shows what the transaction machinery costs on top of the bare round trips.

Usage: python bench/e2e_throughput.py [--seconds 3] [--threads 4] [--dtm-server URL]
"""

from __future__ import annotations

import argparse
import threading
import time
from contextlib import ExitStack
from typing import Callable

import urllib3

from dtmcli import DtmClient, Saga
from dtmcli.testing import BranchService, DtmTestServer


def rate(threads: int, seconds: float, op: Callable[[], None]) -> float:
    counts = [0] * threads
    stop = threading.Event()

    def worker(i: int) -> None:
        while not stop.is_set():
            op()
            counts[i] += 1

    op()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start = time.perf_counter()
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--dtm-server", default="")
    args = ap.parse_args()
    with ExitStack() as stack:
        if args.dtm_server:
            url, kind = args.dtm_server, "real DTM server"
        else:
            url, kind = stack.enter_context(DtmTestServer(clock="real")).url, "in-process coordinator"
        busi = stack.enter_context(BranchService())
        for path in ("/TransOut", "/TransOutCom", "/TransIn", "/TransInCom"):
            busi.route(path, 200)
        dtm = DtmClient(url)
        payload = {"amount": 30, "user_id": 1}

        def saga() -> None:
            Saga(dtm, wait_result=True).add(busi.url("/TransOut"), busi.url("/TransOutCom"), payload).add(
                busi.url("/TransIn"), busi.url("/TransInCom"), payload
            ).submit()

        pool = urllib3.PoolManager(maxsize=args.threads)
        ping = url.rsplit("/", 1)[0] + "/ping"

        def raw_calls() -> None:
            pool.request("POST", ping, body=b"{}")
            pool.request("POST", busi.url("/TransOut"), body=b'{"amount":30}')
            pool.request("POST", busi.url("/TransIn"), body=b'{"amount":30}')

        base = rate(args.threads, args.seconds, raw_calls)
        sagas = rate(args.threads, args.seconds, saga)
        busi.clear()
    print(f"end-to-end, {kind}, {args.threads} client threads, {args.seconds:.0f} s each")
    print(f"  2-step sagas (wait_result)       {sagas:8.0f} /s")
    print(f"  baseline: bare HTTP calls of one {base:8.0f} /s  (1 coordinator + 2 branch POSTs)")
    print(f"  ratio baseline/sagas             {base / sagas:8.2f}x")


if __name__ == "__main__":
    main()
