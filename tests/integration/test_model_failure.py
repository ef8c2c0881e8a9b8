"""A batch the model fails on fails its requests INTERNAL; when the warm-up texts then fail too, the model is broken
and health goes NOT_SERVING, while a failure on one input alone leaves the server in service."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.errors import OutOfMemory
from tools.servers import RunningServer, running_server


def _health(srv: RunningServer) -> int:
    return health_pb2_grpc.HealthStub(srv.channel()).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _broken(srv: RunningServer) -> float | None:
    return srv.app.metrics.registry.get_sample_value("nomic_embed_model_broken")


def _embed(srv: RunningServer, text: str) -> pb.EmbedResponse:
    stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())
    return stub.Embed(pb.EmbedRequest(texts=[text], task=pb.TASK_CLUSTERING), timeout=30)


def test_a_failure_on_one_input_leaves_the_server_in_service(tiny_original: Path) -> None:
    with running_server(str(tiny_original)) as srv:
        assert srv.app.loaded is not None
        runner = srv.app.loaded.runner
        model = runner.run
        (poison,) = srv.app.loaded.embedder.tokenizer.content_ids(["zebra"], "")[0]

        def fails_on_poison(rows: Sequence[Sequence[int]]) -> np.ndarray:
            if any(poison in row for row in rows):
                raise RuntimeError("an input this model cannot take")
            return model(rows)

        runner.run = fails_on_poison  # type: ignore[method-assign]
        with pytest.raises(grpc.RpcError) as info:
            _embed(srv, "a zebra")
        assert info.value.code() == grpc.StatusCode.INTERNAL and "cannot take" in info.value.details()
        assert _embed(srv, "a horse").embeddings[0].values
        assert _health(srv) == health_pb2.HealthCheckResponse.SERVING and _broken(srv) == 0


def test_a_model_that_fails_the_warm_up_texts_too_is_taken_out_of_service(tiny_original: Path) -> None:
    with running_server(str(tiny_original)) as srv:
        assert srv.app.loaded is not None

        def device_lost(rows: Sequence[Sequence[int]]) -> np.ndarray:
            raise RuntimeError("the device is gone")

        srv.app.loaded.runner.run = device_lost  # type: ignore[method-assign]
        with pytest.raises(grpc.RpcError) as info:
            _embed(srv, "any text")
        assert info.value.code() == grpc.StatusCode.INTERNAL and "the device is gone" in info.value.details()
        for _ in range(100):  # health is set on the event loop just after the answer
            if _health(srv) == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            time.sleep(0.02)
        assert _health(srv) == health_pb2.HealthCheckResponse.NOT_SERVING and _broken(srv) == 1


def test_a_warm_up_check_short_of_memory_does_not_take_the_model_out_of_service(tiny_original: Path) -> None:
    with running_server(str(tiny_original)) as srv:
        assert srv.app.loaded is not None
        runner = srv.app.loaded.runner
        model, probe = runner.run, srv.app.loaded.batcher._worker.probe

        def failing(rows: Sequence[Sequence[int]]) -> np.ndarray:
            if [list(r) for r in rows] == probe:  # the warm-up rows, run as the health check
                raise OutOfMemory("out of memory computing the warm-up rows")
            if len(rows) == 1:
                raise RuntimeError("a kernel failed on this batch")
            return model(rows)

        runner.run = failing  # type: ignore[method-assign]
        with pytest.raises(grpc.RpcError) as info:
            _embed(srv, "any text")
        assert info.value.code() == grpc.StatusCode.INTERNAL
        time.sleep(0.2)
        assert _health(srv) == health_pb2.HealthCheckResponse.SERVING and _broken(srv) == 0
