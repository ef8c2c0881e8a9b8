"""A fake Backend whose output encodes its input, so a misrouted vector fails a test, and helpers to drive a
Batcher over it."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import numpy as np

from server.engine.batcher import Batcher, BatchPolicy
from server.errors import OutOfMemory

POISON = 666  # a token id the fake backend fails on
NAN_TOKEN = 777  # a token id the fake backend gives a NaN vector for


def encode(ids: Sequence[int]) -> np.ndarray:
    """What the fake backend returns for one row: its length and a position-sensitive hash of its ids."""
    digest = sum((i + 1) * t for i, t in enumerate(ids)) % 1_000_003
    return np.array([len(ids), digest], dtype=np.float64)


class FakeBackend:
    """Records every batch; `hold()` makes the next batch wait until `release()`."""

    def __init__(self, seconds_per_batch: float = 0.0, *, is_padded: bool = True,
                 max_batch_rows: int | None = None) -> None:
        self.batches: list[list[list[int]]] = []
        self.seconds_per_batch = seconds_per_batch
        self.is_padded = is_padded
        self.max_batch_rows = max_batch_rows
        self._gate: threading.Event | None = None
        self.entered = threading.Event()

    def hold(self) -> None:
        self._gate = threading.Event()
        self.entered.clear()

    def release(self) -> None:
        assert self._gate is not None
        self._gate.set()

    def run(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        self.batches.append([list(r) for r in rows])
        self.entered.set()
        if self._gate is not None:
            assert self._gate.wait(10), "held batch never released"
            self._gate = None
        time.sleep(self.seconds_per_batch)
        if any(POISON in r for r in rows):
            raise RuntimeError("poisoned row")
        return np.stack([encode(r) for r in rows])

    def healthy(self, rows: Sequence[Sequence[int]]) -> bool:
        return bool(np.isfinite(self.run(rows)).all())

    @property
    def seen(self) -> list[list[int]]:
        return [row for batch in self.batches for row in batch]


class MemoryBoundBackend(FakeBackend):
    """Runs out of memory above `capacity` tokens (counted as `is_padded` says), as a device does."""

    def __init__(self, capacity: int, *, is_padded: bool = True) -> None:
        super().__init__(is_padded=is_padded)
        self.capacity = capacity
        self.refused: list[int] = []  # tokens of each batch that did not fit

    def cost(self, rows: Sequence[Sequence[int]]) -> int:
        return len(rows) * max(map(len, rows)) if self.is_padded else sum(map(len, rows))

    def run(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        if (cost := self.cost(rows)) > self.capacity:
            self.refused.append(cost)
            raise OutOfMemory(f"{cost} tokens")
        return super().run(rows)


class NanBackend(FakeBackend):
    """NaN or infinity for rows with NAN_TOKEN, or for every row of batches that start once `broken`."""

    broken = False

    def run(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        broken = self.broken  # before a held batch waits
        vectors = super().run(rows)
        for i, row in enumerate(rows):
            if broken or NAN_TOKEN in row:
                vectors[i, 1] = np.nan if i % 2 else np.inf
        return vectors


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def rows_of(rng: random.Random, n: int, lengths: tuple[int, int] = (3, 60)) -> list[list[int]]:
    return [[rng.randrange(1000, 30000) for _ in range(rng.randint(*lengths))] for _ in range(n)]


async def started(backend: FakeBackend, policy: BatchPolicy | None = None) -> Batcher:
    batcher = Batcher(backend, policy or BatchPolicy(wait_s=0))
    batcher.start()
    return batcher


async def occupy(batcher: Batcher, backend: FakeBackend) -> asyncio.Future[np.ndarray]:
    """Put the worker on a held batch, so what is submitted next queues up."""
    backend.hold()
    blocker = asyncio.ensure_future(batcher.submit([[1, 2, 3]]).result())
    assert await asyncio.to_thread(backend.entered.wait, 10)
    return blocker


def assert_encodes(vectors: np.ndarray, rows: Sequence[Sequence[int]]) -> None:
    np.testing.assert_array_equal(vectors, np.stack([encode(r) for r in rows]))
