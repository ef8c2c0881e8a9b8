"""A job is one request's rows waiting for their vectors; a row is one of them, as the queue holds it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from server.engine.matryoshka import Finish


@dataclass(eq=False)
class Job:
    """The rows of one request. Await `result()` for its vectors in row order.

    Its future is created, completed and cancelled only on the event loop (the worker thread posts results
    there). The worker thread reads `deadline`, `cancelled` and `failed`, and sets `started` and `failed`
    itself; each only ever goes from unset to set, so they need no lock.
    """

    rows: int
    deadline: float | None  # time.monotonic() value
    finish: Finish | None = None  # the model thread finishes the rows so; None: they come back as pooled
    caller: Hashable = None  # who sent it (a connection's peer): callers take turns in the queue
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None  # set on the worker when its first row goes into a batch
    finished: float | None = None
    cancelled: bool = False  # set on the loop: the caller is gone
    failed: bool = False  # set on either side: an error is on its way to the caller
    _vectors: list[np.ndarray | None] = field(default_factory=list)
    _remaining: int = 0
    _future: asyncio.Future[np.ndarray] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def __post_init__(self) -> None:
        self._vectors = [None] * self.rows
        self._remaining = self.rows

    @property
    def done(self) -> bool:
        return self._future.done()

    @property
    def dead(self) -> bool:
        """Nobody will use more of its vectors."""
        return self.cancelled or self.failed

    async def result(self) -> np.ndarray:
        return await asyncio.shield(self._future)

    def cancel(self) -> None:
        """The caller is gone: its queued rows will be skipped."""
        self.cancelled = True
        if not self._future.done():
            self._future.cancel()

    @property
    def queue_s(self) -> float:
        return (self.started or self.submitted) - self.submitted

    @property
    def inference_s(self) -> float:
        return (self.finished or self.started or 0.0) - (self.started or 0.0)

    def deliver(self, index: int, vector: np.ndarray) -> None:
        """Row `index`'s vector (event loop only); the last one completes the job."""
        if self._future.done() or self._vectors[index] is not None:  # a row computed twice counts once
            return
        self._vectors[index] = vector
        self._remaining -= 1
        if self._remaining == 0:
            self.finished = time.monotonic()
            vectors = vector[np.newaxis] if self.rows == 1 else np.stack(self._vectors)  # type: ignore[arg-type]
            self._future.set_result(vectors)

    def fail(self, error: BaseException) -> None:
        """End the job with `error` (event loop only), unless it has already ended."""
        self.failed = True
        if not self._future.done():
            self.finished = time.monotonic()
            self._future.set_exception(error)


@dataclass(eq=False)
class Row:
    job: Job
    index: int  # in the job's rows
    ids: Sequence[int]
    seq: int  # admission order, unique
    computed: bool = False  # its vector is posted to its job (set on the worker thread)
    taken: bool = False  # taken into a batch (set under the batcher's lock)

    @property
    def length(self) -> int:
        return len(self.ids)


__all__ = ["Job", "Row"]
