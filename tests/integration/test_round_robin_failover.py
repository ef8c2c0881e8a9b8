"""Three server processes behind one round_robin client; two go away mid-run; nothing is lost.

A stream per server and unary calls from several tasks run while one server hangs and is killed (SIGSTOP,
then SIGKILL: a stuck pod that its liveness probe kills; the calls that were on it fail and must be sent
again elsewhere) and later another is told to stop (SIGTERM: a rolling update; it drains). Every text comes
back exactly once, equal to what a server that took no part computes for it, and no error reaches the caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest

from client import AsyncEmbedClient, EmbedClient, EmbeddedBatch, EmbedError, RetryPolicy, StreamStats
from client.retry import Deadline
from tools.servers import RunningServer, ServerProcess, server_processes

STREAMED = 2400  # texts through embed_stream
CHUNK = 16  # texts per stream batch and per unary call
KILL_AT = 30  # stream batches received (of 150) when the first server hangs, to be killed
DRAIN_AT = 75  # ... when the second is told to stop (SIGTERM)
UNARY_WORKERS = 4
BURST = 300  # single-text calls started at once just before the drain
_WORDS = ("river", "granite", "lantern", "orbit", "meadow", "cipher", "harbor", "violet", "thunder", "maple",
          "quartz", "saddle", "ember", "glacier", "pepper", "falcon", "velvet", "compass", "tundra", "walnut")


def _text(kind: str, i: int) -> str:
    w = _WORDS
    return f"{kind} {i}: the {w[i % 20]} near the {w[i // 20 % 20]} {w[i // 400 % 20]} and {w[i * 7 % 20]}"


@dataclass(frozen=True)
class RecordingRetry(RetryPolicy):
    """The client's retry policy, unchanged, noting the code of every failure it is asked about."""

    seen: list[grpc.StatusCode] = field(default_factory=list, compare=False)

    def next_delay(self, error: EmbedError, failures: int, deadline: Deadline) -> float | None:
        self.seen.append(error.code)
        return super().next_delay(error, failures, deadline)


@dataclass
class Outcome:
    batches: list[EmbeddedBatch]
    unary: dict[int, np.ndarray]  # index of a unary call's first text -> its vectors
    stats: StreamStats
    failures_from_kill: int  # failed attempts the client met between the kill and the drain


async def _counts(servers: list[ServerProcess], name: str, **labels: str) -> list[float]:
    return await asyncio.to_thread(lambda: [s.metric(name, **labels) for s in servers])


class _Unary:
    """Unary calls of distinct texts from several tasks; `results` maps a call's first text index to its vectors."""

    def __init__(self, client: AsyncEmbedClient) -> None:
        self.client = client
        self.results: dict[int, np.ndarray] = {}
        self.started = 0
        self._next_text = 0
        self._waiters: list[tuple[int, asyncio.Event]] = []
        self._stop = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []

    async def call(self, size: int = CHUNK) -> None:
        start, self._next_text = self._next_text, self._next_text + size
        self.started += 1
        for count, event in self._waiters:
            if self.started >= count:
                event.set()
        self.results[start] = await self.client.embed([_text("query", i) for i in range(start, start + size)])

    def started_more(self, calls: int) -> asyncio.Event:
        """Set once `calls` more calls have started from now."""
        event = asyncio.Event()
        self._waiters.append((self.started + calls, event))
        return event

    def start(self, workers: int) -> None:
        async def work() -> None:
            while not self._stop.is_set():
                await self.call()

        self._workers = [asyncio.ensure_future(work()) for _ in range(workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._workers)  # raises what any call raised


async def _faults(servers: list[ServerProcess], unary: _Unary, received: asyncio.Condition,
                  batches: list[EmbeddedBatch], retry: RecordingRetry) -> int:
    """servers[0] hangs, then is killed: calls in flight on it fail. Later servers[1] is drained.
    Returns how many failed attempts the client met between the two."""
    async with received:
        await received.wait_for(lambda: len(batches) >= KILL_AT)
    servers[0].send(signal.SIGSTOP)  # a hung server: its connections stay open and calls sent to it wait
    # round_robin gives the hung server one call in three: these calls are on it when it dies (unless every
    # task is already waiting on it, when no call starts at all).
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(unary.started_more(3).wait(), 10)
    servers[0].send(signal.SIGKILL)
    async with received:
        await received.wait_for(lambda: len(batches) >= DRAIN_AT)
    failures_from_kill = len(retry.seen)
    # A burst of calls, half of them on the second server when it stops: those it has not started are
    # refused (UNAVAILABLE from the server, or CANCELLED by grpc core) and go again to the last server.
    burst = [asyncio.ensure_future(unary.call(size=1)) for _ in range(BURST)]
    await asyncio.sleep(0.05)  # for the burst to reach the servers
    servers[1].send(signal.SIGTERM)
    await asyncio.gather(*burst)
    return failures_from_kill


async def _one_stream_each(servers: list[ServerProcess]) -> None:
    """The three streams were opened back to back with every server ready: round_robin gave each one."""
    for _ in range(50):  # a stream reaches its server's handler a moment after the call starts
        streams = await _counts(servers, "nomic_embed_requests_in_flight")
        if streams == [1, 1, 1]:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"streams per server: {streams}")


async def _traffic(servers: list[ServerProcess], retry: RecordingRetry) -> Outcome:
    """Unary calls until round_robin has reached every server; then one stream per server and unary calls
    from several tasks, while servers[0] hangs and is killed and later servers[1] is drained."""
    async with AsyncEmbedClient([s.target for s in servers], retry=retry, timeout=60) as client:
        unary = _Unary(client)
        for _ in range(10):
            for _ in range(3):
                await unary.call()
            if all(await _counts(servers, "nomic_embed_requests_total", method="Embed", code="OK")):
                break
        else:
            pytest.fail("round_robin never sent a call to every server")
        batches: list[EmbeddedBatch] = []
        received = asyncio.Condition()
        faults: asyncio.Future[int] | None = None
        texts = [_text("passage", i) for i in range(STREAMED)]
        stream = client.embed_stream(texts, batch_size=CHUNK, window=6, streams=3, timeout=120)
        try:
            async for batch in stream:
                async with received:
                    batches.append(batch)
                    received.notify_all()
                if faults is None:
                    await _one_stream_each(servers)
                    unary.start(UNARY_WORKERS)
                    faults = asyncio.ensure_future(_faults(servers, unary, received, batches, retry))
            assert faults is not None
            failures_from_kill = await faults
        finally:
            await stream.aclose()
            if faults is not None:
                faults.cancel()  # when the stream failed first
            await unary.stop()  # raises what a unary call raised
        return Outcome(batches, unary.results, stream.stats, failures_from_kill)


def test_every_text_is_embedded_exactly_once_while_servers_die(tiny_original: Path, tmp_path: Path,
                                                                tiny_server: RunningServer) -> None:
    retry = RecordingRetry()
    with server_processes(str(tiny_original), 3, tmp_path) as servers:
        outcome = asyncio.run(_traffic(servers, retry))
        killed, drained = servers[0].wait(30), servers[1].wait(60)
    assert killed == -signal.SIGKILL
    assert drained == 0, servers[1].log_tail()  # a clean drain: what it had admitted, it finished

    # The stream: every batch once, in input order, no holes; every unary call answered.
    assert [b.start for b in outcome.batches] == list(range(0, STREAMED, CHUNK))
    streamed = [t for b in outcome.batches for t in b.texts]
    assert streamed == [_text("passage", i) for i in range(STREAMED)]
    starts = sorted(outcome.unary)
    ends = [s + len(outcome.unary[s]) for s in starts]
    assert starts == [0, *ends[:-1]]  # every call answered, each with as many vectors as it had texts
    # Each text's own vector: the texts are distinct and so are their vectors, so a misplaced one shows.
    texts = streamed + [_text("query", i) for i in range(ends[-1])]
    with tiny_server.client() as reference:
        want = np.concatenate([reference.embed(texts[i:i + 128]) for i in range(0, len(texts), 128)])
    assert len(np.unique(want.round(5), axis=0)) == len(texts)
    got = np.concatenate([b.embeddings for b in outcome.batches] + [outcome.unary[s] for s in starts])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)

    # The faults hit work in flight: the killed server's stream was reopened on another server, and the
    # unary calls that were on it were sent again.
    assert outcome.stats.reopened >= 1, outcome.stats
    assert outcome.failures_from_kill > 0, "no unary call was in flight on the killed server"


def test_a_call_cut_short_by_closing_the_client_is_not_retried(tiny_server: RunningServer) -> None:
    """CANCELLED from a server is retried; the one a blocking call gets when its own client closes is final."""
    retry = RecordingRetry()
    client = EmbedClient(tiny_server.target, retry=retry)
    closer = threading.Timer(0.05, client.close)
    closer.start()
    with pytest.raises(EmbedError) as info:
        client.embed([_text("long call", i) for i in range(2000)])  # seconds of work
    closer.join()
    assert info.value.code is grpc.StatusCode.CANCELLED and retry.seen == [grpc.StatusCode.CANCELLED]
