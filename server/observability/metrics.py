"""Prometheus metrics: what the server does, in base units, scraped over HTTP (--metrics-port)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from server.domain import EmbedResult
from server.engine.batcher import BatchStats, NonFiniteEvent, OutOfMemoryEvent

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_POWERS = tuple(float(2**i) for i in range(0, 18))


class Metrics:
    """The server's metrics on a registry of their own (several servers can live in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter("nomic_embed_requests", "RPCs answered, by method and gRPC status code",
                                ["method", "code"], registry=r)
        self.request_seconds = Histogram("nomic_embed_request_duration_seconds", "Time from arrival to answer",
                                         ["method"], buckets=_LATENCY, registry=r)
        self.in_flight = Gauge("nomic_embed_requests_in_flight", "RPCs being handled", registry=r)
        self.queue_seconds = Histogram("nomic_embed_queue_duration_seconds",
                                       "Time an embed request waited for the model", buckets=_LATENCY, registry=r)
        self.inference_seconds = Histogram("nomic_embed_inference_duration_seconds",
                                           "Time the model computed for an embed request", buckets=_LATENCY,
                                           registry=r)
        self.tokens = Counter("nomic_embed_tokens", "Tokens embedded", registry=r)
        self.batch_rows = Histogram("nomic_embed_batch_rows", "Rows per model batch", buckets=_POWERS, registry=r)
        self.batch_tokens = Histogram("nomic_embed_batch_tokens", "Real (unpadded) tokens per model batch",
                                      buckets=_POWERS, registry=r)
        self.batch_padding = Histogram("nomic_embed_batch_padding_ratio",
                                       "Fraction of a batch's padded tokens that are padding",
                                       buckets=(0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0), registry=r)
        self.batch_seconds = Histogram("nomic_embed_batch_duration_seconds", "Model time per batch",
                                       buckets=_LATENCY, registry=r)
        self.oom_splits = Counter("nomic_embed_batch_oom_splits",
                                  "Model batches split in two after the device ran out of memory", registry=r)
        self.batch_budget = Gauge("nomic_embed_batch_token_budget",
                                  "Padded tokens a model batch may hold now (lowered after out-of-memory)",
                                  registry=r)
        self.non_finite = Counter("nomic_embed_non_finite_vectors",
                                  "Vectors with NaN, infinity or no direction the model gave (never returned; "
                                  "their requests failed INTERNAL)", registry=r)
        self.model_broken = Gauge("nomic_embed_model_broken",
                                  "1 while the model is broken: after a batch failed or gave non-finite vectors, "
                                  "the warm-up texts did too (health NOT_SERVING until they pass again)",
                                  registry=r)
        self.queue_tokens = Gauge("nomic_embed_queue_tokens", "Tokens admitted and not yet computed", registry=r)
        self.queue_callers = Gauge("nomic_embed_queue_callers",
                                   "Connections with tokens queued (each batch starts from one's own rows, "
                                   "in turn)", registry=r)
        self.model = Info("nomic_embed_model", "The model served, its variant and device", registry=r)

    def describe_model(self, *, model_id: str, variant: str, device: str, reason: str) -> None:
        self.model.info({"model": model_id, "variant": variant, "device": device, "variant_reason": reason})

    def observe_batch(self, stats: BatchStats) -> None:
        self.batch_rows.observe(stats.rows)
        self.batch_tokens.observe(stats.tokens)
        self.batch_padding.observe(1 - stats.tokens / stats.padded_tokens if stats.padded_tokens else 0.0)
        self.batch_seconds.observe(stats.seconds)

    def observe_out_of_memory(self, event: OutOfMemoryEvent) -> None:
        self.oom_splits.inc()
        self.batch_budget.set(event.budget_tokens)

    def observe_non_finite(self, event: NonFiniteEvent) -> None:
        self.non_finite.inc(event.rows)

    def observe_result(self, result: EmbedResult) -> None:
        self.queue_seconds.observe(result.timings.queue_s)
        self.inference_seconds.observe(result.timings.inference_s)
        self.tokens.inc(result.total_tokens)

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP (a daemon thread); returns the bound port."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
