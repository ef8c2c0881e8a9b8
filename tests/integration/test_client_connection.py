"""Retries on overload, round_robin over several servers, bearer tokens and TLS, against real servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import AsyncEmbedClient, EmbedClient, EmbedError, RetryPolicy, Tls
from client.retry import NO_RETRIES
from tests.helpers.certs import Authority
from tools.servers import RunningServer, running_server

PATIENT = RetryPolicy(max_attempts=50, initial_backoff_s=0.02, max_backoff_s=0.2)


@pytest.fixture(scope="module")
def overloaded(tiny_original: Path) -> Iterator[RunningServer]:
    """A queue of 16 tokens: a request is admitted only while nothing else waits."""
    with running_server(str(tiny_original), max_queue_tokens=16) as srv:
        yield srv


def test_overload_carries_a_retry_hint_and_retries_succeed(overloaded: RunningServer) -> None:
    texts = [f"request text {i}" for i in range(20)]

    async def burst(retry: RetryPolicy) -> list[np.ndarray | BaseException]:
        async with AsyncEmbedClient(overloaded.target, retry=retry) as client:
            return await asyncio.gather(*(client.embed(texts) for _ in range(12)), return_exceptions=True)

    # A model slow enough that the burst arrives while the first request is computed: else, on a busy machine,
    # each request could be done before the next one arrives, and none refused.
    assert overloaded.app.loaded is not None
    runner = overloaded.app.loaded.runner
    fast = runner.run
    runner.run = lambda rows: (time.sleep(0.2), fast(rows))[1]  # type: ignore[method-assign]
    try:
        refused = [r for r in asyncio.run(burst(NO_RETRIES)) if isinstance(r, BaseException)]
    finally:
        runner.run = fast  # type: ignore[method-assign]
    assert refused and all(isinstance(r, EmbedError) for r in refused)
    assert {r.code for r in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}  # type: ignore[union-attr]
    assert all(r.retry_after_s and r.retry_after_s > 0 for r in refused)  # type: ignore[union-attr]
    results = asyncio.run(burst(PATIENT))
    assert all(isinstance(r, np.ndarray) and r.shape == (20, 128) for r in results)


def test_stream_batches_refused_for_overload_are_sent_again(overloaded: RunningServer) -> None:
    texts = [f"stream text {i}" for i in range(200)]
    with EmbedClient(overloaded.target, retry=PATIENT) as client:
        stream = client.embed_stream(texts, batch_size=10, window=8, timeout=120)
        got = np.concatenate([b.embeddings for b in stream])
        want = client.embed(texts)
    assert stream.stats.retried > 0 and stream.stats.sent == 20 + stream.stats.retried
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_round_robin_spreads_calls_over_several_servers(tiny_original: Path, tiny_v5: Path) -> None:
    with running_server(str(tiny_original)) as a, running_server(str(tiny_v5)) as b, \
            EmbedClient([a.target, b.target]) as client:
        served = {client.info().model_id for _ in range(8)}
    assert served == {str(tiny_original), str(tiny_v5)}


def test_tls_and_bearer_token_against_the_real_server(tiny_original: Path, tmp_path: Path) -> None:
    ca = Authority("test CA")
    cert, key = ca.issue("localhost", server=True).write(tmp_path, "server")
    with running_server(str(tiny_original), tls_cert=cert, tls_key=key, auth_tokens_env="s3cret") as srv:
        trusted = Tls(root_certificates=ca.pem)
        with EmbedClient(f"localhost:{srv.port}", tls=trusted, token="s3cret") as client:
            assert client.info().dimensions == 128
            unary = client.embed(["secure text"])
            streamed = np.concatenate([b.embeddings for b in client.embed_stream(["secure text"], timeout=30)])
        np.testing.assert_array_equal(unary, streamed)
        # Several addresses are dialled by IP: the certificate is still checked against the host name.
        with EmbedClient([f"localhost:{srv.port}", f"127.0.0.1:{srv.port}"], tls=trusted, token="s3cret") as client:
            assert client.info().dimensions == 128
        with EmbedClient(f"localhost:{srv.port}", tls=trusted, token="wrong", retry=NO_RETRIES) as client, \
                pytest.raises(EmbedError) as info:
            client.info()
        assert info.value.code is grpc.StatusCode.UNAUTHENTICATED
        with EmbedClient(f"localhost:{srv.port}", tls=True, token="s3cret", retry=NO_RETRIES) as client, \
                pytest.raises(EmbedError) as info:
            client.info()  # the system's roots do not trust the test CA
        assert info.value.code is grpc.StatusCode.UNAVAILABLE
