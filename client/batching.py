"""Split a stream of texts into requests, bounded by count and by estimated tokens."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass

from client.options import checked_text

# BERT word pieces average about 4 characters of English; the special tokens and a task prefix add ~8.
CHARS_PER_TOKEN = 4
OVERHEAD_TOKENS = 8


def estimate_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + OVERHEAD_TOKENS


@dataclass(frozen=True)
class BatchLimits:
    max_texts: int = 64
    max_tokens: int = 8192  # estimated; a single longer text still goes, alone

    def __post_init__(self) -> None:
        if self.max_texts < 1 or self.max_tokens < 1:
            raise ValueError("batches need room for at least one text and one token")


async def batches(texts: Iterable[str] | AsyncIterable[str], limits: BatchLimits
                  ) -> AsyncIterator[tuple[int, list[str]]]:
    """(index of the first text, texts) per batch, in input order.

    A plain iterable is read on the event loop: fine for lists and files, while a slow producer (a
    network source) should be an async iterable so that it does not hold up the loop.
    """
    batch: list[str] = []
    tokens = 0
    index = 0
    async for text in _aiter(texts):
        checked_text(index, text)
        cost = estimate_tokens(text)
        if batch and (len(batch) == limits.max_texts or tokens + cost > limits.max_tokens):
            yield index - len(batch), batch
            batch, tokens = [], 0
        batch.append(text)
        tokens += cost
        index += 1
    if batch:
        yield index - len(batch), batch


async def _aiter(texts: Iterable[str] | AsyncIterable[str]) -> AsyncIterator[str]:
    if isinstance(texts, AsyncIterable):
        async for text in texts:
            yield text
    else:
        for text in texts:
            yield text
