"""Drive a server with unary Embed calls and record every call's outcome.

Two shapes of load: a closed loop (a fixed number of callers sending back to back for a bounded time)
and a burst (many calls started at once, spread over several connections).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc

from client.errors import from_rpc_error
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc

_TEXT = ("the server turns many small concurrent requests into efficient model batches while every caller "
         "gets an answer overload is refused honestly and bad input hurts nobody")
_WORDS = tuple(_TEXT.split(" "))
# Separate channels to one target share one connection unless each keeps its own subchannels.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)

Metadata = tuple[tuple[str, str], ...]


def sample_texts(rng: random.Random, count: int, max_words: int) -> list[str]:
    return [" ".join(rng.choices(_WORDS, k=rng.randint(3, max_words))) for _ in range(count)]


@dataclass(frozen=True)
class Outcome:
    """One call: its status code ("OK" or the error's name) and what the server said about it."""

    code: str
    latency_s: float
    retry_after_s: float | None = None  # a refusal's RetryInfo hint; None when it carried none
    queue_s: float = 0.0  # an answer's wait for the model, as the server reports it
    tokens: int = 0
    details: str = ""


async def embed_once(stub: embed_pb2_grpc.EmbedServiceStub, request: pb.EmbedRequest, deadline_s: float,
                     metadata: Metadata = ()) -> Outcome:
    started = time.monotonic()
    try:
        reply = await stub.Embed(request, timeout=deadline_s, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        refusal = from_rpc_error(error)
        return Outcome(error.code().name, time.monotonic() - started, refusal.retry_after_s,
                       details=refusal.details)
    return Outcome("OK", time.monotonic() - started, queue_s=reply.metadata.queue_time.ToNanoseconds() / 1e9,
                   tokens=reply.metadata.total_tokens)


@dataclass(frozen=True)
class LoadResult:
    concurrency: int
    seconds: float
    outcomes: list[Outcome]

    @property
    def codes(self) -> Counter[str]:
        return Counter(o.code for o in self.outcomes)

    @property
    def ok_latencies_s(self) -> list[float]:
        return sorted(o.latency_s for o in self.outcomes if o.code == "OK")

    @property
    def rps(self) -> float:
        return self.codes["OK"] / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return sum(o.tokens for o in self.outcomes) / self.seconds

    @property
    def refusals_without_retry_info(self) -> int:
        return sum(1 for o in self.outcomes if o.code == "RESOURCE_EXHAUSTED" and o.retry_after_s is None)

    def percentile(self, q: float) -> float:
        ordered = self.ok_latencies_s
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def row(self) -> dict[str, object]:
        ok = self.ok_latencies_s
        return {
            "concurrency": self.concurrency, "seconds": round(self.seconds, 2), "rps_ok": round(self.rps, 1),
            "p50_ms": round(1e3 * statistics.median(ok), 1) if ok else None,
            "p99_ms": round(1e3 * self.percentile(0.99), 1) if ok else None,
            "codes": dict(self.codes), "refusals_without_retry_info": self.refusals_without_retry_info,
        }


def _request(rng: random.Random, texts_per_request: int, max_words: int) -> pb.EmbedRequest:
    return pb.EmbedRequest(texts=sample_texts(rng, texts_per_request, max_words), task=pb.TASK_SEARCH_DOCUMENT)


async def run_level(target: str, concurrency: int, seconds: float, *, texts_per_request: int, max_words: int,
                    deadline_s: float, metadata: Metadata = (), seed: int = 0,
                    pause_after_refusal_s: float | None = None) -> LoadResult:
    """`concurrency` callers on one connection send requests back to back for `seconds`; each call has a
    deadline. After a RESOURCE_EXHAUSTED a caller waits as long as the server's RetryInfo says, as the client
    library does, or `pause_after_refusal_s` when given (0: it comes straight back)."""
    outcomes: list[Outcome] = []
    rng = random.Random(seed)
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)

        async def caller() -> None:
            while time.monotonic() < stop_at:
                outcome = await embed_once(stub, _request(rng, texts_per_request, max_words), deadline_s, metadata)
                outcomes.append(outcome)
                if outcome.code == "RESOURCE_EXHAUSTED":
                    pause = pause_after_refusal_s if pause_after_refusal_s is not None else outcome.retry_after_s
                    await asyncio.sleep(min(pause or 0.0, max(0.0, stop_at - time.monotonic())))

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return LoadResult(concurrency, elapsed, outcomes)


async def burst(target: str, calls: int, *, channels: int, texts_per_request: int, max_words: int,
                deadline_s: float, metadata: Metadata = (), seed: int = 0) -> LoadResult:
    """Start `calls` calls at once, spread over `channels` connections, and wait for every answer."""
    rng = random.Random(seed)
    requests = [_request(rng, texts_per_request, max_words) for _ in range(calls)]
    opened = [grpc.aio.insecure_channel(target, options=OWN_CONNECTION) for _ in range(channels)]
    try:
        for channel in opened:
            await asyncio.wait_for(channel.channel_ready(), deadline_s)
        stubs = [embed_pb2_grpc.EmbedServiceStub(channel) for channel in opened]
        started = time.monotonic()
        outcomes = await asyncio.gather(*(
            embed_once(stubs[i % channels], request, deadline_s, metadata) for i, request in enumerate(requests)
        ))
        elapsed = time.monotonic() - started
    finally:
        for channel in opened:
            await channel.close()
    return LoadResult(calls, elapsed, list(outcomes))


def flood_to_file(target: str, callers: int, texts_per_request: int, seconds: float, out: str) -> None:
    """Heavy requests back to back from `callers` callers on one connection, who wait as RetryInfo says; the
    result's row goes to `out` as JSON. Run in a process of its own, so that its event loop is not the
    measured caller's."""
    result = asyncio.run(run_level(target, callers, seconds, deadline_s=60, seed=7,
                                   texts_per_request=texts_per_request, max_words=40))
    Path(out).write_text(json.dumps(result.row()))
