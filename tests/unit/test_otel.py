"""The OpenTelemetry hooks in isolation: off without a provider or without the package, one server span
per branch call even when an integration and the barrier decorator both handle it, the outcome recorded."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from dtmcli import DtmFailure, Saga, _otel
from dtmcli.branch import BranchInfo, handle

INFO = BranchInfo(gid="G1", trans_type="saga", branch_id="01", op="action")


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    yield exporter
    provider.shutdown()


def test_off_without_a_provider_or_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not _otel.enabled() and _otel.start("x") is None and _otel.trace_headers() == {}
    monkeypatch.setattr(_otel, "_trace", None)
    assert not _otel.enabled()
    assert handle(INFO, lambda: None).status == 200


def test_a_nested_handle_of_the_same_call_is_one_span(spans: InMemorySpanExporter) -> None:
    assert handle(INFO, lambda: handle(INFO, lambda: None).body).status == 200
    (span,) = spans.get_finished_spans()
    assert span.name == "dtm branch saga action" and span.kind == trace.SpanKind.SERVER
    assert span.attributes is not None and span.attributes["dtm.http_status"] == 200


def test_the_outcome_is_on_the_span(spans: InMemorySpanExporter) -> None:
    def fail() -> None:
        raise DtmFailure("no money")

    assert handle(INFO, fail).status == 409
    assert handle(INFO, lambda: 1 / 0).status == 500
    ok, failed = spans.get_finished_spans()
    assert ok.attributes is not None and ok.attributes["dtm.http_status"] == 409
    assert failed.status.status_code == trace.StatusCode.ERROR


def test_the_current_trace_goes_into_branch_headers_merged_with_the_users(spans: InMemorySpanExporter) -> None:
    saga = Saga("http://dtm.invalid/api/dtmsvr", "G", branch_headers={"X-Tenant": "a"}).add("http://b/x", "", {})
    assert saga.build_body()["branch_headers"] == {"X-Tenant": "a"}  # no current span: nothing added
    with trace.get_tracer("t").start_as_current_span("root") as root:
        headers = saga.build_body()["branch_headers"]
    assert headers["X-Tenant"] == "a"
    assert headers["traceparent"].split("-")[1] == format(root.get_span_context().trace_id, "032x")
    assert saga.options.branch_headers == {"X-Tenant": "a"}  # the options themselves are unchanged


def test_a_handler_span_nests_under_the_frameworks_own_span(spans: InMemorySpanExporter) -> None:
    other = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
    info = BranchInfo(gid="G1", trans_type="saga", branch_id="01", op="action", trace_context=other)
    with trace.get_tracer("framework").start_as_current_span("POST /api/x") as framework:
        handle(info, lambda: None)
    handler = next(s for s in spans.get_finished_spans() if s.name == "dtm branch saga action")
    assert handler.parent is not None and handler.parent.span_id == framework.get_span_context().span_id


def test_the_callers_own_traceparent_in_branch_headers_wins(spans: InMemorySpanExporter) -> None:
    own = "00-" + "3" * 32 + "-" + "4" * 16 + "-01"
    saga = Saga("http://dtm.invalid/api/dtmsvr", "G", branch_headers={"Traceparent": own}).add("http://b/x", "", {})
    with trace.get_tracer("t").start_as_current_span("root"):
        assert saga.build_body()["branch_headers"] == {"Traceparent": own}
