"""A batch the model fails on fails its requests INTERNAL; when the warm-up texts then fail too, the model is broken
and health goes NOT_SERVING until they pass again, while a failure on one input alone leaves the server in service."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.errors import OutOfMemory
from tools.servers import RunningServer, running_server

Run = Callable[[Sequence[Sequence[int]]], np.ndarray]
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@contextmanager
def _served(path: Path, failing: Callable[[Run, list[list[int]]], Run]) -> Iterator[RunningServer]:
    """A server whose model runs as `failing(model, warm_up_rows)` says, once it is SERVING."""
    with running_server(str(path)) as srv:
        assert srv.app.loaded is not None
        runner = srv.app.loaded.runner
        probe = srv.app.loaded.batcher._worker.probe
        assert probe is not None
        runner.run = failing(runner.run, probe)  # type: ignore[method-assign]
        yield srv


def _health(srv: RunningServer) -> int:
    return health_pb2_grpc.HealthStub(srv.channel()).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _wait_for(srv: RunningServer, state: int) -> None:
    for _ in range(100):  # health is set on the event loop just after the answer
        if _health(srv) == state:
            return
        time.sleep(0.02)
    assert _health(srv) == state


def _broken(srv: RunningServer) -> float | None:
    return srv.app.metrics.registry.get_sample_value("nomic_embed_model_broken")


def _embed(srv: RunningServer, text: str) -> pb.EmbedResponse:
    stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())
    return stub.Embed(pb.EmbedRequest(texts=[text], task=pb.TASK_CLUSTERING), timeout=30)


def _fails(srv: RunningServer, text: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _embed(srv, text)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    return info.value


def test_a_failure_on_one_input_leaves_the_server_in_service(tiny_original: Path) -> None:
    def on_poison(model: Run, probe: list[list[int]]) -> Run:
        def run(rows: Sequence[Sequence[int]]) -> np.ndarray:
            if any(len(row) > 30 for row in rows):  # far longer than the warm-up rows
                raise RuntimeError("an input this model cannot take")
            return model(rows)
        return run

    with _served(tiny_original, on_poison) as srv:
        assert "cannot take" in _fails(srv, "word " * 40).details()
        assert _embed(srv, "a short text that the model takes").embeddings[0].values
        assert _health(srv) == SERVING and _broken(srv) == 0


def test_an_input_the_model_fails_on_fails_its_own_request_not_its_batch_mates(tiny_original: Path) -> None:
    gate, held = threading.Event(), threading.Event()

    def on_poison(model: Run, probe: list[list[int]]) -> Run:
        def run(rows: Sequence[Sequence[int]]) -> np.ndarray:
            if any(row[1:-1] == [4937] for row in rows) and not gate.is_set():  # "cat": holds the model
                held.set()
                gate.wait(30)
            if any(29145 in row for row in rows):  # "zebra"
                raise RuntimeError("an input this model cannot take")
            return model(rows)
        return run

    with _served(tiny_original, on_poison) as srv:
        stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())

        def call(text: str) -> grpc.Future:
            return stub.Embed.future(pb.EmbedRequest(texts=[text], task=pb.TASK_RAW), timeout=30)

        blocker = call("cat")
        assert held.wait(30)
        calls = [call(text) for text in ("a short text", "a zebra text", "another short text", "one more text")]
        srv.wait_pending(5)  # all four queued behind the held batch: they make one batch
        gate.set()
        assert blocker.result().embeddings
        outcomes = [c.exception().code() if c.exception() else "OK" for c in calls]  # type: ignore[union-attr]
        assert outcomes == ["OK", grpc.StatusCode.INTERNAL, "OK", "OK"], outcomes
        assert _health(srv) == SERVING and _broken(srv) == 0


def test_a_model_that_fails_the_warm_up_texts_too_is_taken_out_of_service(tiny_original: Path) -> None:
    def device_lost(model: Run, probe: list[list[int]]) -> Run:
        def run(rows: Sequence[Sequence[int]]) -> np.ndarray:
            raise RuntimeError("the device is gone")
        return run

    with _served(tiny_original, device_lost) as srv:
        assert "the device is gone" in _fails(srv, "any text").details()
        _wait_for(srv, NOT_SERVING)
        assert _broken(srv) == 1


def test_a_warm_up_check_short_of_memory_does_not_take_the_model_out_of_service(tiny_original: Path) -> None:
    def short_of_memory(model: Run, probe: list[list[int]]) -> Run:
        def run(rows: Sequence[Sequence[int]]) -> np.ndarray:
            if [list(r) for r in rows] == probe:  # the warm-up rows, run as the health check
                raise OutOfMemory("out of memory computing the warm-up rows")
            raise RuntimeError("a kernel failed on this batch")
        return run

    with _served(tiny_original, short_of_memory) as srv:
        _fails(srv, "any text")
        time.sleep(0.2)
        assert _health(srv) == SERVING and _broken(srv) == 0


def test_a_model_whose_warm_up_texts_pass_again_is_back_in_service(tiny_original: Path) -> None:
    failures = [2]  # the batch and the warm-up check right after it

    def for_a_moment(model: Run, probe: list[list[int]]) -> Run:
        def run(rows: Sequence[Sequence[int]]) -> np.ndarray:
            if failures[0]:
                failures[0] -= 1
                raise RuntimeError("the device stalled")
            return model(rows)
        return run

    with _served(tiny_original, for_a_moment) as srv:
        _fails(srv, "any text")
        _wait_for(srv, NOT_SERVING)
        assert _broken(srv) == 1
        assert _embed(srv, "the next text").embeddings[0].values  # runs, then the warm-up rows pass
        _wait_for(srv, SERVING)
        assert _broken(srv) == 0


def test_a_backend_that_loses_rows_fails_its_health_check(tiny_original: Path) -> None:
    def loses_rows(model: Run, probe: list[list[int]]) -> Run:
        return lambda rows: model(rows)[:1]

    with _served(tiny_original, loses_rows) as srv:
        assert srv.app.loaded is not None
        assert not srv.app.loaded.runner.healthy([[101, 2000, 102], [101, 2001, 102]])
