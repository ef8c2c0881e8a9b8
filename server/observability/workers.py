"""--workers N with --metrics-port: one endpoint for all the workers, as Prometheus scrapes one port per pod.

Each worker serves its own metrics on a loopback port of its choosing and tells its supervisor which. The
supervisor serves --metrics-port: each scrape reads every worker's metrics at once and answers them all,
every sample labelled with its worker (worker="0", ...), so that sum() adds them up and per-worker gauges
(queue tokens, a broken model) stay apart. `nomic_embed_worker_up` says whose metrics came. No torch, no
grpc here.
"""

from __future__ import annotations

import http.client
import logging
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

log = logging.getLogger("server.supervisor")

_SCRAPE_TIMEOUT_S = 2.0  # per worker, all read at once: a hung worker must not hang the scrape of the others
# OpenMetrics keeps each counter's _created and each info metric in their own families, through the round trip.
_ACCEPT = "application/openmetrics-text; version=1.0.0"
# Loopback needs no proxy, whatever http_proxy the environment names.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class WorkerMetrics(Collector):
    """Every worker's metrics, read at each scrape from the ports the workers reported."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._ports: dict[int, int] = {}  # worker index -> its loopback metrics port, once it reported it
        self._down: set[int] = set()  # workers whose metrics did not come last time, each logged once
        self._lock = threading.Lock()  # scrapes run on the HTTP server's threads, reports on the supervisor's
        # Each scrape reads every worker at once; a few scrapes at a time (Prometheus servers in HA pairs).
        self._pool = ThreadPoolExecutor(max_workers=4 * workers, thread_name_prefix="worker-metrics")

    def add(self, worker: int, port: int) -> None:
        with self._lock:
            self._ports[worker] = port

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            ports = dict(self._ports)
        read = dict(zip(ports, self._pool.map(_read, ports.values()), strict=True))
        up = GaugeMetricFamily("nomic_embed_worker_up", "1 if the worker's metrics came with this scrape, else 0 "
                               "(not started yet, stopped, or hung)", labels=["worker"])
        families: dict[str, Metric] = {}
        for worker in range(self._workers):
            parsed = read.get(worker)  # None: the worker has not reported its port yet
            self._note(worker, ports.get(worker), parsed)
            up.add_metric([str(worker)], 0 if parsed is None or isinstance(parsed, Exception) else 1)
            if isinstance(parsed, list):
                for family in parsed:
                    merged = families.setdefault(family.name, Metric(family.name, family.documentation,
                                                                     family.type, family.unit))
                    for sample in family.samples:
                        merged.add_sample(sample.name, _labelled(sample.labels, worker), sample.value,
                                          sample.timestamp, sample.exemplar)
        yield up
        yield from families.values()

    def _note(self, worker: int, port: int | None, parsed: list[Metric] | Exception | None) -> None:
        """Log a worker's metrics going missing, and coming back, once each time."""
        with self._lock:
            if isinstance(parsed, Exception) and worker not in self._down:
                self._down.add(worker)
                log.warning("worker %d's metrics did not come (127.0.0.1:%s): %s", worker, port, parsed)
            elif isinstance(parsed, list) and worker in self._down:
                self._down.discard(worker)
                log.info("worker %d's metrics came again", worker)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _labelled(labels: dict[str, str], worker: int) -> dict[str, str]:
    """The sample's labels and its worker's; a `worker` label of its own becomes `exported_worker`, as
    Prometheus renames a target's label that clashes with one it attaches."""
    own = {("exported_worker" if name == "worker" else name): value for name, value in labels.items()}
    return {**own, "worker": str(worker)}


def _read(port: int) -> list[Metric] | Exception:
    """The worker's metrics, read in the OpenMetrics text format, or why they did not come."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": _ACCEPT})
    try:
        with _OPENER.open(request, timeout=_SCRAPE_TIMEOUT_S) as reply:
            return list(text_string_to_metric_families(reply.read().decode("utf-8")))
    except (OSError, ValueError, http.client.HTTPException) as exc:  # refused, timed out, cut short, unparsable
        return exc


class WorkerMetricsServer:
    """The workers' metrics over HTTP on host:port (a daemon thread); raises OSError if the port is taken."""

    def __init__(self, host: str, port: int, workers: int) -> None:
        self.workers = WorkerMetrics(workers)
        # The workers' metric names are known only once they are read: a collector without names is still
        # collected, and filtered by name when a scrape asks (?name[]=...).
        registry = CollectorRegistry(support_collectors_without_names=True)
        registry.register(self.workers)
        self._http, _ = start_http_server(port, addr=host, registry=registry)
        self.port = int(self._http.server_port)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self.workers.close()


__all__ = ["WorkerMetrics", "WorkerMetricsServer"]
