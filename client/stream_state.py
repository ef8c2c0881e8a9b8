"""The state of a bulk embedding stream: its settings and counters, the batches in flight, their errors."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

from client.batching import BatchLimits
from client.errors import EmbedError, status_code
from nomic_embed.v1 import embed_pb2 as pb

_TEXT_FIELD = re.compile(r"texts\[(\d+)\]")


@dataclass(frozen=True)
class StreamSettings:
    limits: BatchLimits = field(default_factory=BatchLimits)  # texts and estimated tokens per batch
    window: int = 4  # batches in flight: sent and not yet handed to the caller
    streams: int = 1  # concurrent streams (one per server behind a round_robin target spreads the load)
    timeout: float | None = None  # seconds for the whole input
    reconnect_timeout: float = 60.0  # how long to wait for a server, counted from the last answer before a break

    def __post_init__(self) -> None:
        if self.window < 1 or self.streams < 1:
            raise ValueError("window and streams must be at least 1")


@dataclass
class StreamStats:
    sent: int = 0  # stream messages written, repeats included
    retried: int = 0  # batches sent again after a retryable error
    reopened: int = 0  # streams opened again after a break


@dataclass(eq=False)
class Batch:
    seq: int
    start: int
    texts: list[str]
    line_numbers: list[int] | None  # of a text file's texts
    failures: int = 0
    away_since: float | None = None  # first UNAVAILABLE answer: those are bounded by time, not by tries


@dataclass(eq=False)
class Run:
    """One stream: the batches it sent and has not answered, and whether it got anywhere."""

    inflight: dict[str, Batch] = field(default_factory=dict)
    leaving: asyncio.Event = field(default_factory=asyncio.Event)  # the server answered UNAVAILABLE: send no more
    taken: int = 0  # batches taken to send (counted before the write, which may fail)
    answered: int = 0  # batches settled: a result or a final error


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

    message = _TEXT_FIELD.sub(with_line, error.message)
    if not error.field.startswith("texts"):  # not about one text: say which batch it was
        message = f"batch of texts[{batch.start}..{batch.start + len(batch.texts) - 1}]: {message}"
    retry_after = error.retry_delay.ToNanoseconds() / 1e9 if error.HasField("retry_delay") else None
    return EmbedError(status_code(error.code), message, field=_TEXT_FIELD.sub(whole_input, error.field),
                      retry_after_s=retry_after)
