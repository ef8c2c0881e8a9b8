"""A bare grpc.aio EmbedService: the floor of host cost, and the steps from it up to the server.

`python -m bench.echo --port P --width W [--event-loop L] [--level L --model DIR]` serves on 127.0.0.1:P. Each
level adds one part of the server's structure to the one before:
- echo: every Embed answered at once with one fixed vector: what gRPC itself costs.
- queue: each request's row goes to a worker thread, which takes everything queued as one batch and answers
  through futures on the event loop (call_soon_threadsafe), as the server's batcher does; nothing computed.
- tokenize: the text is first tokenized on the event loop with the model's tokenizer, as the server does.
- forward: the worker runs each batch through the model, loaded and run as the server does (Runner).
Whatever the server costs beyond `forward` is its own handling of a call: validation, admission, metrics,
request ids, trailers, responses with their metadata.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.domain import Task
from server.engine.tokenization import TextTokenizer
from server.event_loop import CHOICES, loop_factory
from server.heap import freeze_startup_objects

LEVELS = ("echo", "queue", "tokenize", "forward")
Compute = Callable[[list[list[int]]], np.ndarray]


class BatchingThread:
    """Rows in from the event loop, batches of whatever is queued on a thread of its own, vectors back."""

    def __init__(self, loop: asyncio.AbstractEventLoop, compute: Compute) -> None:
        self._loop, self._compute = loop, compute
        self._ready = threading.Condition()
        self._queue: list[tuple[list[int], asyncio.Future[np.ndarray]]] = []
        threading.Thread(target=self._work, name="model", daemon=True).start()

    def submit(self, row: list[int]) -> asyncio.Future[np.ndarray]:
        future = self._loop.create_future()
        with self._ready:
            self._queue.append((row, future))
            if len(self._queue) == 1:  # woken for a first row only, as the server's worker
                self._ready.notify()
        return future

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                batch, self._queue = self._queue, []
            vectors = self._compute([row for row, _ in batch])
            self._loop.call_soon_threadsafe(self._deliver, [future for _, future in batch], vectors)

    @staticmethod
    def _deliver(futures: list[asyncio.Future[np.ndarray]], vectors: np.ndarray) -> None:
        for future, vector in zip(futures, vectors, strict=True):
            if not future.done():
                future.set_result(vector)


class Echo(embed_pb2_grpc.EmbedServiceServicer):
    def __init__(self, width: int, tokenizer: TextTokenizer | None = None, compute: Compute | None = None) -> None:
        self._embedding = pb.Embedding(values=[0.125] * width, tokens=8)
        self._tokenizer = tokenizer
        self._compute = compute
        self._thread: BatchingThread | None = None

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        if self._compute is not None:
            if self._thread is None:
                self._thread = BatchingThread(asyncio.get_running_loop(), self._compute)
            for text in request.texts:
                row = [0]
                if self._tokenizer is not None:
                    prefix = Task.SEARCH_DOCUMENT.prefix
                    row = self._tokenizer.wrap(self._tokenizer.content_ids([text], prefix)[0])
                await self._thread.submit(row)
        return pb.EmbedResponse(embeddings=[self._embedding] * len(request.texts))


def servicer(level: str, width: int, model: Path | None) -> Echo:
    """The echo of `level`; tokenize and forward read the model directory (a checkpoint in the hub's layout)."""
    if level == "echo":
        return Echo(width)
    if level == "queue":
        return Echo(width, compute=lambda rows: np.zeros((len(rows), width), np.float32))
    if model is None:
        raise SystemExit(f"--level {level} needs --model")
    if level == "tokenize":
        from server.model.tokenizer import load_tokenizer

        return Echo(width, TextTokenizer(*load_tokenizer(model)), lambda rows: np.zeros((len(rows), width), np.float32))
    from server.config import parse_args
    from server.loading import load

    loaded = load(parse_args(["--model", str(model), "--variant", "fp32", "--threads", "1"]))
    return Echo(width, loaded.embedder.tokenizer, loaded.runner.run)


async def serve(port: int, echo: Echo) -> None:
    server = grpc.aio.server()
    embed_pb2_grpc.add_EmbedServiceServicer_to_server(echo, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    freeze_startup_objects()  # as the server does once it has started
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__.split("\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--width", type=int, required=True, help="values in the fixed vector")
    p.add_argument("--event-loop", choices=CHOICES, default="auto")
    p.add_argument("--level", choices=LEVELS, default="echo")
    p.add_argument("--model", type=Path, help="checkpoint directory, for the tokenize and forward levels")
    args = p.parse_args(argv)
    echo = servicer(args.level, args.width, args.model)
    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        runner.run(serve(args.port, echo))


if __name__ == "__main__":
    main()
