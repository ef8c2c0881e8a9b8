"""Overload is answered by the app, honestly: OK or RESOURCE_EXHAUSTED with a RetryInfo hint, nothing else,
and whoever is admitted waits no longer than the token-bounded queue allows.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest.driver import LoadResult, burst, run_level
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from tools.servers import RunningServer, running_server

QUEUE_TOKENS = 2048
DEADLINE_S = 5.0
# Requests long enough (8 texts of up to 40 words, ~250 tokens) that the model, not the per-call overhead of
# Python and grpc, is what saturates: then the admission queue is what overload fills.
HEAVY = {"texts_per_request": 8, "max_words": 40}
PROBE = pb.EmbedRequest(texts=["is the server still right after the storm?"], task=pb.TASK_SEARCH_QUERY)


def _vector(srv: RunningServer) -> np.ndarray:
    reply = embed_pb2_grpc.EmbedServiceStub(srv.channel()).Embed(PROBE, timeout=10)
    return np.array(reply.embeddings[0].values, dtype=np.float32)


def _gauge(srv: RunningServer, name: str) -> float | None:
    return srv.app.metrics.registry.get_sample_value(name)


@pytest.fixture(scope="module")
def server(tiny_original: Path) -> Iterator[tuple[RunningServer, np.ndarray]]:
    """A server with a small admission queue, and the probe's vector before any load."""
    with running_server(str(tiny_original), max_queue_tokens=QUEUE_TOKENS) as srv:
        yield srv, _vector(srv)


def _assert_only_ok_or_refused_with_hint(result: LoadResult) -> None:
    codes = result.codes
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, (codes, {o.details for o in result.outcomes})
    assert codes["OK"] > 0
    assert result.refusals_without_retry_info == 0
    assert all((o.retry_after_s or 0) > 0 for o in result.outcomes if o.code == "RESOURCE_EXHAUSTED")


def _assert_healthy_and_right(srv: RunningServer, before: np.ndarray) -> None:
    health = health_pb2_grpc.HealthStub(srv.channel())
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    np.testing.assert_allclose(_vector(srv), before, atol=1e-6)
    deadline = time.monotonic() + 10  # the last refusals' handlers may still be unwinding
    while _gauge(srv, "nomic_embed_requests_in_flight") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gauge(srv, "nomic_embed_requests_in_flight") == 0
    assert _gauge(srv, "nomic_embed_queue_tokens") == 0


def test_a_burst_beyond_grpc_core_defaults_is_answered_by_the_app(server: tuple[RunningServer, np.ndarray]) -> None:
    """2,000 calls at once on one connection: with grpc core's default limits (1,000 pending calls) about a
    tenth of them came back CANCELLED; with the server's limits every call is answered or refused with a hint."""
    srv, before = server
    result = asyncio.run(burst(srv.target, 2000, channels=1, texts_per_request=1, max_words=8, deadline_s=60))
    _assert_only_ok_or_refused_with_hint(result)
    _assert_healthy_and_right(srv, before)


def test_ten_times_capacity_is_refused_honestly_and_admitted_waits_stay_bounded(
        server: tuple[RunningServer, np.ndarray]) -> None:
    srv, before = server
    # Capacity by Little's law: the saturated throughput times the latency of a call that waits for nobody
    # is how many callers keep the model just busy.
    alone = asyncio.run(run_level(srv.target, 1, 0.5, deadline_s=DEADLINE_S, **HEAVY))
    saturated = asyncio.run(run_level(srv.target, 8, 1.0, deadline_s=DEADLINE_S, **HEAVY))
    capacity = max(1, round(saturated.rps * statistics.median(alone.ok_latencies_s)))
    callers = min(max(10 * capacity, 16), 128)  # bounded both ways, whatever a busy machine measures

    # Refused callers come straight back: the harshest clients, not the polite ones that wait as told.
    result = asyncio.run(run_level(srv.target, callers, 3.0, deadline_s=DEADLINE_S, pause_after_refusal_s=0,
                                   seed=1, **HEAVY))
    _assert_only_ok_or_refused_with_hint(result)
    assert result.codes["RESOURCE_EXHAUSTED"] > 0, "not overloaded: nothing was refused"
    # An admitted request waits behind at most a full queue plus the batch on the model (no bigger than a
    # full queue), drained at the rate the model actually kept up during the run.
    bound_s = 4 * (2 * QUEUE_TOKENS / result.tokens_per_s) + 0.25
    waits = sorted(o.queue_s for o in result.outcomes if o.code == "OK")
    assert waits[-1] < bound_s, (waits[-1], bound_s)
    assert result.percentile(0.99) < DEADLINE_S
    _assert_healthy_and_right(srv, before)
