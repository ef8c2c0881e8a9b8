"""The state of a bulk embedding stream: its settings and counters, the batches in flight, their errors."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from client.batching import BatchLimits
from client.errors import EmbedError, status_code
from client.results import EmbeddedBatch
from client.retry import Deadline, RetryPolicy
from nomic_embed.v1 import embed_pb2 as pb

_TEXT_FIELD = re.compile(r"texts\[(\d+)\]")


@dataclass(frozen=True)
class StreamSettings:
    limits: BatchLimits = field(default_factory=BatchLimits)  # texts and estimated tokens per batch
    window: int = 4  # batches in flight: sent and not yet handed to the caller
    streams: int = 1  # concurrent streams (one per server behind a round_robin target spreads the load)
    timeout: float | None = None  # seconds for the whole input
    reconnect_timeout: float = 60.0  # how long to wait for a server, counted from the last answer before a break
    # With batches in flight, this long without an answer counts as a break (None: wait, as for a deep queue).
    answer_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.window < 1 or self.streams < 1:
            raise ValueError("window and streams must be at least 1")


@dataclass
class StreamStats:
    sent: int = 0  # stream messages written, repeats included
    retried: int = 0  # batches sent again after a retryable error
    reopened: int = 0  # streams opened again after a break
    split: int = 0  # batches (or parts) sent again as two halves: the server refused them as too large


@dataclass(eq=False)
class Batch:
    seq: int
    start: int
    texts: list[str]
    line_numbers: list[int] | None  # of a text file's texts
    failures: int = 0
    # When the first UNAVAILABLE and the first RESOURCE_EXHAUSTED answer came: those are retried for a time, not
    # a number of tries.
    first_refused: dict[grpc.StatusCode, float] = field(default_factory=dict)
    # Where a part of batch `seq` lies in it, once the server refused the whole as too large: (0,) is its
    # first half, (1, 0) the first half of its second half; () for a batch sent whole.
    part: tuple[int, ...] = ()

    def refused_for(self, code: grpc.StatusCode) -> float:
        """Seconds since the batch's first answer of `code` (0 for this one, when it is the first)."""
        now = time.monotonic()
        return now - self.first_refused.setdefault(code, now)

    def busy_delay(self, error: EmbedError, retry: RetryPolicy, deadline: Deadline, patience_s: float) -> float | None:
        """The wait before sending the batch again after the server refused it as overloaded (its hint, else a
        backoff), or None once such answers have gone on for `patience_s`: a bulk run rides out a busy server
        however many tries that takes (its hints can be 50 ms apart), as it rides out a restart."""
        if self.refused_for(grpc.StatusCode.RESOURCE_EXHAUSTED) >= patience_s:
            return None
        delay = retry.delay(self.failures, error.retry_after_s)
        return delay if deadline.allows(delay) else None

    @property
    def key(self) -> tuple[int, tuple[int, ...]]:
        """The work queue's order: input order, parts included."""
        return self.seq, self.part

    @property
    def message_id(self) -> str:
        return ".".join(map(str, (self.seq, *self.part)))

    def halves(self) -> tuple[Batch, Batch]:
        middle = len(self.texts) // 2
        numbers = self.line_numbers
        return (Batch(self.seq, self.start, self.texts[:middle], numbers and numbers[:middle], part=(*self.part, 0)),
                Batch(self.seq, self.start + middle, self.texts[middle:], numbers and numbers[middle:],
                      part=(*self.part, 1)))


def too_large(batch: Batch, error: pb.StreamError) -> bool:
    """Whether the server refused `batch` as a whole for a per-request limit (texts, tokens or bytes: the
    field is `texts` itself, not one text's), which its halves may meet."""
    return (len(batch.texts) > 1 and status_code(error.code) is grpc.StatusCode.INVALID_ARGUMENT
            and error.field == "texts")


class Parts:
    """Batches the server refused as too large, by seq: their parts, each with its answer once it has one."""

    def __init__(self) -> None:
        self._parts: dict[int, dict[tuple[int, ...], EmbeddedBatch | None]] = {}

    def split(self, batch: Batch) -> tuple[Batch, Batch]:
        """`batch` (or a part of one) as two halves, to send in its place."""
        parts = self._parts.setdefault(batch.seq, {})
        parts.pop(batch.part, None)
        halves = batch.halves()
        for half in halves:
            parts[half.part] = None
        return halves

    def ended(self, batch: Batch) -> bool:
        """Whether `batch` is a part of a batch that has its answer already (another part's error)."""
        return bool(batch.part) and batch.seq not in self._parts

    def settle(self, part: Batch, result: EmbeddedBatch | EmbedError) -> EmbeddedBatch | EmbedError | None:
        """A part's answer: the whole batch's once every part has one (or this one failed); else None, as for a
        part of a batch that already ended with another part's error."""
        parts = self._parts.get(part.seq)
        if parts is None:
            return None
        if isinstance(result, EmbeddedBatch):
            parts[part.part] = result
            if any(answer is None for answer in parts.values()):
                return None
            result = _joined([answer for _, answer in sorted(parts.items()) if answer is not None])
        del self._parts[part.seq]
        return result


def _joined(parts: list[EmbeddedBatch]) -> EmbeddedBatch:
    """The parts of one batch, in input order, as the batch."""
    first = parts[0]
    numbers = None if first.line_numbers is None else [n for p in parts for n in p.line_numbers or ()]
    return EmbeddedBatch(first.start, [t for p in parts for t in p.texts],
                         np.concatenate([p.embeddings for p in parts]), [n for p in parts for n in p.tokens],
                         numbers, *first.model)


@dataclass(eq=False)
class Run:
    """One stream: the batches it sent and has not answered, and whether it got anywhere."""

    inflight: dict[str, Batch] = field(default_factory=dict)
    leaving: asyncio.Event = field(default_factory=asyncio.Event)  # the server answered UNAVAILABLE: send no more
    taken: int = 0  # batches taken to send (counted before the write, which may fail)
    answered: int = 0  # batches settled: a result or a final error
    quiet_since: float = 0.0  # the last answer, or the send that put a batch in flight after none were

    def sending(self, batch: Batch) -> None:
        if not self.inflight:
            self.quiet_since = time.monotonic()
        self.inflight[batch.message_id] = batch
        self.taken += 1

    async def read(self, call: grpc.aio.StreamStreamCall, patience_s: float | None) -> Any:
        """The call's next message (or EOF); TimeoutError once batches have been in flight for `patience_s` with
        no answer: a server whose process answers pings but not the stream (a stuck model)."""
        if patience_s is None:  # unbounded (the default): no task or wait per message
            return await call.read()
        read = asyncio.ensure_future(call.read())
        try:
            while not read.done():
                left = patience_s
                if self.inflight:
                    left = patience_s - (time.monotonic() - self.quiet_since)
                    if left <= 0:
                        raise TimeoutError
                await asyncio.wait({read}, timeout=left)  # woken by the answer, or to look again
        finally:
            read.cancel()
        self.quiet_since = time.monotonic()
        return read.result()


@dataclass
class Outage:
    """Consecutive stream breaks with no answer in between."""

    since: float  # the break that started it
    breaks: int = 0
    strikes: int = 0  # breaks that count against RetryPolicy.max_attempts


def batch_error(batch: Batch, error: pb.StreamError) -> EmbedError:
    """The server's error for one batch, with text indexes counted from the start of the whole input."""

    def whole_input(match: re.Match[str]) -> str:
        return f"texts[{batch.start + int(match.group(1))}]"

    def with_line(match: re.Match[str]) -> str:
        index = int(match.group(1))
        if batch.line_numbers is None or index >= len(batch.line_numbers):
            return whole_input(match)
        return f"{whole_input(match)} (line {batch.line_numbers[index]})"

    message, field = error.message, error.field
    if field == "texts" and len(batch.texts) == 1:  # a per-request limit one text exceeds alone: that text's
        field = "texts[0]"
        reason = message.removeprefix("texts: ").split("; split the batch")[0]  # no split can help it
        message = f"texts[0]: {reason}, with this text alone"
    message = _TEXT_FIELD.sub(with_line, message)
    if not field.startswith("texts["):  # not about one text: say which batch it was
        message = f"batch of texts[{batch.start}..{batch.start + len(batch.texts) - 1}]: {message}"
    retry_after = error.retry_delay.ToNanoseconds() / 1e9 if error.HasField("retry_delay") else None
    return EmbedError(status_code(error.code), message, field=_TEXT_FIELD.sub(whole_input, field),
                      retry_after_s=retry_after)

