"""A stream whose reader does not read holds a bounded amount of the server's work, starves nobody, and
gets every answer, in order, once it reads; a reader that goes away leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from tools.servers import RunningServer, running_server

REQUESTS = 600
TEXTS_PER_REQUEST = 16
# The slow reader's receive window stays at HTTP/2's initial size (no BDP growth), so that it fills with a
# few dozen answers; a growing window only changes how many answers wait in the reader's memory.
SLOW_READER = [("grpc.http2.bdp_probe", 0)]


def _request(i: int) -> pb.EmbedRequest:
    return pb.EmbedRequest(texts=[f"slow reader {i} text {j}" for j in range(TEXTS_PER_REQUEST)],
                           task=pb.TASK_SEARCH_QUERY)


def _sample(srv: RunningServer, name: str) -> float:
    return srv.app.metrics.registry.get_sample_value(name) or 0.0


def _streams_ended(srv: RunningServer) -> float:
    """EmbedStream calls whose handler has finished, whatever their status."""
    return sum(s.value for family in srv.app.metrics.requests.collect() for s in family.samples
               if s.name.endswith("_total") and s.labels["method"] == "EmbedStream")


def _computed_rows(srv: RunningServer) -> int:
    assert srv.app.loaded is not None
    return srv.app.loaded.batcher.totals.rows


async def _until_settled(read: Callable[[], float], timeout_s: float = 15.0) -> float:
    """Wait until `read()` stops changing (the same value 0.3 s apart); returns that value."""
    deadline = time.monotonic() + timeout_s
    last = read()
    while time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError(f"still changing after {timeout_s}s: {last}")


async def _writer(call: grpc.aio.StreamStreamCall) -> int:
    for i in range(REQUESTS):
        await call.write(pb.EmbedStreamRequest(id=str(i), request=_request(i)))
    await call.done_writing()
    return REQUESTS


@pytest.fixture(scope="module")
def server(tiny_original: Path) -> Iterator[RunningServer]:
    with running_server(str(tiny_original)) as srv:
        yield srv


def test_a_slow_reader_holds_bounded_work_starves_nobody_and_gets_all_in_order(server: RunningServer) -> None:
    srv = server
    unary = embed_pb2_grpc.EmbedServiceStub(srv.channel())
    expected_first = np.array([e.values for e in unary.Embed(_request(0), timeout=10).embeddings])

    async def run() -> None:
        async with grpc.aio.insecure_channel(srv.target, options=SLOW_READER) as channel:
            call = embed_pb2_grpc.EmbedServiceStub(channel).EmbedStream()
            before = _computed_rows(srv)
            writer = asyncio.ensure_future(_writer(call))
            # Nobody reads: the server stops computing once the reader's window and STREAM_WINDOW are full.
            held = await _until_settled(lambda: _computed_rows(srv)) - before
            assert 0 < held < REQUESTS * TEXTS_PER_REQUEST / 4, held
            assert _sample(srv, "nomic_embed_queue_tokens") == 0  # none of it waits for the model

            # Meanwhile other callers are served as usual.
            for i in range(20):
                reply = await asyncio.to_thread(unary.Embed, _request(1000 + i), timeout=5)
                assert len(reply.embeddings) == TEXTS_PER_REQUEST

            # Reading at last: every answer, in the order asked, the first one right.
            ids = []
            async for message in call:
                assert message.WhichOneof("result") == "response", message.error
                assert len(message.response.embeddings) == TEXTS_PER_REQUEST
                if not ids:
                    first = np.array([e.values for e in message.response.embeddings])
                    np.testing.assert_allclose(first, expected_first, atol=1e-5)
                ids.append(message.id)
            assert await writer == REQUESTS
            assert ids == [str(i) for i in range(REQUESTS)]

    asyncio.run(run())
    assert _sample(srv, "nomic_embed_requests_in_flight") == 0


def test_a_reader_that_goes_away_releases_everything(server: RunningServer) -> None:
    srv = server
    ended_before = _streams_ended(srv)

    async def run() -> None:
        channel = grpc.aio.insecure_channel(srv.target, options=SLOW_READER)
        call = embed_pb2_grpc.EmbedServiceStub(channel).EmbedStream()
        writer = asyncio.ensure_future(_writer(call))
        await _until_settled(lambda: _computed_rows(srv))
        assert _sample(srv, "nomic_embed_requests_in_flight") == 1
        await channel.close()  # the reader disconnects without a word
        await asyncio.gather(writer, return_exceptions=True)  # done, or cut short by the close
        assert await _until_settled(lambda: _sample(srv, "nomic_embed_requests_in_flight")) == 0

    asyncio.run(run())
    rows = _computed_rows(srv)
    assert _sample(srv, "nomic_embed_queue_tokens") == 0
    assert _streams_ended(srv) == ended_before + 1  # its handler has returned
    reply = embed_pb2_grpc.EmbedServiceStub(srv.channel()).Embed(_request(0), timeout=10)
    assert len(reply.embeddings) == TEXTS_PER_REQUEST
    assert _computed_rows(srv) == rows + TEXTS_PER_REQUEST  # nothing of the gone reader's was computed after
