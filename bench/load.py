"""Drive a server over gRPC at a fixed concurrency, unary or streaming, and time every request.

Run as its own process (`python -m bench.load IN.json OUT.json`) so that the client's Python does not
share an interpreter lock with the server under test. IN holds the target, the mode, the concurrency
and the requests (lists of texts), optionally the channels (1 by default); OUT gets wall time, per-request
latencies, tokens and errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc

STREAM_WINDOW = 8  # requests in flight per stream: what the server computes of one stream at once
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024),
                    ("grpc.max_send_message_length", 64 * 1024 * 1024)]


@dataclass
class LoadResult:
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    texts: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


def stream_layout(concurrency: int) -> tuple[int, int]:
    """(streams, requests in flight per stream) for a total of `concurrency` requests in flight."""
    streams = math.ceil(concurrency / STREAM_WINDOW)
    return streams, math.ceil(concurrency / streams)


class _Recorder:
    def __init__(self, result: LoadResult) -> None:
        self.result = result

    def response(self, texts: list[str], response: pb.EmbedResponse, seconds: float) -> None:
        if len(response.embeddings) != len(texts) or any(not e.values for e in response.embeddings):
            self.result.errors.append(f"{len(response.embeddings)} embeddings for {len(texts)} texts")
            return
        self.result.latencies_s.append(seconds)
        self.result.texts += len(texts)
        self.result.tokens += sum(e.tokens for e in response.embeddings)


def _request(texts: list[str]) -> pb.EmbedRequest:
    return pb.EmbedRequest(texts=texts, task=pb.TASK_SEARCH_DOCUMENT)


async def _unary(stub: embed_pb2_grpc.EmbedServiceStub, work: Iterator[tuple[int, list[str]]],
                 recorder: _Recorder, timeout: float) -> None:
    for _, texts in work:
        started = time.perf_counter()
        try:
            response = await stub.Embed(_request(texts), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            recorder.result.errors.append(f"{exc.code().name}: {exc.details()}")
            continue
        recorder.response(texts, response, time.perf_counter() - started)


async def _stream(stub: embed_pb2_grpc.EmbedServiceStub, work: Iterator[tuple[int, list[str]]],
                  recorder: _Recorder, window: int, timeout: float) -> None:
    call = stub.EmbedStream(timeout=timeout)
    slots = asyncio.Semaphore(window)
    in_flight: dict[str, tuple[list[str], float]] = {}

    async def send() -> None:
        for i, texts in work:
            await slots.acquire()
            in_flight[str(i)] = (texts, time.perf_counter())
            await call.write(pb.EmbedStreamRequest(id=str(i), request=_request(texts)))
        await call.done_writing()

    async def receive() -> None:
        async for message in call:
            texts, started = in_flight.pop(message.id)
            slots.release()
            if message.HasField("error"):
                recorder.result.errors.append(f"code {message.error.code}: {message.error.message}")
            else:
                recorder.response(texts, message.response, time.perf_counter() - started)

    try:
        await asyncio.gather(send(), receive())
    except grpc.aio.AioRpcError as exc:  # the stream broke: what it had in flight is lost
        recorder.result.errors.extend(f"{exc.code().name}: {exc.details()}" for _ in range(max(len(in_flight), 1)))


async def drive(target: str, mode: str, concurrency: int, requests: list[list[str]],
                timeout: float = 600.0, channels: int = 1) -> LoadResult:
    """Callers take turns over `channels` channels, each with a connection of its own (a server with --workers
    spreads connections over its workers, not calls)."""
    result = LoadResult()
    recorder = _Recorder(result)
    work = iter(enumerate(requests))  # shared: each caller takes the next request when it is free
    options = [*_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    async with contextlib.AsyncExitStack() as stack:
        stubs = []
        for _ in range(channels):
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(target, options=options))
            await asyncio.wait_for(channel.channel_ready(), 30)
            stubs.append(embed_pb2_grpc.EmbedServiceStub(channel))
        started = time.perf_counter()
        if mode == "unary":
            callers = [_unary(stubs[i % channels], work, recorder, timeout) for i in range(concurrency)]
        elif mode == "stream":
            streams, window = stream_layout(concurrency)
            callers = [_stream(stubs[i % channels], work, recorder, window, timeout) for i in range(streams)]
        else:
            raise ValueError(f"mode must be unary or stream, not {mode!r}")
        await asyncio.gather(*callers)
        result.wall_s = time.perf_counter() - started
    return result


def drive_from_another_process(target: str, mode: str, concurrency: int, requests: list[list[str]],
                               channels: int = 1) -> LoadResult:
    """`drive` in a process of its own (`python -m bench.load`), so that its Python shares no interpreter lock
    and no CPU time with the process measured."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, out = Path(tmp) / "in.json", Path(tmp) / "out.json"
        spec.write_text(json.dumps({"target": target, "mode": mode, "concurrency": concurrency,
                                    "requests": requests, "channels": channels}), encoding="utf-8")
        subprocess.run([sys.executable, "-m", "bench.load", str(spec), str(out)], check=True)
        return LoadResult(**json.loads(out.read_text(encoding="utf-8")))


def main(argv: list[str]) -> None:
    source, destination = argv
    with open(source, encoding="utf-8") as f:
        spec = json.load(f)
    result = asyncio.run(drive(spec["target"], spec["mode"], spec["concurrency"], spec["requests"],
                               channels=spec.get("channels", 1)))
    with open(destination, "w", encoding="utf-8") as f:
        json.dump(asdict(result), f)


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["LoadResult", "drive", "drive_from_another_process", "stream_layout"]
