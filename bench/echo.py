"""A bare grpc.aio EmbedService that answers every Embed with one fixed vector: the floor of host cost.

`python -m bench.echo PORT WIDTH [EVENT_LOOP]` serves on 127.0.0.1:PORT, on the event loop the server would
choose (server.event_loop; auto by default). Measured beside the real server, it says how much of the real
server's CPU per request is gRPC's own and how much is ours.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.event_loop import loop_factory


class Echo(embed_pb2_grpc.EmbedServiceServicer):
    def __init__(self, width: int) -> None:
        self._embedding = pb.Embedding(values=[0.125] * width, tokens=8)

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return pb.EmbedResponse(embeddings=[self._embedding] * len(request.texts))


async def serve(port: int, width: int) -> None:
    server = grpc.aio.server()
    embed_pb2_grpc.add_EmbedServiceServicer_to_server(Echo(width), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=loop_factory(sys.argv[3] if len(sys.argv) > 3 else "auto")) as runner:
        runner.run(serve(int(sys.argv[1]), int(sys.argv[2])))
