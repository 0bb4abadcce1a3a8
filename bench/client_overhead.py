"""Client overhead per call: dtmcli vs a raw requests.Session, stdlib http.client, and PyPI dtmcli 1.7.7.0.

``new`` is dtmcli on its default transport (the lean ``Http11Transport``), ``new-urllib3`` the same
calls on ``Urllib3Transport`` (the default before issue 15).

All of them send the same bodies to one local endpoint that answers at once (bench/_sink.py, its own
process). Rounds interleave the implementations so machine noise hits them alike; the table shows
the median over rounds. Ratios are what matter; absolute times are context.

Usage: python bench/client_overhead.py [--n 2000] [--rounds 3] [--workloads saga,tcc,msg]
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
from typing import Any

HERE = Path(__file__).resolve().parent
OLD_VENV = HERE / ".venv-old"
IMPLS = ("new", "new-urllib3", "raw", "httpclient", "old")


def old_python() -> str:
    """The interpreter of a virtual environment holding the official dtmcli 1.7.7.0."""
    py = OLD_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(OLD_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "dtmcli==1.7.7.0"], check=True)
    return str(py)


def start_sink() -> tuple[subprocess.Popen[bytes], str]:
    port_file = Path(tempfile.mkdtemp()) / "port"
    proc = subprocess.Popen([sys.executable, str(HERE / "_sink.py"), str(port_file)])
    for _ in range(100):
        if port_file.exists() and port_file.read_text():
            return proc, f"http://127.0.0.1:{port_file.read_text()}"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("sink did not start")


def run(python: str, impl: str, workload: str, n: int, base: str) -> dict[str, Any]:
    out = subprocess.run([python, str(HERE / "_client_loop.py"), impl, workload, str(n), base],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{impl}/{workload} failed:\n{out.stderr}")
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default="saga,tcc,msg")
    args = ap.parse_args()
    pythons = {"new": sys.executable, "new-urllib3": sys.executable, "raw": sys.executable,
               "httpclient": sys.executable, "old": old_python()}
    sink, base = start_sink()
    try:
        results: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for workload in args.workloads.split(","):
            for _ in range(args.rounds):
                for impl in IMPLS:
                    results.setdefault((workload, impl), []).append(run(pythons[impl], impl, workload, args.n, base))
    finally:
        sink.kill()
        sink.wait()

    def med(workload: str, impl: str, key: str) -> float:
        return statistics.median(r[key] for r in results[(workload, impl)])

    print(f"client overhead, {args.n} calls x {args.rounds} rounds, median of rounds (µs per call)")
    print(f"{'workload':8} {'impl':11} {'mean':>8} {'p50':>8} {'p99':>8} {'cpu':>8}")
    for workload in args.workloads.split(","):
        for impl in IMPLS:
            print(f"{workload:8} {impl:11} " + " ".join(
                f"{med(workload, impl, k):8.0f}" for k in ("mean_us", "p50_us", "p99_us", "cpu_us")))
    print("\nratios (mean wall time; cpu in brackets)")
    for workload in args.workloads.split(","):
        def ratio(a: str, b: str, key: str, workload: str = workload) -> float:
            return med(workload, a, key) / med(workload, b, key)

        print(
            f"{workload:8} dtmcli/raw-requests {ratio('new', 'raw', 'mean_us'):5.2f}x "
            f"({ratio('new', 'raw', 'cpu_us'):.2f}x)"
            f"  dtmcli/http.client {ratio('new', 'httpclient', 'mean_us'):5.2f}x "
            f"({ratio('new', 'httpclient', 'cpu_us'):.2f}x)"
            f"  1.7.7.0/dtmcli {ratio('old', 'new', 'mean_us'):5.2f}x ({ratio('old', 'new', 'cpu_us'):.2f}x)"
            f"  on-urllib3/dtmcli {ratio('new-urllib3', 'new', 'mean_us'):5.2f}x "
            f"({ratio('new-urllib3', 'new', 'cpu_us'):.2f}x)"
        )

if __name__ == "__main__":
    main()
