"""Prometheus metrics over HTTP reflect what the server did."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
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


def test_calls_that_end_while_computed_are_counted_by_how_they_ended(tiny_original: Path) -> None:
    with running_server(str(tiny_original), metrics_port=0) as srv:
        assert srv.app.loaded is not None and srv.app.metrics_port
        runner = srv.app.loaded.runner
        model, entered, gate = runner.run, threading.Event(), threading.Event()

        def held(rows: Sequence[Sequence[int]]) -> np.ndarray:
            entered.set()
            assert gate.wait(30)
            return model(rows)

        runner.run = held  # type: ignore[method-assign]
        stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())
        try:
            cancelled = stub.Embed.future(pb.EmbedRequest(texts=["the caller gives up"], task=pb.TASK_CLUSTERING),
                                          timeout=30)
            assert entered.wait(10)
            cancelled.cancel()
            with pytest.raises(grpc.RpcError) as late:
                stub.Embed(pb.EmbedRequest(texts=["the deadline passes"], task=pb.TASK_CLUSTERING), timeout=0.5)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            gate.set()
        codes = _codes_once_counted(srv.app.metrics_port, "Embed", 2)
    assert codes == {"CANCELLED": 1, "DEADLINE_EXCEEDED": 1}


def _codes_once_counted(port: int, method: str, calls: int) -> dict[str, float]:
    """`method`'s calls by status code, once `calls` of them are counted (a call is counted as it ends), or
    after 10 s."""
    codes: dict[str, float] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum(codes.values()) < calls:
        time.sleep(0.05)
        codes = {dict(labels)["code"]: value for (name, labels), value in scrape_metrics(port).items()
                 if name == "nomic_embed_requests_total" and dict(labels).get("method") == method}
    return codes


def test_streams_the_caller_cancels_are_counted_cancelled(tiny_original: Path) -> None:
    """A caller cancelling between replies ends the call while the handler waits or while gRPC sends a reply:
    either way it is CANCELLED, never UNKNOWN."""
    with running_server(str(tiny_original), metrics_port=0) as srv:
        assert srv.app.metrics_port
        stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())

        def cancel_after(replies: int) -> int:
            cancelled = threading.Event()

            def messages() -> Iterator[pb.EmbedStreamRequest]:
                for i in range(50):
                    yield pb.EmbedStreamRequest(id=str(i), request=pb.EmbedRequest(
                        texts=["cancelled " * (1 + i % 7)], task=pb.TASK_CLUSTERING))
                # The stream stays open until the cancel: a half-close could let the server answer all 50
                # and end OK before the caller has read `replies` of them.
                cancelled.wait(60)

            call = stub.EmbedStream(messages(), timeout=60)
            try:
                for seen, _ in enumerate(call, start=1):
                    if seen == replies:
                        call.cancel()
                        return seen
                return 0
            finally:
                cancelled.set()

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(cancel_after, [1, 3, 9] * 8)) == [1, 3, 9] * 8
        codes = _codes_once_counted(srv.app.metrics_port, "EmbedStream", 24)
    assert codes == {"CANCELLED": 24}

