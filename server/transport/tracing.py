"""OpenTelemetry tracing, on when an OTLP endpoint is configured: a span per RPC, a child span per embed.

OpenTelemetry is imported here only when a `Tracing` is made: a server without tracing loads none of it.
The RPC spans come from opentelemetry-instrumentation-grpc's aio server interceptor, which continues the
caller's trace (W3C `traceparent` metadata). Spans go to the endpoint over OTLP/gRPC in batches, from a
thread of the SDK's; the standard OTEL_* variables (sampler, headers, resource attributes, batch sizes)
apply. Install with `pip install 'nomic-embed-grpc[tracing]'`.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from server.domain import EmbedResult
from server.errors import StartupError
from server.observability.logs import REQUEST_ID

SERVICE = "nomic-embed-grpc"
EMBED_SPAN = "nomic_embed.embed"


class Tracing:
    """One tracer provider of the server's own (several servers can live in one process)."""

    def __init__(self, endpoint: str, version: str) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
            from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, OTELResourceDetector, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise StartupError(f"tracing needs the [tracing] extra (pip install 'nomic-embed-grpc[tracing]'): "
                               f"{exc}") from None
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override these defaults.
        resource = Resource.create({SERVICE_NAME: SERVICE, SERVICE_VERSION: version}).merge(
            OTELResourceDetector().detect())
        self._provider = TracerProvider(resource=resource)
        # http://host:4317 is plaintext, https:// is TLS (the exporter's own rule).
        self._provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self._tracer = self._provider.get_tracer("server.transport.tracing", version)
        # Health checks (probes every few seconds) would drown the spans that matter.
        self._interceptor = aio_server_interceptor(tracer_provider=self._provider,
                                                   filter_=filters.negate(filters.health_check()))

    @property
    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """Opens the RPC span: it must come first, so that every other interceptor runs inside it."""
        return self._interceptor

    def observe_result(self, variant: str, result: EmbedResult) -> None:
        """A child span of the current RPC covering one embed, from arrival to result (called right after)."""
        end = time.time_ns()
        t = result.timings
        attributes: dict[str, Any] = {
            "embed.variant": variant,
            "embed.texts": len(result.embeddings),
            "embed.tokens": result.total_tokens,
            "embed.queue_ms": t.queue_s * 1000,
            "embed.inference_ms": t.inference_s * 1000,
        }
        request_id = REQUEST_ID.get()
        if request_id is not None:
            attributes["embed.request_id"] = request_id
        span = self._tracer.start_span(EMBED_SPAN, start_time=end - int(t.total_s * 1e9), attributes=attributes)
        span.end(end_time=end)

    def shutdown(self) -> None:
        """Export what is left and stop (blocks up to the exporter's timeout)."""
        self._provider.shutdown()
