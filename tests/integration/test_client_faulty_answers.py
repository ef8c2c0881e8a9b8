"""The client's defence against a faulty answer: fewer (or more) vectors than texts, or another width than the
one asked for, is refused, never handed on misaligned. Only a fake server can give such answers."""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from client import EmbedClient, EmbedError, RetryPolicy
from client.aio import AsyncEmbedClient
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc


class FaultyService(embed_pb2_grpc.EmbedServiceServicer):
    """Answers `drop` vectors fewer than texts, each of the requested width plus `wider`."""

    def __init__(self, drop: int = 0, wider: int = 0) -> None:
        self.drop, self.wider = drop, wider

    def answer(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        width = (request.dimensions or 8) + self.wider
        count = max(0, len(request.texts) - self.drop)
        return pb.EmbedResponse(
            embeddings=[pb.Embedding(values=[1.0] + [0.0] * (width - 1), tokens=1) for _ in range(count)],
            metadata=pb.ResponseMetadata(model_id="fake", variant="fp32", dimensions=width))

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        return self.answer(request)

    def EmbedStream(self, requests: Iterator[pb.EmbedStreamRequest], context: grpc.ServicerContext
                    ) -> Iterator[pb.EmbedStreamResponse]:
        for message in requests:
            yield pb.EmbedStreamResponse(id=message.id, response=self.answer(message.request))


def serve(service: FaultyService) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    embed_pb2_grpc.add_EmbedServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize(("drop", "wider", "dimensions", "words"), [
    (1, 0, 0, "2 vectors for 3 texts"), (-1, 0, 0, "4 vectors for 3 texts"), (0, 1, 4, "width 5 where 4")])
def test_a_response_that_does_not_match_the_request_is_refused(drop: int, wider: int, dimensions: int,
                                                               words: str) -> None:
    server, target = serve(FaultyService(drop, wider))
    texts = ["one", "two", "three"]
    try:
        with EmbedClient(target, timeout=10) as client:
            calls = [lambda: client.embed(texts, dimensions=dimensions),
                     lambda: client.embed_response(texts, dimensions=dimensions),
                     lambda: list(client.embed_stream(texts, dimensions=dimensions, batch_size=3))]
            for call in calls:
                with pytest.raises(EmbedError) as caught:
                    call()
                assert caught.value.code is grpc.StatusCode.DATA_LOSS
                assert words in caught.value.details

        async def aio() -> None:
            async with AsyncEmbedClient(target, timeout=10) as client:
                for call in (client.embed, client.embed_response):
                    with pytest.raises(EmbedError) as caught:
                        await call(texts, dimensions=dimensions)
                    assert caught.value.code is grpc.StatusCode.DATA_LOSS and words in caught.value.details

        asyncio.run(aio())
    finally:
        server.stop(None)


def test_a_matching_response_is_accepted() -> None:
    server, target = serve(FaultyService())
    try:
        with EmbedClient(target, timeout=10) as client:
            assert client.embed(["a", "b"], dimensions=4).shape == (2, 4)
            assert sum(len(b.texts) for b in client.embed_stream(["a", "b", "c"], batch_size=2)) == 3
    finally:
        server.stop(None)


class BusyService(FaultyService):
    """Refuses each stream message `refusals` times as overloaded (hint: 10 ms), then answers it."""

    def __init__(self, refusals: int) -> None:
        super().__init__()
        self.refusals = refusals
        self.seen: collections.Counter[str] = collections.Counter()

    def EmbedStream(self, requests: Iterator[pb.EmbedStreamRequest], context: grpc.ServicerContext
                    ) -> Iterator[pb.EmbedStreamResponse]:
        for message in requests:
            self.seen[message.id] += 1
            if self.seen[message.id] <= self.refusals:
                busy = pb.StreamError(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="queue full")
                busy.retry_delay.FromMilliseconds(10)
                yield pb.EmbedStreamResponse(id=message.id, error=busy)
            else:
                yield pb.EmbedStreamResponse(id=message.id, response=self.answer(message.request))


def test_a_stream_batch_refused_as_overloaded_is_sent_again_past_its_tries() -> None:
    """A busy server's hints can be 50 ms apart: five tries of a batch lasted ~0.3 s, and a bulk run failed."""
    service = BusyService(refusals=3 * RetryPolicy().max_attempts)
    server, target = serve(service)
    try:
        with EmbedClient(target, timeout=10) as client:
            stream = client.embed_stream([f"text {i}" for i in range(6)], batch_size=2, reconnect_timeout=30)
            assert sum(len(b.texts) for b in stream) == 6
        assert stream.stats.retried == 3 * service.refusals
        service.seen.clear()
        # Refused for longer than reconnect_timeout: it fails.
        with EmbedClient(target, timeout=10) as client, pytest.raises(EmbedError) as caught:
            list(client.embed_stream(["text"], reconnect_timeout=0.05))
        assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop(None)


class ShiftingService(FaultyService):
    """Full width (dimensions=0) answered 8 wide, then 4 wide; or a vector with a NaN, from `nan_after` on."""

    def __init__(self, narrow_after: int | None = None, nan_after: int | None = None) -> None:
        super().__init__()
        self.narrow_after, self.nan_after, self.answered = narrow_after, nan_after, 0

    def answer(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        response = super().answer(request)
        if self.narrow_after is not None and self.answered >= self.narrow_after:
            response = FaultyService(wider=-4).answer(request)
        if self.nan_after is not None and self.answered >= self.nan_after:
            response.embeddings[-1].values[1] = float("nan")
        self.answered += 1
        return response


@pytest.mark.parametrize(("service", "words"), [
    (ShiftingService(narrow_after=1), "width 4 where the run's first answer had 8"),
    (ShiftingService(nan_after=1), "NaN or infinity for text 1")])
def test_a_stream_refuses_a_width_change_or_a_non_finite_vector(service: ShiftingService, words: str) -> None:
    server, target = serve(service)
    try:
        with EmbedClient(target, timeout=10) as client, pytest.raises(EmbedError) as caught:
            list(client.embed_stream([f"text {i}" for i in range(6)], batch_size=2, window=1))
        assert caught.value.code is grpc.StatusCode.DATA_LOSS and words in caught.value.details
    finally:
        server.stop(None)


class StuckService(FaultyService):
    """Answers the first `answers` stream messages, then reads on and answers nothing: a stuck model, whose
    process still answers keepalive pings."""

    def __init__(self, answers: int) -> None:
        super().__init__()
        self.answers, self.streams, self.released = answers, 0, threading.Event()

    def EmbedStream(self, requests: Iterator[pb.EmbedStreamRequest], context: grpc.ServicerContext
                    ) -> Iterator[pb.EmbedStreamResponse]:
        self.streams += 1
        for message in requests:
            if self.answers <= 0:
                self.released.wait(30)
                return
            self.answers -= 1
            yield pb.EmbedStreamResponse(id=message.id, response=self.answer(message.request))


def test_answer_timeout_reopens_a_stream_the_server_holds_without_answering() -> None:
    service = StuckService(answers=2)
    server, target = serve(service)
    try:
        with EmbedClient(target, timeout=10) as client:
            started = time.monotonic()
            stream = client.embed_stream([f"text {i}" for i in range(8)], batch_size=2, window=2,
                                         answer_timeout=0.3, reconnect_timeout=1.0)
            with pytest.raises(EmbedError) as caught:
                for _ in stream:
                    pass
            took = time.monotonic() - started
        assert caught.value.code is grpc.StatusCode.UNAVAILABLE
        assert "answered nothing for 0.3s" in caught.value.details and took < 8
        assert stream.stats.reopened >= 1 and service.streams >= 2  # reopened (a restart may heal it), then gave up
        with EmbedClient(target, timeout=10) as client, pytest.raises(ValueError, match="answer_timeout"):
            client.embed_stream(["text"], answer_timeout=0)
    finally:
        service.released.set()
        server.stop(None)
    server, target = serve(FaultyService())  # a server that answers: the bound never fires
    try:
        with EmbedClient(target, timeout=10) as client:
            stream = client.embed_stream([f"text {i}" for i in range(200)], batch_size=2, answer_timeout=5)
            assert sum(len(b.texts) for b in stream) == 200 and stream.stats.reopened == 0
    finally:
        server.stop(None)
