"""Counting RPCs into the server's Prometheus metrics, by method and final status code."""

from __future__ import annotations

import time

import grpc

from server.observability.metrics import Metrics
from server.transport.rpc_hooks import Begin, End, HookInterceptor, final_code


class MetricsInterceptor(HookInterceptor):
    """Counts unary and bidirectional-streaming RPCs by method and final status code; times unary ones."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def hooks(self, details: grpc.HandlerCallDetails, handler: grpc.RpcMethodHandler) -> tuple[Begin, End]:
        method = details.method.rsplit("/", 1)[-1]
        m = self.metrics
        timed = handler.unary_unary is not None

        def begin(context: grpc.aio.ServicerContext) -> float:
            m.in_flight.inc()
            return time.monotonic()

        def end(context: grpc.aio.ServicerContext, started: float, ok: bool) -> None:
            m.in_flight.dec()
            m.requests.labels(method, final_code(context, ok)).inc()
            if timed:
                m.request_seconds.labels(method).observe(time.monotonic() - started)

        return begin, end
