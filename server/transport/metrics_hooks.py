"""Counting RPCs into the server's Prometheus metrics, by method and final status code."""

from __future__ import annotations

import time

import grpc
from prometheus_client import Counter

from server.observability.metrics import Metrics
from server.transport.rpc_hooks import Begin, End, final_code


class MetricsHooks:
    """Counts unary and bidirectional-streaming RPCs by method and final status code; times unary ones."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def hooks(self, method: str, handler: grpc.RpcMethodHandler) -> tuple[Begin, End]:
        name = method.rsplit("/", 1)[-1]
        m = self.metrics
        seconds = m.request_seconds.labels(name) if handler.unary_unary is not None else None
        counters: dict[str, Counter] = {}  # by final code: a label lookup per call costs a lock and a hash

        def begin(context: grpc.aio.ServicerContext) -> float:
            m.in_flight.inc()
            return time.monotonic()

        def end(context: grpc.aio.ServicerContext, started: float, ok: bool) -> None:
            m.in_flight.dec()
            code = final_code(context, ok)
            counter = counters.get(code)
            if counter is None:
                counter = counters[code] = m.requests.labels(name, code)
            counter.inc()
            if seconds is not None:
                seconds.observe(time.monotonic() - started)

        return begin, end
