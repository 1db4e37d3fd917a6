"""Host code. OpenTelemetry spans that continue each node's trace, when the SDK is installed.

Every event carries a W3C trace id (16 bytes) and span id (8 bytes) made on the node. The
gateway's span for processing it is a child of that node span: same trace id, parent span id
= the event's span id, so a trace viewer shows node -> gateway as one trace.

    tracer = EventTracer()                      # disabled, at no cost, without opentelemetry-sdk
    with tracer.event_span(ev, machine=m.key):  # yields the span, or None when disabled
        ...

OpenTelemetry is optional (the `dev` extra installs it) and imported lazily, only here and only
when an EventTracer is made. Spans go to the tracer provider given, or else to the global
one: exporting them (OTLP, console) is configured by the operator the usual OpenTelemetry way.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from edgeline.host.wire import Event

log = logging.getLogger("edgeline.tracing")

SPAN_NAME = "edgeline.gateway.process"


class EventTracer:
    """:param provider: an OpenTelemetry TracerProvider; None = the global one.
    :param enabled: False turns tracing off even when the SDK is installed."""

    def __init__(self, provider: Any | None = None, *, enabled: bool = True) -> None:
        self._tracer: Any = None
        self._otel: Any = None
        if not enabled:
            return
        try:
            import opentelemetry.sdk.trace  # noqa: F401  (the SDK is what makes spans real)
            from opentelemetry import trace
        except ImportError:
            log.debug("opentelemetry-sdk is not installed: no spans")
            return
        self._otel = trace
        self._tracer = (provider or trace.get_tracer_provider()).get_tracer("edgeline.gateway")

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @contextlib.contextmanager
    def event_span(self, ev: Event, machine: str | None = None, name: str = SPAN_NAME) -> Iterator[Any]:
        """A CONSUMER span for processing `ev`, child of the node's span; None when disabled."""
        if self._tracer is None:
            yield None
            return
        trace = self._otel
        parent = trace.SpanContext(
            trace_id=int.from_bytes(ev.trace_id, "big"),
            span_id=int.from_bytes(ev.span_id, "big"),
            is_remote=True,
            trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        )
        attributes: dict[str, Any] = {
            "messaging.system": "mqtt",
            "edgeline.node": ev.node,
            "edgeline.boot": ev.boot,
            "edgeline.seq": ev.seq,
            "edgeline.anomaly": ev.anomaly,
        }
        if machine:
            attributes["edgeline.machine"] = machine
        ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        with self._tracer.start_as_current_span(
            name, context=ctx, kind=trace.SpanKind.CONSUMER, attributes=attributes
        ) as span:
            yield span
