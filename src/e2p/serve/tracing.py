"""OpenTelemetry traces of requests, off by default (`e2p serve --otlp-endpoint URL` exports them over OTLP/HTTP).

A request's trace: the HTTP span (route template, method, status; never a user id), the store lookup of its user, and
for a generation the time it waited in the queue, its prefill (to the first token) and its decode (the rest). The
queue, prefill and decode happen in the batcher's thread: the request carries its span context (`GenRequest.trace`)
and the batcher records them afterwards with their real start and end times.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable


def otlp_provider(endpoint: str):
    """A TracerProvider exporting to an OTLP/HTTP collector at `endpoint` (e.g. http://127.0.0.1:4318/v1/traces)."""
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        from ..errors import ConfigError

        raise ConfigError(f"--otlp-endpoint needs OpenTelemetry ({exc}): pip install 'e2p[serve]'") from None
    provider = TracerProvider(resource=Resource.create({"service.name": "e2p"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider


class Tracing:
    """Spans for the server, or nothing at all (no provider): every method is then free."""

    def __init__(self, provider=None):
        self.tracer = provider.get_tracer("e2p.serve") if provider is not None else None
        self._wall_minus_monotonic = time.time_ns() - time.monotonic_ns()

    @property
    def on(self) -> bool:
        return self.tracer is not None

    def span(self, name: str, **attributes):
        """A span around a block, child of the current one (a no-op context when tracing is off)."""
        if self.tracer is None:
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(name, attributes=attributes or None)

    def recorder(self) -> Callable[[str, float, float], None] | None:
        """A function recording spans (name, monotonic start, monotonic end) under the current span, from any thread
        and afterwards; None when tracing is off."""
        if self.tracer is None:
            return None
        from opentelemetry import context

        parent, tracer, offset = context.get_current(), self.tracer, self._wall_minus_monotonic

        def record(name: str, start: float, end: float, **attributes) -> None:
            span = tracer.start_span(name, context=parent, start_time=int(start * 1e9) + offset,
                                     attributes=attributes or None)
            span.end(end_time=int(end * 1e9) + offset)

        return record
