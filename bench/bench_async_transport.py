"""Async transports: CPU per POST and requests/s, lean HTTP/1.1 vs httpx vs aiohttp, against the sync default.

Every implementation POSTs the same ~400-byte JSON body (a 2-step saga submit) to one local sink
that answers ``{"dtm_result":"SUCCESS"}`` at once (bench/_sink.py, its own process). Each cell runs
in a fresh interpreter (a worker subprocess of this script); rounds interleave the implementations
so machine noise hits them alike; the table shows the median over rounds. ``cpu`` is the worker's
own ``time.process_time()`` per request (all its threads), so the sink's CPU is not counted.

Modes: ``seq`` one request in flight; ``c256`` 256 in flight from one event loop (the sync
transport: 32 threads, its pool size). Every request carries the total deadline (10 s), as the
client sends it.

Usage: python bench/bench_async_transport.py [--n 3000] [--rounds 3] [--impls sync,http11,httpx,aiohttp]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

# bench/_sink.py's handler, with a listen backlog for hundreds of simultaneous connects (socketserver's is 5:
# the overflow resets connections).
SINK = """
import sys
from http.server import ThreadingHTTPServer
sys.path.insert(0, sys.argv[1])
from _sink import Handler

class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

server = Server(("127.0.0.1", 0), Handler)
with open(sys.argv[2], "w") as f:
    f.write(str(server.server_address[1]))
server.serve_forever()
"""


def start_sink() -> tuple[subprocess.Popen[bytes], str]:
    port_file = Path(tempfile.mkdtemp()) / "port"
    proc = subprocess.Popen([sys.executable, "-c", SINK, str(HERE), str(port_file)])
    for _ in range(100):
        if port_file.exists() and port_file.read_text():
            return proc, f"http://127.0.0.1:{port_file.read_text()}"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("sink did not start")


IMPLS = ("sync", "http11", "httpx", "aiohttp")
MODES = ("seq", "c256")
IN_FLIGHT = 256
SYNC_THREADS = 32


def body_for(base: str, i: int) -> bytes:
    busi = f"{base}/busi"
    payload = json.dumps({"amount": 30, "user_id": i}, separators=(",", ":"))
    return json.dumps(
        {"gid": f"bench{i:012d}", "trans_type": "saga", "concurrent": False, "protocol": "", "retry_interval": 10,
         "steps": [{"action": f"{busi}/TransOut", "compensate": f"{busi}/TransOutCom"},
                   {"action": f"{busi}/TransIn", "compensate": f"{busi}/TransInCom"}],
         "payloads": [payload, payload], "custom_data": "", "wait_result": False},
        separators=(",", ":"),
    ).encode()


# -- worker: one implementation x one mode, in its own interpreter ------------------------------------


def work_sync(mode: str, n: int, base: str) -> tuple[float, float]:
    from dtmcli._transport import default_transport

    t = default_transport(timeout=10.0)
    url = f"{base}/api/dtmsvr/submit"
    bodies = [body_for(base, i) for i in range(n)]

    def one(i: int) -> None:
        r = t.request("POST", url, body=bodies[i])
        assert r.status == 200, r

    for i in range(min(n, 200)):
        one(i)
    if mode == "seq":
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            one(i)
        return time.perf_counter() - wall, time.process_time() - cpu
    chunks = [range(k, n, SYNC_THREADS) for k in range(SYNC_THREADS)]

    def run(chunk: range) -> None:
        for i in chunk:
            one(i)

    threads = [threading.Thread(target=run, args=(c,)) for c in chunks]
    wall, cpu = time.perf_counter(), time.process_time()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return time.perf_counter() - wall, time.process_time() - cpu


async def work_async(impl: str, mode: str, n: int, base: str) -> tuple[float, float]:
    from dtmcli.asyncio._transport import AiohttpTransport, AsyncHttp11Transport, HttpxTransport

    t = {"httpx": HttpxTransport, "aiohttp": AiohttpTransport, "http11": AsyncHttp11Transport}[impl](timeout=10.0)
    url = f"{base}/api/dtmsvr/submit"
    bodies = [body_for(base, i) for i in range(n)]

    async def one(i: int) -> None:
        r = await t.request("POST", url, body=bodies[i])
        assert r.status == 200, r

    async def worker(chunk: range) -> None:
        for i in chunk:
            await one(i)

    width = 1 if mode == "seq" else IN_FLIGHT
    await asyncio.gather(*(worker(range(k, min(n, 2 * width), width)) for k in range(width)))  # warm the pool
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(range(k, n, width)) for k in range(width)))
    result = time.perf_counter() - wall, time.process_time() - cpu
    await t.aclose()
    return result


def worker_main(impl: str, mode: str, n: int, base: str) -> None:
    wall, cpu = work_sync(mode, n, base) if impl == "sync" else asyncio.run(work_async(impl, mode, n, base))
    print(json.dumps({"rps": n / wall, "cpu_us": cpu / n * 1e6, "wall_us": wall / n * 1e6}))


# -- driver ------------------------------------------------------------------------------------------


def run_cell(impl: str, mode: str, n: int, base: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--worker", impl, mode, str(n), base],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl}/{mode} failed:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--impls", default=",".join(IMPLS))
    args = ap.parse_args()
    impls = args.impls.split(",")
    sample = len(body_for("http://127.0.0.1:65535", 0))
    sink, base = start_sink()
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for _ in range(args.rounds):
            for mode in MODES:
                for impl in impls:
                    results.setdefault((impl, mode), []).append(run_cell(impl, mode, args.n, base))
    finally:
        sink.kill()
        sink.wait()

    def med(impl: str, mode: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(impl, mode)])

    print(f"async transports: POST of a {sample}-byte JSON body, {args.n} requests x {args.rounds} rounds, "
          f"median of rounds (c256: {IN_FLIGHT} in flight; sync: {SYNC_THREADS} threads)")
    if "httpx" in impls:
        import importlib.util

        # httpcore looks sniffio up on every request; when it is missing each lookup is a failed import
        have = importlib.util.find_spec("sniffio") is not None
        print(f"(httpx measured {'with' if have else 'without'} sniffio installed)")
    ref = "sync" if "sync" in impls else impls[0]
    print(f"{'mode':5} {'impl':8} {'req/s':>8} {'cpu µs/req':>11} {'cpu / ' + ref:>12} {'cpu / aiohttp':>14}")
    for mode in MODES:
        for impl in impls:
            cpu = med(impl, mode, "cpu_us")
            vs_ref = cpu / med(ref, mode, "cpu_us")
            vs_aio = f"{cpu / med('aiohttp', mode, 'cpu_us'):.2f}x" if "aiohttp" in impls else "-"
            print(f"{mode:5} {impl:8} {med(impl, mode, 'rps'):8.0f} {cpu:11.1f} {vs_ref:11.2f}x {vs_aio:>14}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        main()
