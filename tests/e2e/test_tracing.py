"""OpenTelemetry end to end: one saga (and one TCC) through the coordinator to real HTTP branch services
(Flask and FastAPI) makes one trace holding the client's DTM calls and every branch handler's span.

Uses the SDK's in-memory exporter. The tracer provider is installed for each test only (the global is
restored after), so the rest of the suite runs with tracing off.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import services
from fastapi import APIRouter, FastAPI
from flavours import Flavour, both
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from web_servers import serve_asgi, serve_wsgi

from dtmcli import _otel, local_gid
from dtmcli.contrib.fastapi import BranchDep, DtmRoute
from dtmcli.testing import DtmFacade


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    assert _otel.enabled()
    yield exporter
    provider.shutdown()


def flask_branches() -> Any:
    from flask import Flask

    from dtmcli.contrib.flask import branch_handler

    app = Flask("traced")

    @app.post("/api/TransOut")
    @branch_handler
    def trans_out(info: Any) -> None:
        return None

    return app


def fastapi_branches() -> Any:
    app = FastAPI()
    router = APIRouter(route_class=DtmRoute)

    @router.post("/api/TransIn")
    async def trans_in(info: BranchDep) -> None:
        return None

    app.include_router(router)
    return app


def by_name(finished: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for span in finished:
        out.setdefault(span.name, []).append(span)
    return out


@both
def test_one_saga_is_one_trace_across_dtm_and_the_branches(
    flavour: Flavour, dtm: DtmFacade, spans: InMemorySpanExporter
) -> None:
    tracer = trace.get_tracer("shop")
    gid = local_gid()
    with serve_wsgi(flask_branches()) as out_url, serve_asgi(fastapi_branches()) as in_url:
        with tracer.start_as_current_span("checkout") as root:
            saga = (
                flavour.m.Saga(dtm.url, gid, wait_result=True)
                .add(f"{out_url}/api/TransOut", f"{out_url}/api/TransOutCom", {"amount": 30})
                .add(f"{in_url}/api/TransIn", f"{in_url}/api/TransInCom", {"amount": 30})
            )
            flavour.run(saga.submit())
        assert dtm.wait_status(gid).status == "succeed"
    trace_id = root.get_span_context().trace_id
    names = by_name(spans.get_finished_spans())
    (submit,) = names["dtm submit"]
    handlers = names["dtm branch saga action"]
    assert len(handlers) == 2
    for span in (submit, *handlers):
        assert span.context.trace_id == trace_id  # one trace
    assert submit.parent is not None and submit.parent.span_id == root.get_span_context().span_id
    assert submit.attributes is not None and submit.attributes["dtm.gid"] == gid
    parents = {s.context.span_id: s.parent for s in spans.get_finished_spans()}

    def ancestors(span: ReadableSpan) -> list[int]:
        out, parent = [], span.parent
        while parent is not None:
            out.append(parent.span_id)
            parent = parents.get(parent.span_id)
        return out

    for span in handlers:  # DTM forwarded the traceparent of the current span to each branch call
        assert span.kind == trace.SpanKind.SERVER
        # Right under the caller's span (Flask), or under the framework's own request span (FastAPI's).
        assert root.get_span_context().span_id in ancestors(span)
        assert span.attributes is not None
        assert (span.attributes["dtm.gid"], span.attributes["dtm.op"]) == (gid, "action")
        assert span.attributes["dtm.http_status"] == 200
    assert sorted(s.attributes["dtm.branch_id"] for s in handlers) == ["01", "02"]  # type: ignore[index]


@both
def test_a_tcc_try_carries_its_client_span_and_the_barrier_decision(
    flavour: Flavour, dtm: DtmFacade, spans: InMemorySpanExporter
) -> None:
    import redis
    from flask import Flask

    from dtmcli.barrier import BranchBarrier
    from dtmcli.contrib.flask import branch_handler

    services.require("redis")
    client = redis.Redis(**services.REDIS)
    key = f"tracing:{local_gid()}"
    client.set(key, 100)
    app = Flask("tcc")

    @app.post("/api/Try")
    @branch_handler
    def try_(info: Any) -> None:
        BranchBarrier.from_info(info).redis_check_adjust_amount(client, key, -30)

    @app.post("/api/Confirm")
    @branch_handler
    def confirm(info: Any) -> None:
        return None

    try:
        with serve_wsgi(app) as url:
            tcc_global = flavour.m.tcc_global_transaction

            def body(tcc: Any) -> Any:
                return tcc.call_branch({"n": 1}, f"{url}/api/Try", f"{url}/api/Confirm", "")

            with trace.get_tracer("shop").start_as_current_span("order"):
                if flavour.is_async:

                    async def run() -> None:
                        async with tcc_global(dtm.url) as tcc:
                            await body(tcc)

                    flavour.run(run())
                else:
                    with tcc_global(dtm.url) as tcc:
                        body(tcc)
        assert int(client.get(key) or 0) == 70
    finally:
        client.delete(key)
        client.close()
    names = by_name(spans.get_finished_spans())
    (client_try,) = [s for s in names["dtm branch tcc try"] if s.kind == trace.SpanKind.CLIENT]
    (server_try,) = [s for s in names["dtm branch tcc try"] if s.kind == trace.SpanKind.SERVER]
    assert server_try.parent is not None and server_try.parent.span_id == client_try.context.span_id
    (decision,) = server_try.events
    assert decision.name == "dtm.barrier" and decision.attributes == {"dtm.decision": "run", "dtm.barrier_id": "01"}
    assert {"dtm prepare", "dtm registerBranch", "dtm submit"} <= set(names)


def test_tracing_off_leaves_the_wire_alone(dtm: DtmFacade) -> None:
    """With no tracer provider configured nothing is added to branch_headers."""
    from dtmcli import Saga

    assert not _otel.enabled()
    body = Saga(dtm.url, "G").add("http://b/x", "", {}).build_body()
    assert "branch_headers" not in body
