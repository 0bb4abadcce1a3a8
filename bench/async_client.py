"""The asyncio client against the sync one: CPU per saga submit, and submits per second under load.

1. CPU: a 2-step saga submit, one after another, with the sync ``DtmClient`` (default transport) and
   with ``dtmcli.asyncio.AsyncDtmClient`` on its default transport, on ``AsyncHttp11Transport``, on
   ``HttpxTransport`` and on ``AiohttpTransport``. Median over rounds that interleave the clients.
2. Throughput: the sync client in thread pools of 1, 4, 16 and 64 threads (a pool sized to the
   threads) against the async client with 1, 16, 256 and 1024 submits in flight on one event loop
   (default pool size; the default transport, then AsyncHttp11Transport and AiohttpTransport by
   name). Threads alive during each window are reported.

The DTM stand-in answers every request at once with 200 SUCCESS, in its own process. By default it
is an asyncio server (HTTP/1.1 keep-alive, TCP_NODELAY) so that it is not what limits the
throughput cells; ``--sink threaded`` uses bench/_sink.py instead. With an instant sink both clients
are bound by their own CPU (one core: the GIL, or the one event loop); ``--latency 0.005`` makes the
sink of the throughput cells answer after 5 ms, like a DTM writing to its store, which is where
in-flight requests pay (the CPU cells always use an instant sink).
Every cell runs in a fresh process. Ratios are what matter; absolute figures are context.

Usage: python bench/async_client.py [--n 2000] [--rounds 3] [--seconds 2] [--rate-rounds 3]
       [--sink asyncio|threaded] [--latency SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
CPU_CLIENTS = ("sync", "async-default", "async-http11", "async-httpx", "async-aiohttp")
SYNC_THREADS = (1, 4, 16, 64)
ASYNC_IN_FLIGHT = (1, 16, 256, 1024)
RATE_ASYNC = ("async", "async-http11", "async-aiohttp")  # the default, then each transport by name
P1 = {"amount": 30, "user_id": 1}
P2 = {"amount": 30, "user_id": 2}

# -- the sink (its own process) -------------------------------------------------------------------

_BODY = b'{"dtm_result":"SUCCESS"}'
_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(_BODY)) + _BODY


def serve_sink(port_file: str, latency: float) -> None:
    """Answer every request with 200 SUCCESS (after ``latency`` seconds), pipelined requests included;
    write the port, serve forever."""
    import asyncio
    import socket

    class Sink(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.loop = asyncio.get_running_loop()
            self.buf = b""
            transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data
            answers = 0
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                length = 0
                for line in buf[:end].lower().split(b"\r\n")[1:]:
                    if line.startswith(b"content-length:"):
                        length = int(line[15:])
                    elif line.startswith(b"transfer-encoding:"):
                        raise RuntimeError("the sink does not read chunked bodies")
                if len(buf) < end + 4 + length:
                    break
                buf = buf[end + 4 + length:]
                answers += 1
            self.buf = buf
            if answers and latency:
                self.loop.call_later(latency, self.answer, answers)
            elif answers:
                self.transport.write(_ANSWER * answers)

        def answer(self, answers: int) -> None:
            if not self.transport.is_closing():
                self.transport.write(_ANSWER * answers)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Sink, "127.0.0.1", 0, backlog=4096)
        with open(port_file, "w") as f:
            f.write(str(server.sockets[0].getsockname()[1]))
        await server.serve_forever()

    asyncio.run(main())


def start_sink(kind: str, latency: float) -> tuple[subprocess.Popen[bytes], str]:
    port_file = Path(tempfile.mkdtemp()) / "port"
    if kind == "threaded":
        cmd = [sys.executable, str(HERE / "_sink.py"), str(port_file)]
    else:
        cmd = [sys.executable, __file__, "--serve-sink", str(port_file), "--latency", str(latency)]
    proc = subprocess.Popen(cmd)
    for _ in range(100):
        if port_file.exists() and port_file.read_text():
            return proc, f"http://127.0.0.1:{port_file.read_text()}"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("sink did not start")


# -- one cell (its own process) -------------------------------------------------------------------

_counter = [0]


def gid() -> str:
    _counter[0] += 1
    return f"b{os.getpid()}x{_counter[0]:09d}"


def sync_submitter(base: str, pool: int = 32) -> tuple[Callable[[], None], str]:
    from dtmcli import DtmClient, Saga
    from dtmcli._transport import Http11Transport

    dtm = DtmClient(f"{base}/api/dtmsvr") if pool <= 32 else DtmClient(
        f"{base}/api/dtmsvr", transport=Http11Transport(pool_maxsize=pool))
    busi = f"{base}/busi"

    def submit() -> None:
        Saga(dtm, gid()).add(f"{busi}/TransOut", f"{busi}/TransOutCom", P1).add(
            f"{busi}/TransIn", f"{busi}/TransInCom", P2).submit()

    return submit, type(dtm.transport).__name__


def async_submitter(base: str, transport: str) -> tuple[Callable[[], Any], str]:
    from dtmcli.asyncio import AsyncDtmClient, Saga
    from dtmcli.asyncio._transport import AiohttpTransport, AsyncHttp11Transport, HttpxTransport

    if transport == "default":
        dtm = AsyncDtmClient(f"{base}/api/dtmsvr")
    else:
        cls = {"httpx": HttpxTransport, "aiohttp": AiohttpTransport, "http11": AsyncHttp11Transport}[transport]
        dtm = AsyncDtmClient(f"{base}/api/dtmsvr", transport=cls())
    busi = f"{base}/busi"

    async def submit() -> None:
        await Saga(dtm, gid()).add(f"{busi}/TransOut", f"{busi}/TransOutCom", P1).add(
            f"{busi}/TransIn", f"{busi}/TransInCom", P2).submit()

    return submit, type(dtm.transport).__name__


def cell_cpu(client: str, n: int, base: str) -> dict[str, Any]:
    """``n`` submits one after another: wall and CPU per submit, latency percentiles."""
    lat: list[float] = []
    if client == "sync":
        submit, transport = sync_submitter(base)
        for _ in range(min(200, n)):
            submit()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            submit()
            lat.append(time.perf_counter() - t)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    else:
        import asyncio

        asubmit, transport = async_submitter(base, client.split("-", 1)[1])

        async def main() -> tuple[float, float]:
            for _ in range(min(200, n)):
                await asubmit()
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                await asubmit()
                lat.append(time.perf_counter() - t)
            return time.process_time() - cpu0, time.perf_counter() - wall0

        cpu, wall = asyncio.run(main())
    lat.sort()
    return {"client": client, "transport": transport, "cpu_us": cpu / n * 1e6, "mean_us": wall / n * 1e6,
            "p50_us": lat[n // 2] * 1e6, "p99_us": lat[min(n - 1, int(n * 0.99))] * 1e6}


def cell_rate(client: str, concurrency: int, seconds: float, base: str) -> dict[str, Any]:
    """Submits per second with ``concurrency`` threads (sync) or tasks on one loop (async)."""
    import threading

    warm = min(0.5, seconds / 4)
    if client == "sync":
        submit, transport = sync_submitter(base, pool=concurrency)
        counts = [0] * concurrency
        stop = threading.Event()

        def worker(i: int) -> None:
            while not stop.is_set():
                submit()
                counts[i] += 1

        ts = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
        for t in ts:
            t.start()
        time.sleep(warm)
        c0, cpu0, t0 = sum(counts), time.process_time(), time.perf_counter()
        time.sleep(seconds)
        c1, cpu1, t1 = sum(counts), time.process_time(), time.perf_counter()
        threads = threading.active_count()
        stop.set()
        for t in ts:
            t.join()
    else:
        import asyncio

        asubmit, transport = async_submitter(base, client.partition("-")[2] or "default")

        async def main() -> tuple[int, float, float, int, float, float, int]:
            done = [0]
            running = [True]

            async def worker() -> None:
                while running[0]:
                    await asubmit()
                    done[0] += 1

            tasks = [asyncio.ensure_future(worker()) for _ in range(concurrency)]
            await asyncio.sleep(warm)
            c0, cpu0, t0 = done[0], time.process_time(), time.perf_counter()
            await asyncio.sleep(seconds)
            c1, cpu1, t1 = done[0], time.process_time(), time.perf_counter()
            threads = threading.active_count()
            running[0] = False
            await asyncio.gather(*tasks)
            return c0, cpu0, t0, c1, cpu1, t1, threads

        c0, cpu0, t0, c1, cpu1, t1, threads = asyncio.run(main())
    done = c1 - c0
    return {"client": client, "transport": transport, "concurrency": concurrency, "threads": threads,
            "rate": done / (t1 - t0), "cpu_us": (cpu1 - cpu0) / max(done, 1) * 1e6}


# -- the driver -------------------------------------------------------------------------------------


def run_cell(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--cell", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cell {args} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="submits per CPU cell")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the CPU cells")
    ap.add_argument("--seconds", type=float, default=2.0, help="measured seconds per throughput cell")
    ap.add_argument("--rate-rounds", type=int, default=3, help="rounds of the throughput cells (best is kept)")
    ap.add_argument("--sink", choices=("asyncio", "threaded"), default="asyncio")
    ap.add_argument("--latency", type=float, default=0.0,
                    help="seconds the (asyncio) sink waits before each answer, standing in for DTM's own work")
    ap.add_argument("--serve-sink", metavar="PORT_FILE", help=argparse.SUPPRESS)
    ap.add_argument("--cell", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_sink:
        serve_sink(args.serve_sink, args.latency)
        return
    if args.latency and args.sink == "threaded":
        ap.error("--latency needs the asyncio sink")
    if args.cell:
        kind, client, *rest = args.cell
        if kind == "cpu":
            result = cell_cpu(client, int(rest[0]), rest[1])
        else:
            result = cell_rate(client, int(rest[0]), float(rest[1]), rest[2])
        sys.stdout.write(json.dumps(result) + "\n")
        return

    sinks = [start_sink(args.sink, 0.0)]  # the CPU cells always use an instant sink
    if args.latency:
        sinks.append(start_sink(args.sink, args.latency))
    base, rate_base = sinks[0][1], sinks[-1][1]
    started = time.perf_counter()
    cells = [("sync", k) for k in SYNC_THREADS] + [
        (client, k) for client in RATE_ASYNC for k in ASYNC_IN_FLIGHT]
    try:
        cpu: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.rounds):
            for client in CPU_CLIENTS:
                cpu.setdefault(client, []).append(run_cell("cpu", client, str(args.n), base))
        rate_runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for _ in range(args.rate_rounds):
            for client, k in cells:
                rate_runs.setdefault((client, k), []).append(
                    run_cell("rate", client, str(k), str(args.seconds), rate_base))
    finally:
        for proc, _ in sinks:
            proc.kill()
            proc.wait()
    # The best round of each cell: load from other processes only ever lowers a throughput.
    rates = [max(rate_runs[cell], key=lambda r: r["rate"]) for cell in cells] if args.rate_rounds > 0 else []

    def med(client: str, key: str) -> float:
        return float(statistics.median(r[key] for r in cpu[client]))

    print(f"async client vs sync client; {args.sink} sink in its own process; {os.cpu_count()} CPUs; "
          f"Python {sys.version.split()[0]}; {time.perf_counter() - started:.0f} s")
    print(f"\n1. one 2-step saga submit at a time, {args.n} submits x {args.rounds} rounds, median of rounds (µs)")
    print(f"{'client':15} {'transport':20} {'cpu':>7} {'wall':>7} {'p50':>7} {'p99':>7} {'cpu/sync':>9}")
    for client in CPU_CLIENTS:
        print(f"{client:15} {cpu[client][0]['transport']:20} " + " ".join(
            f"{med(client, k):7.0f}" for k in ("cpu_us", "mean_us", "p50_us", "p99_us"))
            + f" {med(client, 'cpu_us') / med('sync', 'cpu_us'):8.2f}x")
    if not rates:  # --rate-rounds 0: the CPU cells only
        return

    print(f"\n2. throughput, 2-step saga submits per second, {args.seconds:g} s per cell, "
          f"best of {args.rate_rounds} rounds; the sink answers after {args.latency * 1e3:g} ms")
    print(f"{'client':13} {'transport':20} {'in flight':>9} {'threads':>8} {'submits/s':>10} {'cpu µs/submit':>14}")
    for r in rates:
        print(f"{r['client']:13} {r['transport']:20} {r['concurrency']:9d} {r['threads']:8d} "
              f"{r['rate']:10.0f} {r['cpu_us']:14.0f}")
    best_sync = max((r for r in rates if r["client"] == "sync"), key=lambda r: r["rate"])
    print("\nratios (target: async CPU per submit <= sync; async at 256 in flight >= best sync pool)")
    for client in CPU_CLIENTS[1:]:
        print(f"  cpu per submit, {client} / sync: {med(client, 'cpu_us') / med('sync', 'cpu_us'):.2f}x")
    print(f"  best sync pool: {best_sync['rate']:.0f}/s with {best_sync['concurrency']} worker threads "
          f"({best_sync['threads']} threads alive)")
    for client in RATE_ASYNC:
        mine = [r for r in rates if r["client"] == client]
        at256 = next(r for r in mine if r["concurrency"] == 256)
        best = max(mine, key=lambda r: r["rate"])
        print(f"  {client}: 256 in flight {at256['rate']:.0f}/s ({at256['threads']} thread(s) alive) "
              f"-> {at256['rate'] / best_sync['rate']:.2f}x the best sync pool; best {best['rate']:.0f}/s "
              f"at {best['concurrency']} in flight -> {best['rate'] / best_sync['rate']:.2f}x")
        print(f"  {client}: cpu per submit / the sync pool's least: " + ", ".join(
            f"{r['cpu_us'] / min(s['cpu_us'] for s in rates if s['client'] == 'sync'):.2f}x at {r['concurrency']}"
            for r in mine))

if __name__ == "__main__":
    main()
