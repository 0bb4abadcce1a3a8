"""Cost of OpenTelemetry tracing per saga submit: absent / off (the default) / on / on inside a span.

Each mode runs in its own process against one local endpoint that answers at once (bench/_sink.py);
rounds interleave the modes and the table shows the median over rounds, with ratios against
"absent" (the client as if opentelemetry-api were not installed).

Usage: python bench/tracing_overhead.py [--n 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from client_overhead import start_sink

HERE = Path(__file__).resolve().parent
MODES = ("absent", "off", "on", "on-span")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    sink, base = start_sink()
    results: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for _ in range(args.rounds):
            for mode in MODES:
                out = subprocess.run([sys.executable, str(HERE / "_trace_loop.py"), mode, str(args.n), base],
                                     capture_output=True, text=True, check=True)
                results[mode].append(json.loads(out.stdout)["cpu_us"])
    finally:
        sink.kill()
    base_cpu = statistics.median(results["absent"])
    sys.stdout.write("| tracing | CPU µs per saga submit | vs absent |\n|---|---|---|\n")
    for mode in MODES:
        cpu = statistics.median(results[mode])
        sys.stdout.write(f"| {mode} | {cpu:.0f} | {cpu / base_cpu:.2f}x |\n")


if __name__ == "__main__":
    main()
