"""The client's defence against a faulty answer: fewer (or more) vectors than texts, or another width than the
one asked for, is refused, never handed on misaligned. Only a fake server can give such answers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from client import EmbedClient, EmbedError
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
