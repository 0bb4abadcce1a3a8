"""OpenTelemetry tracing, through the OpenTelemetry API only (the optional extra ``otel``).

Nothing happens unless the ``opentelemetry-api`` package is installed *and* the application has
configured a tracer provider (the SDK): until then each hook costs one attribute check. Spans:

- ``dtm <path>`` (CLIENT) for every call to DTM, with gid, trans_type and the outcome;
- ``dtm branch <trans_type> <op>`` (CLIENT) for each branch call the client makes itself (TCC try,
  XA action, msg query_prepared), whose ``traceparent`` goes out with it;
- ``dtm branch <trans_type> <op>`` (SERVER) around each branch handler, continuing the trace found
  in the request's ``traceparent``/``tracestate``; the barrier adds its decision as an event.

The trace context current when a transaction is prepared or submitted is added to the body's
``branch_headers``, so DTM forwards it to every branch call it makes, retries included.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping, MutableMapping, Optional

try:  # pragma: no cover - exercised in the otel tests
    from opentelemetry import context as _context
    from opentelemetry import propagate as _propagate
    from opentelemetry import trace as _trace
    from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - the extra is not installed
    _trace = None  # type: ignore[assignment]

__all__ = ["enabled", "start", "finish", "inject", "trace_headers", "server_span", "event", "TRACE_HEADERS"]

TRACE_HEADERS = ("traceparent", "tracestate")
_TRACER_NAME = "dtmcli"


# get_tracer_provider() looks at os.environ on every call until a provider is set (about 0.6 µs):
# while the API's own global is still unset and no provider was named in the environment at start,
# tracing is off without asking it.
_FAST_OFF = (
    _trace is not None and hasattr(_trace, "_TRACER_PROVIDER") and "OTEL_PYTHON_TRACER_PROVIDER" not in os.environ
)


def enabled() -> bool:
    """Whether an application tracer provider is configured (else every hook is a no-op)."""
    if _trace is None:
        return False
    if _FAST_OFF and _trace._TRACER_PROVIDER is None:
        return False
    return not isinstance(_trace.get_tracer_provider(), (ProxyTracerProvider, NoOpTracerProvider))


def _attributes(**attrs: Optional[str]) -> dict[str, str]:
    return {f"dtm.{k}": v for k, v in attrs.items() if v}


def start(name: str, *, server: bool = False, parent: Any = None, **attrs: Optional[str]) -> Any:
    """Start a span (not made current) when tracing is enabled; ``None`` otherwise."""
    if not enabled():
        return None
    kind = SpanKind.SERVER if server else SpanKind.CLIENT
    tracer = _trace.get_tracer(_TRACER_NAME)
    return tracer.start_span(name, context=parent, kind=kind, attributes=_attributes(**attrs))


def finish(span: Any, error: Optional[BaseException] = None, **attrs: Optional[str]) -> None:
    """End ``span`` (``None`` is ignored), recording ``error`` and the outcome attributes."""
    if span is None:
        return
    for key, value in _attributes(**attrs).items():
        span.set_attribute(key, value)
    if error is not None:
        span.set_attribute("dtm.outcome", type(error).__name__)
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, str(error)[:200]))
    span.end()


def inject(span: Any, headers: MutableMapping[str, str]) -> None:
    """Add the W3C trace context of ``span`` to outgoing ``headers``."""
    if span is not None:
        _propagate.inject(headers, context=_trace.set_span_in_context(span))


def trace_headers() -> dict[str, str]:
    """The W3C trace context of the current span (empty when there is none or tracing is off)."""
    if not enabled():
        return {}
    carrier: dict[str, str] = {}
    _propagate.inject(carrier)
    return {k: v for k, v in carrier.items() if k in TRACE_HEADERS}


def headers_of(request: Any) -> Optional[dict[str, str]]:
    """The trace headers of a Flask, Starlette/FastAPI or Django request (``None`` when tracing is off)."""
    if not enabled():
        return None
    found: dict[str, str] = {}
    headers = getattr(request, "headers", None)
    meta = getattr(request, "META", None)
    for name in TRACE_HEADERS:
        value = None
        if headers is not None and hasattr(headers, "get"):
            value = headers.get(name)
        if value is None and isinstance(meta, Mapping):
            value = meta.get(f"HTTP_{name.upper()}")
        if isinstance(value, str):
            found[name] = value
    return found


@contextlib.contextmanager
def server_span(info: Any, headers: Optional[Mapping[str, str]]) -> Iterator[Any]:
    """A current SERVER span around a branch handler, continuing the caller's trace."""
    if not enabled():
        yield None
        return
    # A framework's own instrumentation may have started the request's span already: nest under it.
    current = _trace.get_current_span().get_span_context()
    parent = None if current.is_valid else _propagate.extract(dict(headers or {}))
    span = start(
        f"dtm branch {info.trans_type} {info.op}", server=True, parent=parent,
        gid=info.gid, trans_type=info.trans_type, branch_id=info.branch_id, op=info.op,
    )
    token = _context.attach(_trace.set_span_in_context(span))
    try:
        yield span
    except BaseException as exc:
        _context.detach(token)
        finish(span, exc)
        raise
    _context.detach(token)
    span.end()


def outcome(status: int) -> None:
    """Record a branch handler's HTTP answer on the current span."""
    if enabled():
        span = _trace.get_current_span()
        span.set_attribute("dtm.http_status", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))


def event(name: str, **attrs: Optional[str]) -> None:
    """Add an event (e.g. the barrier's decision) to the current span."""
    if enabled():
        _trace.get_current_span().add_event(name, _attributes(**attrs))
