"""End-to-end throughput: two-step sagas per second through a coordinator, with real HTTP branches.

By default the coordinator is dtmcli's in-process one; ``--dtm-server URL`` points the same script
at a real DTM server. Branches are served by dtmcli.testing.BranchService (HTTP/1.1, TCP_NODELAY).
Baseline, measured in the same run with the same client threads: the plain HTTP calls one saga
implies (one POST to the coordinator's ping endpoint plus two POSTs to the branch service), so the
ratio shows what the transaction machinery costs on top of the bare round trips; made with urllib3
(as in earlier runs) and with ``Http11Transport`` (the client's default since issue 15). The CPU
columns are the process's CPU time per operation: everything runs in this process.

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
from dtmcli._transport import Http11Transport
from dtmcli.testing import BranchService, DtmTestServer


def rate(threads: int, seconds: float, op: Callable[[], None]) -> tuple[float, float]:
    """Operations per second, and the process's CPU µs per operation (everything runs in this process)."""
    counts = [0] * threads
    stop = threading.Event()

    def worker(i: int) -> None:
        while not stop.is_set():
            op()
            counts[i] += 1

    op()
    ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    start, cpu = time.perf_counter(), time.process_time()
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    done = sum(counts)
    return done / (time.perf_counter() - start), (time.process_time() - cpu) / max(done, 1) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--dtm-server", default="")
    ap.add_argument("--only-sagas", action="store_true", help="skip the baseline (e.g. under a profiler)")
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

        lean = Http11Transport(pool_maxsize=args.threads)

        def lean_calls() -> None:  # the same calls on the client's default transport
            lean.request("POST", ping, body=b"{}")
            lean.request("POST", busi.url("/TransOut"), body=b'{"amount":30}')
            lean.request("POST", busi.url("/TransIn"), body=b'{"amount":30}')

        skip = (1.0, 1.0)
        base, base_cpu = skip if args.only_sagas else rate(args.threads, args.seconds, raw_calls)
        lean_base, lean_cpu = skip if args.only_sagas else rate(args.threads, args.seconds, lean_calls)
        sagas, saga_cpu = rate(args.threads, args.seconds, saga)
        busi.clear()
    print(f"end-to-end, {kind}, {args.threads} client threads, {args.seconds:.0f} s each")
    print(f"  2-step sagas (wait_result)       {sagas:8.0f} /s   {saga_cpu:6.0f} µs CPU each (this process)")
    print(f"  baseline: bare HTTP calls of one {base:8.0f} /s   {base_cpu:6.0f} µs CPU each"
          "  (1 coordinator + 2 branch POSTs)")
    print(f"  the same on Http11Transport      {lean_base:8.0f} /s   {lean_cpu:6.0f} µs CPU each")
    print(f"  ratio baseline/sagas             {base / sagas:8.2f}x  (CPU {saga_cpu / base_cpu:.2f}x);"
          f" on Http11Transport {lean_base / sagas:.2f}x (CPU {saga_cpu / lean_cpu:.2f}x)")


if __name__ == "__main__":
    main()
