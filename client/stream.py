"""Bulk embedding over the bidirectional EmbedStream RPC, for asyncio.

Texts are cut into batches (client.batching) and written to one or more streams. At most `window` batches are
between being sent and being handed to the caller, so a slow server stops the reading of input and a slow consumer
stops the sending (backpressure both ways); results come back in input order. A batch the server answers with
RESOURCE_EXHAUSTED is sent again after a backoff (the server's retry hint when it gives one), until such answers
have gone on for `reconnect_timeout`. UNAVAILABLE means that this server cannot serve now (it is shutting down, or
still loading): the stream sends it nothing more, closes once the batches it holds are answered, and the batch goes
out again on a new stream (on another server, behind a balanced target). When a whole stream breaks, for instance
because its server was killed or restarted, a new one is opened and every batch the old one left unanswered is sent
again: each batch is yielded exactly once, so nothing is lost or duplicated. Once any batch has been answered, a
server that is away (stopped, restarting, refusing connections) is waited for until no batch has been answered for
`reconnect_timeout` (a minute). Every answer must come from the model, variant and weights of the first (a server
replaced by one of another model, or of other weights under the same name, fails the run with FAILED_PRECONDITION),
and must hold one vector per text of the width asked for (DATA_LOSS otherwise).

A text file (any io.TextIOBase: open(path), sys.stdin, io.StringIO) gives its lines without their line ends
and without a UTF-8 byte order mark; lines end at "\n" or "\r\n" only, a lone "\r" is part of its line (a
file not read yet is switched to newline="\n": see client.files.text_lines). Blank lines are skipped, and each
EmbeddedBatch says which line of the file each of its texts came from (`line_numbers`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import itertools
import time
from collections.abc import AsyncIterable, Iterable, Sequence

import grpc

from client.batching import batches
from client.checks import ModelGuard, checked_embeddings, served_model
from client.errors import EmbedError, client_closed, from_rpc_error, status_code
from client.files import numbered, text_lines
from client.options import EmbedOptions, ordered
from client.results import EmbeddedBatch
from client.retry import Deadline, RetryPolicy
from client.stream_state import Batch, Outage, Parts, Run, StreamSettings, StreamStats, batch_error, too_large
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc

# How a stream may end that a new stream can recover from. A server shutting down cancels its streams
# (CANCELLED, not ours: we never see our own cancellation as a status) and a write that meets the torn-down
# transport ends the call with INTERNAL "Internal error from Core" on the client's side. How long a stream
# that keeps failing is tried again depends on the code (_AWAY below).
_REOPEN = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED,
                     grpc.StatusCode.ABORTED, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
# The server is away or going away (stopped, draining, restarting, loading, refusing connections): after a
# stream that worked, these are retried for up to `reconnect_timeout`, however many tries that takes, so that
# a restart of the only server is ridden out. The other codes above may be a fault that repeats: they get
# RetryPolicy.max_attempts tries, as does everything before the first answer (a wrong address fails fast).
_AWAY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
_CLOSE_GRACE_S = 5.0  # for the server to close a finished stream before it is cancelled


class AsyncEmbedStream:
    """Async iterator of EmbeddedBatch in input order; `aclose()` (or `async with`) cancels what is left.

    Made by AsyncEmbedClient.embed_stream; the blocking client wraps it (client.blocking.EmbedStream).
    """

    def __init__(self, channel: grpc.aio.Channel, texts: Iterable[str] | AsyncIterable[str],
                 options: EmbedOptions, settings: StreamSettings, retry: RetryPolicy,
                 metadata: Sequence[tuple[str, str]] = (), loop: asyncio.AbstractEventLoop | None = None) -> None:
        if isinstance(texts, (str, bytes, bytearray)):
            raise TypeError(f"texts must be an iterable of str, not one {type(texts).__name__}")
        ordered(texts)
        self._line_numbers: collections.deque[int] | None = None
        if isinstance(texts, io.IOBase):
            if not isinstance(texts, io.TextIOBase):
                raise TypeError("texts is a binary file: open it in text mode, e.g. open(path, encoding='utf-8')")
            self._line_numbers = collections.deque()
            texts = numbered(text_lines(texts), self._line_numbers.append)
        self._channel = channel
        self._loop = loop  # the channel's, which alone can run its calls; else the loop that first iterates
        self._stub = embed_pb2_grpc.EmbedServiceStub(channel)
        self._texts = texts
        self._options = options
        self._limits = settings.limits
        self._streams = settings.streams
        self._retry = retry
        self._deadline = Deadline(settings.timeout)
        self._reconnect_timeout, self._answer_timeout = settings.reconnect_timeout, settings.answer_timeout
        self._metadata = tuple(metadata)
        self.stats = StreamStats()
        self._model = ModelGuard()  # every answer must come from the first answer's model, variant and weights
        self._window = asyncio.Semaphore(settings.window)  # batches sent and not yet handed to the caller
        # Batches to send, in input order; the serial number keeps batches themselves from being compared.
        self._work: asyncio.PriorityQueue[tuple[tuple[int, tuple[int, ...]], int, Batch | None]]
        self._work = asyncio.PriorityQueue()
        self._serial = itertools.count()
        self._results: dict[int, EmbeddedBatch | EmbedError] = {}
        self._parts = Parts()  # of batches the server refused as too large
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
        running = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = running
        elif running is not self._loop:
            raise RuntimeError("this stream is iterated in another event loop than its client's channel runs "
                               "on; iterate it in the loop that made it")
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
        error = None if task.cancelled() else task.exception()  # retrieved: a second failure is not "never retrieved"
        if self._closed:
            return
        self._tasks.discard(task)
        if self._failure is not None:
            return
        if task.cancelled() or isinstance(error, grpc.aio.UsageError):
            # Cancelled, not by aclose (which marks the stream closed first), or "Channel is closed": client closed
            self._failure = client_closed()
            self._changed.set()
        elif error is not None:
            self._failure = error
            self._changed.set()

    async def _feed(self) -> None:
        seq = 0
        async for start, texts in batches(self._texts, self._limits):
            # Batching reads one text past a batch's end, so the oldest numbers are this batch's.
            numbers = None if self._line_numbers is None else [self._line_numbers.popleft() for _ in texts]
            await self._window.acquire()
            self._queue(Batch(seq, start, texts, numbers))
            seq += 1
        self._total = seq
        self._check_all_answered()
        self._changed.set()

    async def _lane(self) -> None:
        """One stream at a time: open, send and receive until done; after a break, open a new one."""
        outage: Outage | None = None
        while True:
            run = Run()
            error = await self._run_stream(run)
            if error is None or self._all_answered():
                return
            if outage is None or run.answered or not run.taken:
                # The stream that broke was answered, or had nothing to send: this break starts an outage.
                outage = Outage(since=time.monotonic())
            await self._wait_to_reopen(error, outage)
            self.stats.reopened += 1

    async def _wait_to_reopen(self, error: EmbedError, outage: Outage) -> None:
        """Back off; once a server has answered, also wait for the channel to connect again: a server that is
        down refuses connections, and retrying at once would spend the tries in a moment."""
        if error.code not in _REOPEN:
            raise EmbedError(error.code, f"the stream failed: {error.details}", field=error.field)
        outage.breaks += 1
        served = self._answered > 0 or self.stats.split > 0  # else the address may be wrong: fail fast
        if error.code not in _AWAY or not served:
            outage.strikes += 1
            if outage.strikes >= self._retry.max_attempts:
                raise EmbedError(error.code, f"the stream failed: {error.details}", field=error.field)
        left = self._reconnect_timeout - (time.monotonic() - outage.since)
        if left <= 0:
            raise self._no_server(error)
        delay = min(self._retry.delay(outage.breaks, error.retry_after_s), left)
        if not self._deadline.allows(delay):
            raise self._deadline.expired_error(f"while reopening the stream after {error}")
        await asyncio.sleep(delay)
        if not served:
            return
        left = self._reconnect_timeout - (time.monotonic() - outage.since)
        remaining = self._deadline.remaining()
        try:
            await asyncio.wait_for(self._channel.channel_ready(), max(0.0, left if remaining is None
                                                                       else min(remaining, left)))
        except TimeoutError:
            if remaining is not None and remaining < left:
                raise self._deadline.expired_error(f"while waiting for a server after {error}") from None
            raise self._no_server(error) from None

    def _no_server(self, error: EmbedError) -> EmbedError:
        return EmbedError(grpc.StatusCode.UNAVAILABLE, f"no server answered the stream for "
                                                       f"{self._reconnect_timeout:.0f}s ({error})")

    async def _run_stream(self, run: Run) -> EmbedError | None:
        """One stream until it ends: None when all work is done, else how it broke (its batches requeued)."""
        call = self._stub.EmbedStream(timeout=self._deadline.remaining(), metadata=self._metadata)
        inflight, leaving = run.inflight, run.leaving
        receiver = asyncio.ensure_future(self._receive(call, run))
        sender = asyncio.ensure_future(self._send(call, run))
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
            except TimeoutError:  # batches in flight and no answer for answer_timeout: reopen (a restart may heal it)
                return self._requeue(inflight, EmbedError(grpc.StatusCode.UNAVAILABLE, f"the server answered "
                                                          f"nothing for {self._answer_timeout:g}s"))
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

    def _queue(self, batch: Batch) -> None:
        self._work.put_nowait((batch.key, next(self._serial), batch))

    def _requeue(self, inflight: dict[str, Batch], error: EmbedError) -> EmbedError:
        for batch in inflight.values():
            self._queue(batch)
        inflight.clear()
        return error

    async def _send(self, call: grpc.aio.StreamStreamCall, run: Run) -> None:
        """Write batches until every batch is answered or the server cannot serve; then close our side."""
        while (batch := await self._next_batch(run.leaving)) is not None:
            if self._parts.ended(batch):
                continue
            run.sending(batch)
            await call.write(pb.EmbedStreamRequest(id=batch.message_id, request=self._options.request(batch.texts)))
            self.stats.sent += 1
        await call.done_writing()

    async def _next_batch(self, leaving: asyncio.Event) -> Batch | None:
        """The next batch to send; None once every batch is answered or when `leaving` is set."""
        if leaving.is_set():
            return None
        get = asyncio.ensure_future(self._work.get())
        stop = asyncio.ensure_future(leaving.wait())
        keep = False
        try:
            await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
            keep = get.done() and not leaving.is_set()
            return get.result()[-1] if keep else None
        finally:
            stop.cancel()
            if not get.cancel() and not keep:  # taken from the queue but not sent here (or we were cancelled)
                self._work.put_nowait(get.result())

    async def _receive(self, call: grpc.aio.StreamStreamCall, run: Run) -> None:
        while (message := await run.read(call, self._answer_timeout)) is not grpc.aio.EOF:
            batch = run.inflight.pop(message.id, None)
            if batch is None:
                raise EmbedError(grpc.StatusCode.INTERNAL, f"the server answered unknown stream id {message.id!r}")
            if message.HasField("error") and status_code(message.error.code) is grpc.StatusCode.UNAVAILABLE:
                run.leaving.set()  # e.g. shutting down: the batch goes out again, on a new stream
            if self._settle(batch, message):
                run.answered += 1

    def _settle(self, batch: Batch, message: pb.EmbedStreamResponse) -> bool:
        """Record a batch's answer; False when the batch is to be sent again."""
        if self._parts.ended(batch):  # a part of a batch another part's error ended: nothing more to do
            return True
        if message.HasField("response"):
            response = message.response
            vectors = checked_embeddings(response, len(batch.texts), self._options)  # a faulty answer ends the run
            self._model.check(response)
            result: EmbeddedBatch | EmbedError = EmbeddedBatch(
                batch.start, batch.texts, vectors, [e.tokens for e in response.embeddings], batch.line_numbers,
                *served_model(response))
        else:
            result = batch_error(batch, message.error)
            if result.code is grpc.StatusCode.UNAVAILABLE and self._away_retry(batch):
                return False
            if too_large(batch, message.error):  # a server whose limits are below our batches: halve it
                for half in self._parts.split(batch):
                    self._queue(half)
                self.stats.split += 1
                return True
            batch.failures += 1
            delay = (batch.busy_delay(result, self._retry, self._deadline, self._reconnect_timeout)
                     if result.code is grpc.StatusCode.RESOURCE_EXHAUSTED
                     else self._retry.next_delay(result, batch.failures, self._deadline))
            if delay is not None:
                self.stats.retried += 1
                self._spawn(self._requeue_later(batch, delay))
                return False
        self._resolve(batch, result)
        return True

    def _resolve(self, batch: Batch, result: EmbeddedBatch | EmbedError) -> None:
        """A batch's final answer, or a part's: a split batch is answered once all its parts are, or one fails."""
        if batch.part:
            if (whole := self._parts.settle(batch, result)) is None:
                return
            result = whole
        self._results[batch.seq] = result
        self._answered += 1
        self._check_all_answered()
        self._changed.set()

    def _away_retry(self, batch: Batch) -> bool:
        """Queue a batch the server answered UNAVAILABLE (stopping, restarting, loading) for the next stream,
        whose opening waits for a server, unless such answers have gone on for `reconnect_timeout`: a restart
        takes no count of tries from the batch."""
        if batch.refused_for(grpc.StatusCode.UNAVAILABLE) >= self._reconnect_timeout:
            return False
        self.stats.retried += 1
        self._queue(batch)
        return True

    async def _requeue_later(self, batch: Batch, delay: float) -> None:
        await asyncio.sleep(delay)
        self._queue(batch)

    def _all_answered(self) -> bool:
        return self._total is not None and self._answered == self._total

    def _check_all_answered(self) -> None:
        """Once every batch has its answer, let each stream close its sending side (sorted after any batch)."""
        if self._all_answered():
            for seq in itertools.islice(itertools.count(self._total), self._streams):
                self._work.put_nowait(((seq, ()), next(self._serial), None))

    async def _finish(self) -> None:
        """All results are out: give the streams a moment to close cleanly, then release everything."""
        remaining = self._deadline.remaining()
        try:
            with contextlib.suppress(TimeoutError, EmbedError, grpc.RpcError):
                await asyncio.wait_for(asyncio.gather(*self._lanes),
                                       _CLOSE_GRACE_S if remaining is None else min(remaining, _CLOSE_GRACE_S))
        finally:
            await self.aclose()

