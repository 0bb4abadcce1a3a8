"""`make bench`: every benchmark in turn; each prints its own table of ratios against its baseline."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    ["client_overhead.py", "--n", "2000", "--rounds", "3"],
    ["async_client.py", "--n", "2000", "--rounds", "3", "--seconds", "2"],
    ["tracing_overhead.py", "--n", "2000", "--rounds", "3"],
    ["grpc_vs_http.py", "--n", "2000", "--rounds", "3"],
    ["barrier_overhead.py", "--seconds", "2"],
    ["barrier_latency.py", "--n", "1000"],
    ["e2e_throughput.py", "--seconds", "3"],
]


def main() -> int:
    extra = sys.argv[1:]  # e.g. --dtm-server URL is passed to e2e_throughput only
    failed = 0
    for script, *args in SCRIPTS:
        if script == "e2e_throughput.py":
            args += extra
        sys.stdout.write(f"\n=== {script} {' '.join(args)}\n")
        sys.stdout.flush()
        failed += subprocess.run([sys.executable, str(HERE / script), *args]).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
