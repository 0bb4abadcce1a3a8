"""One tracing mode, timed: CPU per 2-step saga submit. Prints a JSON summary on stdout.

Run by bench/tracing_overhead.py. Usage: python _trace_loop.py MODE N BASE_URL, MODE one of
absent (as if opentelemetry-api were not installed), off (installed, no tracer provider: the
default), on (an SDK provider with a batch processor), on-span (the same, inside a current span,
so the trace context also goes into branch_headers).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

MODE, N, BASE = sys.argv[1], int(sys.argv[2]), sys.argv[3]
DTM, BUSI = f"{BASE}/api/dtmsvr", f"{BASE}/busi"


def main() -> None:
    from dtmcli import DtmClient, Saga, _otel

    ctx: Any = contextlib.nullcontext()
    if MODE == "absent":
        _otel._trace = None  # type: ignore[assignment]
    elif MODE.startswith("on"):
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        class Discard(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Discard()))
        trace.set_tracer_provider(provider)
        if MODE == "on-span":
            ctx = trace.get_tracer("bench").start_as_current_span("request")
    dtm = DtmClient(DTM)
    with ctx:
        def once(i: int) -> None:
            Saga(dtm, f"g{i:09d}").add(f"{BUSI}/TransOut", f"{BUSI}/TransOutCom", {"amount": 30}).add(
                f"{BUSI}/TransIn", f"{BUSI}/TransInCom", {"amount": 30}).submit()

        for i in range(200):
            once(i)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for i in range(N):
            once(i)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    sys.stdout.write(json.dumps({"cpu_us": cpu / N * 1e6, "wall_us": wall / N * 1e6}))


main()
