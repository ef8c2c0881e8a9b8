"""Connections take turns in the queue: a caller with a backlog holds a caller on another connection back by one
batch, not by the whole backlog."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from loadtest.driver import OWN_CONNECTION
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from tools.servers import running_server, scrape_metrics

FLOOD = pb.EmbedRequest(texts=["a backlog of long texts sent by one busy caller " * 3], task=pb.TASK_CLUSTERING)
POLITE = pb.EmbedRequest(texts=["hello"], task=pb.TASK_CLUSTERING)


def test_a_caller_on_another_connection_goes_ahead_of_a_backlog(tiny_original: Path) -> None:
    with running_server(str(tiny_original), max_batch_rows=1, metrics_port=0) as srv:
        assert srv.app.loaded is not None
        runner = srv.app.loaded.runner
        model, entered, gate = runner.run, threading.Event(), threading.Event()
        batches: list[list[int]] = []

        def held(rows: Sequence[Sequence[int]]) -> np.ndarray:
            batches.append([len(r) for r in rows])
            entered.set()
            assert gate.wait(30)
            return model(rows)

        runner.run = held  # type: ignore[method-assign]
        busy = grpc.insecure_channel(srv.target, options=OWN_CONNECTION)
        polite = grpc.insecure_channel(srv.target, options=OWN_CONNECTION)
        try:
            flood = embed_pb2_grpc.EmbedServiceStub(busy)
            calls = [flood.Embed.future(FLOOD, timeout=30)]
            assert entered.wait(10)  # the first is on the model; the next five queue behind it
            calls += [flood.Embed.future(FLOOD, timeout=30) for _ in range(5)]
            srv.wait_pending(6)
            calls.append(embed_pb2_grpc.EmbedServiceStub(polite).Embed.future(POLITE, timeout=30))
            srv.wait_pending(7)
            assert scrape_metrics(srv.app.metrics_port)[("nomic_embed_queue_callers", ())] == 2
        finally:
            gate.set()
        replies = [call.result() for call in calls]
        assert scrape_metrics(srv.app.metrics_port)[("nomic_embed_queue_callers", ())] == 0
        busy.close()
        polite.close()
    flood_tokens, polite_tokens = replies[0].metadata.total_tokens, replies[-1].metadata.total_tokens
    assert flood_tokens > polite_tokens
    assert batches == [[flood_tokens], [polite_tokens]] + [[flood_tokens]] * 5
