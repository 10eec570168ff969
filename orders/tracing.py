"""OpenTelemetry spans, exported over OTLP/HTTP when an OTLP endpoint is configured.

Set OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT; the other standard OTEL_*
variables apply too) and install the `otel` extra. Without them nothing of OpenTelemetry is imported,
and `span` only derives a child traceparent, so trace context is still propagated and logged.

Every gRPC call is a server span, child of the caller's `traceparent`; the command service hands its
span's traceparent to the events it writes, and the projector records each applied event as a consumer
span, child of the command's span. Logs carry the same traceparent, so log lines and spans line up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from orders.correlation import child_traceparent

log = logging.getLogger(__name__)

_tracer: Any = None
_provider: Any = None


def setup(service_name: str) -> None:
    """Start exporting spans when an OTLP endpoint is configured; otherwise do nothing."""
    global _tracer, _provider
    if not (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        return
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("an OTLP endpoint is set but OpenTelemetry is not installed (pip install 'orders-cqrs[otel]')")
        return
    _provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    _provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _tracer = _provider.get_tracer("orders")
    log.info("exporting OpenTelemetry spans over OTLP/HTTP as %s", service_name)


def enabled() -> bool:
    return _tracer is not None


def shutdown() -> None:
    """Flush the spans not yet exported (at process exit)."""
    if _provider is not None:
        _provider.shutdown()


@contextlib.contextmanager
def span(name: str, parent: str | None, *, consumer: bool = False, started_ns: int | None = None) -> Iterator[str]:
    """A span for work done on behalf of the parent traceparent; yields this span's own traceparent.

    The span is not made "current" (no context attach), so it can wrap async generators safely.
    """
    if _tracer is None:
        yield child_traceparent(parent)
        return
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    context = TraceContextTextMapPropagator().extract({"traceparent": parent} if parent else {})
    kind = trace.SpanKind.CONSUMER if consumer else trace.SpanKind.SERVER
    current = _tracer.start_span(name, context=context, kind=kind, start_time=started_ns or time.time_ns())
    own = current.get_span_context()
    try:
        yield f"00-{own.trace_id:032x}-{own.span_id:016x}-{int(own.trace_flags):02x}"
    except BaseException as exc:
        current.record_exception(exc)
        current.set_status(trace.Status(trace.StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        current.end()
