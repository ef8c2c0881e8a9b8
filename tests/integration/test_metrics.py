"""Prometheus metrics over HTTP reflect what the server did."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from tools.servers import running_server, scrape_metrics


def test_metrics_count_requests_batches_and_tokens(tiny_original: Path) -> None:
    with running_server(str(tiny_original), metrics_port=0) as srv:
        port = srv.app.metrics_port
        assert port
        stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())
        tokens = 0
        for n in (1, 3):
            reply = stub.Embed(pb.EmbedRequest(texts=["metrics text"] * n, task=pb.TASK_CLUSTERING), timeout=10)
            tokens += reply.metadata.total_tokens
        with pytest.raises(grpc.RpcError):
            stub.Embed(pb.EmbedRequest(texts=["x"]), timeout=10)
        stub.Info(pb.InfoRequest(), timeout=10)
        m = scrape_metrics(port)
    assert m[("nomic_embed_requests_total", (("code", "OK"), ("method", "Embed")))] == 2
    assert m[("nomic_embed_requests_total", (("code", "INVALID_ARGUMENT"), ("method", "Embed")))] == 1
    assert m[("nomic_embed_requests_total", (("code", "OK"), ("method", "Info")))] == 1
    assert m[("nomic_embed_tokens_total", ())] == tokens
    assert m[("nomic_embed_queue_duration_seconds_count", ())] == 2
    assert m[("nomic_embed_batch_rows_sum", ())] >= 4  # warm-up runs outside the batcher's queue
    assert m[("nomic_embed_batch_padding_ratio_count", ())] >= 1
    assert m[("nomic_embed_queue_tokens", ())] == 0
    assert m[("nomic_embed_requests_in_flight", ())] == 0
    info = [labels for (name, labels) in m if name == "nomic_embed_model_info"]
    assert info and ("variant", "fp32") in info[0] and ("device", "cpu") in info[0]
