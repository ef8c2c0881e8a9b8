"""The supervisor's view of its workers' metrics (server.observability.workers), against real HTTP servers."""

from __future__ import annotations

import http.server
import socket
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from server.observability.metrics import Metrics
from server.observability.workers import WorkerMetricsServer


@contextmanager
def _serving(answer: bytes, declared_length: int | None = None) -> Iterator[int]:
    """An HTTP server on a loopback port that answers every GET with `answer` (cut short when it declares a
    longer length), like a worker's metrics endpoint."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
            self.send_header("Content-Length", str(declared_length or len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _worker_exposition() -> bytes:
    """What a worker serves: the server's own metrics, a request answered, in OpenMetrics."""
    metrics = Metrics(CollectorRegistry())
    metrics.requests.labels(method="Embed", code="OK").inc(3)
    metrics.describe_model(model_id="m", variant="fp32", device="cpu", reason="r")
    Gauge("own_worker_label", "a metric with a worker label of its own", ["worker"],
          registry=metrics.registry).labels(worker="w").set(1)
    return generate_openmetrics(metrics.registry)


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _scrape(port: int, query: str = "", openmetrics: bool = False) -> str:
    accept = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(urllib.request.Request(f"http://127.0.0.1:{port}/metrics{query}", headers=accept)) as reply:
        return reply.read().decode()


def test_every_worker_is_labelled_and_the_broken_ones_are_down(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{_unused_port()}")  # loopback goes direct regardless
    exposition = _worker_exposition()
    with _serving(exposition) as good, _serving(exposition[:200], declared_length=len(exposition)) as cut:
        server = WorkerMetricsServer("127.0.0.1", 0, workers=4)  # worker 3 has not reported yet
        try:
            server.workers.add(0, good)
            server.workers.add(1, cut)  # killed while answering
            server.workers.add(2, _unused_port())  # gone
            # The answer parses strictly, in both formats Prometheus asks for.
            families = {f.name: f for f in text_string_to_metric_families(_scrape(server.port, openmetrics=True))}
            text = _scrape(server.port)
            only_up = _scrape(server.port, "?name[]=nomic_embed_worker_up")
        finally:
            server.close()
    up = {s.labels["worker"]: s.value for s in families["nomic_embed_worker_up"].samples}
    assert up == {"0": 1.0, "1": 0.0, "2": 0.0, "3": 0.0}
    requests = families["nomic_embed_requests"]
    assert requests.type == "counter" and {(s.name, s.labels["worker"]) for s in requests.samples} == {
        ("nomic_embed_requests_total", "0"), ("nomic_embed_requests_created", "0")}
    assert families["nomic_embed_model"].type == "info"
    assert 'nomic_embed_requests_total{code="OK",method="Embed",worker="0"} 3.0' in text
    assert "nomic_embed_worker_up{" in only_up and "nomic_embed_requests" not in only_up  # as ?name[]= asks
    assert 'own_worker_label{exported_worker="w",worker="0"} 1.0' in text  # its own label kept, renamed
