"""Client cost per submit over gRPC vs HTTP: a 2-step saga with DtmGrpcClient vs the HTTP DtmClient.

Each client talks to a local sink in its own process that answers at once: bench/_sink.py (HTTP, 200
SUCCESS) and a grpcio server answering every method with an empty message (this script with
``--sink``). Each measurement is its own client process (this script with ``--loop``); rounds
interleave the two so machine noise hits them alike. The table shows the median over rounds of the
wall time and the client process's CPU time (all threads: grpcio's C core works in its own) per submit;
the ratios are DtmGrpcClient / DtmClient, and DtmGrpcClient / a bare grpcio call sending the same
prebuilt Submit bytes (the floor of any gRPC client in Python).

Usage: python bench/grpc_vs_http.py [--n 2000] [--rounds 3]   (needs the grpc extra)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
IMPLS = ("http", "grpc", "grpc-raw")
WARMUP = 50


def _wait_port(proc: subprocess.Popen[bytes], port_file: Path) -> str:
    for _ in range(200):
        if port_file.exists() and port_file.read_text():
            return port_file.read_text()
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("sink did not start")


def start_sinks() -> tuple[list[subprocess.Popen[bytes]], dict[str, str]]:
    """The HTTP sink and the gRPC sink, each in its own process; their addresses by impl."""
    tmp = Path(tempfile.mkdtemp())
    http = subprocess.Popen([sys.executable, str(HERE / "_sink.py"), str(tmp / "http")])
    grpc_ = subprocess.Popen([sys.executable, __file__, "--sink", str(tmp / "grpc")])
    procs = [http, grpc_]
    try:
        target = f"127.0.0.1:{_wait_port(grpc_, tmp / 'grpc')}"
        addresses = {"http": f"http://127.0.0.1:{_wait_port(http, tmp / 'http')}", "grpc": target, "grpc-raw": target}
    except BaseException:
        for p in procs:
            p.kill()
        raise
    return procs, addresses


def serve_grpc_sink(port_file: str) -> None:
    """A gRPC server answering every unary method at once with an empty message (``Empty``, no bytes)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    class AnyMethod(grpc.GenericRpcHandler):
        def service(self, details: grpc.HandlerCallDetails) -> Any:
            return grpc.unary_unary_rpc_method_handler(lambda request, context: b"")

    server = grpc.server(ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((AnyMethod(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


def make_submit(impl: str, address: str) -> Callable[[int], None]:
    """One 2-step saga submit (local gid, no NewGid) with the impl's client."""
    if impl == "http":
        from dtmcli import DtmClient, Saga

        dtm = DtmClient(f"{address}/api/dtmsvr")
        busi = f"{address}/busi"
        p1, p2 = {"amount": 30, "user_id": 1}, {"amount": 30, "user_id": 2}

        def http_submit(i: int) -> None:
            Saga(dtm, f"bench{i:09d}").add(f"{busi}/TransOut", f"{busi}/TransOutCom", p1).add(
                f"{busi}/TransIn", f"{busi}/TransInCom", p2).submit()

        return http_submit
    from google.protobuf import wrappers_pb2

    from dtmcli.grpc import DtmGrpcClient
    from dtmcli.grpc import Saga as GrpcSaga

    gbusi = "127.0.0.1:50589/busi.Busi"
    m1, m2 = wrappers_pb2.Int64Value(value=30), wrappers_pb2.Int64Value(value=31)
    if impl == "grpc-raw":  # the floor: the same Submit message's bytes, prebuilt, on a bare grpcio channel
        import grpc

        saga = GrpcSaga(DtmGrpcClient(address), "bench000000000").add(
            f"{gbusi}/TransOut", f"{gbusi}/TransOutRevert", m1).add(f"{gbusi}/TransIn", f"{gbusi}/TransInRevert", m2)
        from dtmcli.grpc._wire import dtm_request

        body = dtm_request(saga.build_body()).SerializeToString()
        call = grpc.insecure_channel(address).unary_unary("/dtmgimp.Dtm/Submit")

        def raw_submit(i: int) -> None:
            call(body, timeout=10)

        return raw_submit
    client = DtmGrpcClient(address)

    def grpc_submit(i: int) -> None:
        GrpcSaga(client, f"bench{i:09d}").add(f"{gbusi}/TransOut", f"{gbusi}/TransOutRevert", m1).add(
            f"{gbusi}/TransIn", f"{gbusi}/TransInRevert", m2).submit()

    return grpc_submit


def loop(impl: str, n: int, address: str) -> dict[str, float]:
    """Time ``n`` submits (after a warm-up); µs per submit: wall mean/p50/p99 and process CPU."""
    submit = make_submit(impl, address)
    for i in range(WARMUP):
        submit(i)
    times = []
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(WARMUP, WARMUP + n):
        t = time.perf_counter()
        submit(i)
        times.append(time.perf_counter() - t)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    times.sort()
    return {"mean": wall / n * 1e6, "p50": times[n // 2] * 1e6, "p99": times[int(n * 0.99)] * 1e6,
            "cpu": cpu / n * 1e6}


def run(impl: str, n: int, address: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--loop", impl, str(n), address], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} failed:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    if sys.argv[1:2] == ["--sink"]:
        serve_grpc_sink(sys.argv[2])
        return
    if sys.argv[1:2] == ["--loop"]:
        print(json.dumps(loop(sys.argv[2], int(sys.argv[3]), sys.argv[4])))
        return
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sinks, addresses = start_sinks()
    try:
        results: dict[str, list[dict[str, float]]] = {impl: [] for impl in IMPLS}
        for _ in range(args.rounds):
            for impl in IMPLS:
                results[impl].append(run(impl, args.n, addresses[impl]))
    finally:
        for p in sinks:
            p.kill()
            p.wait()

    def med(impl: str, key: str) -> float:
        return statistics.median(r[key] for r in results[impl])

    print(f"2-step saga submit, {args.n} calls x {args.rounds} rounds, median of rounds (µs per submit)")
    print(f"{'client':14} {'mean':>8} {'p50':>8} {'p99':>8} {'cpu':>8}")
    for impl, name in (("http", "DtmClient"), ("grpc", "DtmGrpcClient"), ("grpc-raw", "raw grpcio")):
        print(f"{name:14} " + " ".join(f"{med(impl, k):8.0f}" for k in ("mean", "p50", "p99", "cpu")))
    print(f"DtmGrpcClient / DtmClient:   cpu {med('grpc', 'cpu') / med('http', 'cpu'):.2f}x   "
          f"wall {med('grpc', 'mean') / med('http', 'mean'):.2f}x")
    print(f"DtmGrpcClient / raw grpcio:  cpu {med('grpc', 'cpu') / med('grpc-raw', 'cpu'):.2f}x   "
          f"wall {med('grpc', 'mean') / med('grpc-raw', 'mean'):.2f}x")


if __name__ == "__main__":
    main()
