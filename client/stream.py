"""Bulk embedding over the bidirectional EmbedStream RPC, for asyncio.

Texts are cut into batches (client.batching) and written to one or more streams. At most `window`
batches are between being sent and being handed to the caller, so a slow server stops the reading of
input and a slow consumer stops the sending (backpressure both ways); results come back in input
order. A batch the server answers with UNAVAILABLE or RESOURCE_EXHAUSTED is sent again after a backoff
(the server's retry hint when it gives one). UNAVAILABLE also means that this server cannot serve now (it is
shutting down): the stream sends it nothing more, closes once the batches it holds are answered, and a new
stream is opened (on another server, behind a balanced target). When a whole stream breaks, for instance
because its server was killed or restarted, a new one is opened and every batch the old one left unanswered
is sent again: each batch is yielded exactly once, so nothing is lost or duplicated.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import AsyncIterable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc

from client.batching import BatchLimits, batches
from client.errors import EmbedError, from_rpc_error, status_code
from client.options import EmbedOptions
from client.results import EmbeddedBatch, decode_embeddings
from client.retry import Deadline, RetryPolicy
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc

# How a stream may end that a new stream can recover from. A server shutting down cancels its streams
# (CANCELLED, not ours: we never see our own cancellation as a status) and a write that meets the torn-down
# transport ends the call with INTERNAL "Internal error from Core" on the client's side. A stream that
# keeps failing without progress still gives up after RetryPolicy.max_attempts.
_REOPEN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
                     grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
_CLOSE_GRACE_S = 5.0  # for the server to close a finished stream before it is cancelled
_TEXT_FIELD = re.compile(r"texts\[(\d+)\]")


@dataclass(frozen=True)
class StreamSettings:
    limits: BatchLimits = field(default_factory=BatchLimits)  # texts and estimated tokens per batch
    window: int = 4  # batches in flight: sent and not yet handed to the caller
    streams: int = 1  # concurrent streams (one per server behind a round_robin target spreads the load)
    timeout: float | None = None  # seconds for the whole input
    reconnect_timeout: float = 60.0  # how long to wait for a server after a stream broke

    def __post_init__(self) -> None:
        if self.window < 1 or self.streams < 1:
            raise ValueError("window and streams must be at least 1")


@dataclass
class StreamStats:
    sent: int = 0  # stream messages written, repeats included
    retried: int = 0  # batches sent again after a retryable error
    reopened: int = 0  # streams opened again after a break


@dataclass(eq=False)
class _Batch:
    seq: int
    start: int
    texts: list[str]
    failures: int = 0


class AsyncEmbedStream:
    """Async iterator of EmbeddedBatch in input order; `aclose()` (or `async with`) cancels what is left.

    Made by AsyncEmbedClient.embed_stream; the blocking client wraps it (client.blocking.EmbedStream).
    """

    def __init__(self, channel: grpc.aio.Channel, texts: Iterable[str] | AsyncIterable[str],
                 options: EmbedOptions, settings: StreamSettings, retry: RetryPolicy,
                 metadata: Sequence[tuple[str, str]] = ()) -> None:
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of str, not one str")
        self._channel = channel
        self._stub = embed_pb2_grpc.EmbedServiceStub(channel)
        self._texts = texts
        self._options = options
        self._limits = settings.limits
        self._streams = settings.streams
        self._retry = retry
        self._deadline = Deadline(settings.timeout)
        self._reconnect_timeout = settings.reconnect_timeout
        self._metadata = tuple(metadata)
        self.stats = StreamStats()
        self._window = asyncio.Semaphore(settings.window)  # batches sent and not yet handed to the caller
        self._work: asyncio.PriorityQueue[tuple[int, _Batch | None]] = asyncio.PriorityQueue()
        self._results: dict[int, EmbeddedBatch | EmbedError] = {}
        self._answered = 0
        self._total: int | None = None  # batches in the input, once it is read to the end
        self._next = 0  # the next batch to hand out
        self._changed = asyncio.Event()
        self._failure: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._lanes: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False

    def __aiter__(self) -> AsyncEmbedStream:
        return self

    async def __aenter__(self) -> AsyncEmbedStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def __anext__(self) -> EmbeddedBatch:
        if self._closed:
            raise StopAsyncIteration
        self._start()
        while True:
            if self._next in self._results:
                item = self._results.pop(self._next)
                self._next += 1
                self._window.release()
                if isinstance(item, EmbedError):
                    await self.aclose()
                    raise item
                return item
            if self._failure is not None:
                await self.aclose()
                raise self._failure
            if self._total is not None and self._next >= self._total:
                await self._finish()
                raise StopAsyncIteration
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), self._deadline.remaining())
            except TimeoutError:
                await self.aclose()
                raise self._deadline.expired_error(f"with {self._next} batches of the stream done") from None

    async def aclose(self) -> None:
        """Cancel the streams and everything in flight; idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    # -- the background work ------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._started:
            return
        self._started = True
        self._spawn(self._feed())
        self._lanes = [self._spawn(self._lane()) for _ in range(self._streams)]

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._closed:
            return
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()
            self._changed.set()

    async def _feed(self) -> None:
        seq = 0
        async for start, texts in batches(self._texts, self._limits):
            await self._window.acquire()
            self._work.put_nowait((seq, _Batch(seq, start, texts)))
            seq += 1
        self._total = seq
        self._check_all_answered()
        self._changed.set()

    async def _lane(self) -> None:
        """One stream at a time: open, send and receive until done; after a break, open a new one."""
        failures = 0
        while True:
            answered_before = self._answered
            error = await self._run_stream()
            if error is None or self._all_answered():
                return
            progressed = self._answered > answered_before
            failures = 1 if progressed else failures + 1
            await self._wait_to_reopen(error, failures, wait_for_server=progressed)
            self.stats.reopened += 1

    async def _wait_to_reopen(self, error: EmbedError, failures: int, *, wait_for_server: bool) -> None:
        """Back off; after a stream that was working, also wait for a server to be back (a restart)."""
        if error.code not in _REOPEN or failures >= self._retry.max_attempts:
            raise EmbedError(error.code, f"the stream failed: {error.details}", field=error.field)
        delay = self._retry.delay(failures, error.retry_after_s)
        if not self._deadline.allows(delay):
            raise self._deadline.expired_error(f"while reopening the stream after {error}")
        await asyncio.sleep(delay)
        if not wait_for_server:
            return
        remaining = self._deadline.remaining()
        timeout = self._reconnect_timeout if remaining is None else min(remaining, self._reconnect_timeout)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            raise EmbedError(grpc.StatusCode.UNAVAILABLE, f"no server was ready {timeout:.0f}s after the stream "
                                                          f"broke ({error})") from None

    async def _run_stream(self) -> EmbedError | None:
        """One stream until it ends: None when all work is done, else how it broke (its batches requeued)."""
        call = self._stub.EmbedStream(timeout=self._deadline.remaining(), metadata=self._metadata)
        inflight: dict[str, _Batch] = {}
        leaving = asyncio.Event()  # set when the server answers UNAVAILABLE: send it nothing more
        receiver = asyncio.ensure_future(self._receive(call, inflight, leaving))
        sender = asyncio.ensure_future(self._send(call, inflight, leaving))
        try:
            done, _ = await asyncio.wait({receiver, sender}, return_when=asyncio.FIRST_COMPLETED)
            failed = sender.exception() if sender in done else None
            if failed is not None and not isinstance(failed, grpc.RpcError | asyncio.InvalidStateError):
                raise failed  # a bug, not a broken stream
            try:
                await receiver  # the receiver ends with the call and sees its status
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise self._deadline.expired_error(f"with {self._next} batches of the stream done") from None
                return self._requeue(inflight, from_rpc_error(exc))
            if sender.done() and sender.exception() is None:
                if leaving.is_set():  # we closed our side early; the server answered what it held
                    return self._requeue(inflight, EmbedError(grpc.StatusCode.UNAVAILABLE,
                                                              "the server could not serve the stream"))
                return None  # we closed our side after the last answer, then the server closed its side
            return self._requeue(inflight, EmbedError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream"))
        finally:
            for task in (receiver, sender):
                task.cancel()
            call.cancel()
            await asyncio.gather(receiver, sender, return_exceptions=True)

    def _requeue(self, inflight: dict[str, _Batch], error: EmbedError) -> EmbedError:
        for batch in inflight.values():
            self._work.put_nowait((batch.seq, batch))
        inflight.clear()
        return error

    async def _send(self, call: grpc.aio.StreamStreamCall, inflight: dict[str, _Batch], leaving: asyncio.Event
                    ) -> None:
        """Write batches until every batch is answered or the server cannot serve; then close our side."""
        while (batch := await self._next_batch(leaving)) is not None:
            inflight[str(batch.seq)] = batch
            await call.write(pb.EmbedStreamRequest(id=str(batch.seq), request=self._options.request(batch.texts)))
            self.stats.sent += 1
        await call.done_writing()

    async def _next_batch(self, leaving: asyncio.Event) -> _Batch | None:
        """The next batch to send; None once every batch is answered or when `leaving` is set."""
        if leaving.is_set():
            return None
        get = asyncio.ensure_future(self._work.get())
        stop = asyncio.ensure_future(leaving.wait())
        keep = False
        try:
            await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            keep = get.done() and not leaving.is_set()
            return get.result()[1] if keep else None
        finally:
            stop.cancel()
            if not get.cancel() and not keep:  # taken from the queue but not sent here (or we were cancelled)
                self._work.put_nowait(get.result())

    async def _receive(self, call: grpc.aio.StreamStreamCall, inflight: dict[str, _Batch],
                       leaving: asyncio.Event) -> None:
        while (message := await call.read()) is not grpc.aio.EOF:
            batch = inflight.pop(message.id, None)
            if batch is None:
                raise EmbedError(grpc.StatusCode.INTERNAL, f"the server answered unknown stream id {message.id!r}")
            if message.HasField("error") and status_code(message.error.code) is grpc.StatusCode.UNAVAILABLE:
                leaving.set()  # e.g. shutting down: the batch goes out again, on a new stream
            self._settle(batch, message)

    def _settle(self, batch: _Batch, message: pb.EmbedStreamResponse) -> None:
        if message.HasField("response"):
            response = message.response
            result: EmbeddedBatch | EmbedError = EmbeddedBatch(
                batch.start, batch.texts, decode_embeddings(response), [e.tokens for e in response.embeddings])
        else:
            result = _batch_error(batch, message.error)
            batch.failures += 1
            delay = self._retry.next_delay(result, batch.failures, self._deadline)
            if delay is not None:
                self.stats.retried += 1
                self._spawn(self._requeue_later(batch, delay))
                return
        self._results[batch.seq] = result
        self._answered += 1
        self._check_all_answered()
        self._changed.set()

    async def _requeue_later(self, batch: _Batch, delay: float) -> None:
        await asyncio.sleep(delay)
        self._work.put_nowait((batch.seq, batch))

    def _all_answered(self) -> bool:
        return self._total is not None and self._answered == self._total

    def _check_all_answered(self) -> None:
        """Once every batch has its answer, let each stream close its sending side (sorted after any batch)."""
        if self._all_answered():
            for seq in itertools.islice(itertools.count(self._total), self._streams):
                self._work.put_nowait((seq, None))

    async def _finish(self) -> None:
        """All results are out: give the streams a moment to close cleanly, then release everything."""
        remaining = self._deadline.remaining()
        try:
            with contextlib.suppress(TimeoutError, EmbedError, grpc.RpcError):
                await asyncio.wait_for(asyncio.gather(*self._lanes),
                                       _CLOSE_GRACE_S if remaining is None else min(remaining, _CLOSE_GRACE_S))
        finally:
            await self.aclose()


def _batch_error(batch: _Batch, error: pb.StreamError) -> EmbedError:
    """The server's error for one batch, with text indexes counted from the start of the whole input."""

    def whole_input(match: re.Match[str]) -> str:
        return f"texts[{batch.start + int(match.group(1))}]"

    message = _TEXT_FIELD.sub(whole_input, error.message)
    if not error.field.startswith("texts"):  # not about one text: say which batch it was
        message = f"batch of texts[{batch.start}..{batch.start + len(batch.texts) - 1}]: {message}"
    retry_after = error.retry_delay.ToNanoseconds() / 1e9 if error.HasField("retry_delay") else None
    return EmbedError(status_code(error.code), message, field=_TEXT_FIELD.sub(whole_input, error.field),
                      retry_after_s=retry_after)
