"""Drive a server at a fixed concurrency for a bounded time; count outcomes by status code."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import grpc

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc

_TEXT = ("the server turns many small concurrent requests into efficient model batches while every caller "
         "gets an answer overload is refused honestly and bad input hurts nobody")
_WORDS = tuple(_TEXT.split(" "))


def sample_texts(rng: random.Random, count: int, max_words: int) -> list[str]:
    return [" ".join(rng.choices(_WORDS, k=rng.randint(3, max_words))) for _ in range(count)]


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    seconds: float
    codes: dict[str, int]
    ok_latencies_s: list[float]

    @property
    def ok(self) -> int:
        return self.codes.get("OK", 0)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds

    def percentile(self, q: float) -> float:
        if not self.ok_latencies_s:
            return float("nan")
        ordered = sorted(self.ok_latencies_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def row(self) -> dict[str, object]:
        return {
            "concurrency": self.concurrency, "rps_ok": round(self.rps, 1),
            "p50_ms": round(1e3 * statistics.median(self.ok_latencies_s), 1) if self.ok_latencies_s else None,
            "p99_ms": round(1e3 * self.percentile(0.99), 1) if self.ok_latencies_s else None,
            "codes": dict(self.codes),
        }


async def run_level(target: str, concurrency: int, seconds: float, *, texts_per_request: int, max_words: int,
                    deadline_s: float, metadata: tuple[tuple[str, str], ...] = (), seed: int = 0) -> LevelResult:
    """`concurrency` callers send requests back to back for `seconds`; each call has a deadline."""
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    rng = random.Random(seed)
    stop_at = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = embed_pb2_grpc.EmbedServiceStub(channel)

        async def caller() -> None:
            while time.monotonic() < stop_at:
                request = pb.EmbedRequest(texts=sample_texts(rng, texts_per_request, max_words),
                                          task=pb.TASK_SEARCH_DOCUMENT)
                started = time.monotonic()
                try:
                    await stub.Embed(request, timeout=deadline_s, metadata=metadata)
                except grpc.aio.AioRpcError as error:
                    codes[error.code().name] += 1
                    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        await asyncio.sleep(0.005)  # a well-behaved client backs off
                else:
                    codes["OK"] += 1
                    latencies.append(time.monotonic() - started)

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return LevelResult(concurrency, elapsed, dict(codes), latencies)
