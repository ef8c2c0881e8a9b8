"""--workers N with --metrics-port: one endpoint for all the workers, as Prometheus scrapes one port per pod.

Each worker serves its own metrics on a loopback port of its choosing and tells its supervisor which. The
supervisor serves --metrics-port: each scrape reads every worker's metrics and answers them all, every
sample labelled with its worker (worker="0", ...), so that sum() adds them up and per-worker gauges (queue
tokens, a broken model) stay apart. `nomic_embed_worker_up` says whose metrics came. No torch, no grpc here.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger("server.supervisor")

_SCRAPE_TIMEOUT_S = 2.0  # a hung worker must not hang the scrape of the others


class WorkerMetrics(Collector):
    """Every worker's metrics, read at each scrape from the ports the workers reported."""

    def __init__(self) -> None:
        self._ports: dict[int, int] = {}  # worker index -> its loopback metrics port
        self._lock = threading.Lock()  # the HTTP server's thread reads what the supervisor's thread adds

    def add(self, worker: int, port: int) -> None:
        with self._lock:
            self._ports[worker] = port

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            ports = sorted(self._ports.items())
        families: dict[str, Metric] = {}
        up = GaugeMetricFamily("nomic_embed_worker_up", "1 if the worker's metrics came with this scrape, else 0",
                               labels=["worker"])
        for worker, port in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=_SCRAPE_TIMEOUT_S) as reply:
                    text = reply.read().decode("utf-8")
            except OSError as exc:
                log.warning("worker %d's metrics did not come (127.0.0.1:%d): %s", worker, port, exc)
                up.add_metric([str(worker)], 0)
                continue
            up.add_metric([str(worker)], 1)
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                for sample in family.samples:
                    merged.add_sample(sample.name, {**sample.labels, "worker": str(worker)}, sample.value,
                                      sample.timestamp, sample.exemplar)
        yield up
        yield from families.values()


class WorkerMetricsServer:
    """The workers' metrics over HTTP on host:port (a daemon thread); raises OSError if the port is taken."""

    def __init__(self, host: str, port: int) -> None:
        self.workers = WorkerMetrics()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.workers)
        self._http, _ = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._http.server_port)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


__all__ = ["WorkerMetrics", "WorkerMetricsServer"]
