"""Dynamic batching: admitted rows from many callers become model batches on one worker thread.

Knows nothing of gRPC or torch. Rows are grouped by length under a padded-token budget
(rows x longest row) and a row cap; the oldest row always goes into the next batch, so nothing
starves. Rows whose caller cancelled or whose deadline passed are dropped before compute, and every
job gets its vectors or the error of a batch it was in.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from server.errors import DeadlineExceeded, EmbedError, ModelFailure, Overloaded, Unavailable

log = logging.getLogger(__name__)

RunFn = Callable[[Sequence[Sequence[int]]], np.ndarray]


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_tokens: int = 16384  # padded tokens per batch
    max_batch_rows: int = 128
    max_queue_tokens: int = 1_000_000
    wait_s: float = 0.0  # how long an idle worker waits for more rows before running a small batch
    max_padding_fraction: float = 0.2  # beyond the anchor row, rows that would pad more wait their turn


@dataclass(frozen=True)
class BatchStats:
    """What one model batch was: for metrics and benchmarks."""

    rows: int
    tokens: int
    padded_tokens: int
    seconds: float


@dataclass(eq=False)
class _Row:
    job: Job
    index: int
    ids: Sequence[int]

    @property
    def length(self) -> int:
        return len(self.ids)


@dataclass(eq=False)
class Job:
    """The rows of one request. Await `result()` for its vectors in row order."""

    rows: int
    deadline: float | None  # time.monotonic() value
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    _vectors: list[np.ndarray | None] = field(default_factory=list)
    _remaining: int = 0
    _future: asyncio.Future[np.ndarray] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def __post_init__(self) -> None:
        self._vectors = [None] * self.rows
        self._remaining = self.rows

    @property
    def done(self) -> bool:
        return self._future.done()

    async def result(self) -> np.ndarray:
        return await asyncio.shield(self._future)

    def cancel(self) -> None:
        """The caller is gone: its queued rows will be skipped."""
        if not self._future.done():
            self._future.cancel()

    @property
    def queue_s(self) -> float:
        return (self.started or self.submitted) - self.submitted

    @property
    def inference_s(self) -> float:
        return (self.finished or self.started or 0.0) - (self.started or 0.0)

    def _deliver(self, index: int, vector: np.ndarray) -> None:
        if self._future.done():
            return
        self._vectors[index] = vector
        self._remaining -= 1
        if self._remaining == 0:
            self.finished = time.monotonic()
            self._future.set_result(np.stack(self._vectors))  # type: ignore[arg-type]

    def _fail(self, error: BaseException) -> None:
        if not self._future.done():
            self.finished = time.monotonic()
            self._future.set_exception(error)


class Batcher:
    def __init__(self, run: RunFn, policy: BatchPolicy,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self._run = run
        self.policy = policy
        self._on_batch = on_batch
        self._pending: list[_Row] = []  # arrival order
        self._queued_tokens = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._accepting = False
        self._busy = False
        self._tokens_per_s = 0.0  # moving average, for retry hints

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting, finish what was admitted (up to the timeout), then stop the worker."""
        self._accepting = False
        deadline = time.monotonic() + drain_timeout_s
        while (self._pending or self._busy) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for row in self._pending:
            row.job._fail(Unavailable("the server stopped before this request was computed"))
        self._pending.clear()
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True, cancel_futures=True)

    def run_now(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Run rows on the worker thread outside the queue (warm-up); blocks the caller."""
        return self._executor.submit(self._run, rows).result()

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    # -- admission -------------------------------------------------------------------------------
    def submit(self, rows: Sequence[Sequence[int]], deadline: float | None = None) -> Job:
        if not self._accepting:
            raise Unavailable("the server is shutting down")
        if not rows:
            raise ValueError("a job needs at least one row")
        tokens = sum(len(r) for r in rows)
        if self._queued_tokens and self._queued_tokens + tokens > self.policy.max_queue_tokens:
            raise Overloaded(
                f"queue full: {self._queued_tokens} tokens waiting, limit {self.policy.max_queue_tokens}",
                retry_after_s=self._drain_estimate_s(),
            )
        job = Job(rows=len(rows), deadline=deadline)
        self._pending.extend(_Row(job, i, ids) for i, ids in enumerate(rows))
        self._queued_tokens += tokens
        assert self._wakeup is not None, "Batcher.start() was not called"
        self._wakeup.set()
        return job

    def _drain_estimate_s(self) -> float:
        if self._tokens_per_s <= 0:
            return 1.0
        return min(30.0, max(0.05, self._queued_tokens / self._tokens_per_s))

    # -- scheduling ------------------------------------------------------------------------------
    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.policy.wait_s > 0 and self._queued_tokens < self.policy.max_batch_tokens:
                await asyncio.sleep(self.policy.wait_s)
            while True:
                batch = self._form_batch()
                if not batch:
                    break
                await self._execute(loop, batch)

    def _form_batch(self) -> list[_Row]:
        self._drop_dead()
        if not self._pending:
            return []
        anchor = self._pending[0]
        by_length = sorted(self._pending, key=lambda r: r.length)
        pos = by_length.index(anchor)
        chosen = [anchor]
        longest, total = anchor.length, anchor.length
        lo, hi = pos - 1, pos + 1
        p = self.policy
        while len(chosen) < p.max_batch_rows:
            left = by_length[lo] if lo >= 0 else None
            right = by_length[hi] if hi < len(by_length) else None
            # take the neighbour closest in length to the rows already chosen
            if left is not None and (right is None or longest - left.length <= right.length - longest):
                cand, lo = left, lo - 1
            elif right is not None:
                cand, hi = right, hi + 1
            else:
                break
            new_longest = max(longest, cand.length)
            new_total = total + cand.length
            rows = len(chosen) + 1
            if rows * new_longest > p.max_batch_tokens:
                if cand is right:
                    hi = len(by_length)  # longer rows only get worse; shorter ones may still fit
                    continue
                break
            if 1 - new_total / (rows * new_longest) > p.max_padding_fraction:
                if cand is right:
                    hi = len(by_length)
                    continue
                break
            chosen.append(cand)
            longest, total = new_longest, new_total
        taken = set(map(id, chosen))
        self._pending = [r for r in self._pending if id(r) not in taken]
        self._queued_tokens -= total
        chosen.sort(key=lambda r: r.length)
        return chosen

    def _drop_dead(self) -> None:
        now = time.monotonic()
        alive = []
        for row in self._pending:
            job = row.job
            if not job.done and job.deadline is not None and now > job.deadline:
                job._fail(DeadlineExceeded("the deadline passed while the request was queued"))
            if job.done:
                self._queued_tokens -= row.length
            else:
                alive.append(row)
        self._pending = alive

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[_Row]) -> None:
        started = time.monotonic()
        for row in batch:
            if row.job.started is None:
                row.job.started = started
        self._busy = True
        try:
            vectors = await loop.run_in_executor(self._executor, self._run, [r.ids for r in batch])
        except asyncio.CancelledError:
            for row in batch:
                row.job._fail(Unavailable("the server stopped while computing this request"))
            raise
        except Exception as exc:  # every caller of the batch hears of it; the worker lives on
            log.exception("model batch of %d rows failed", len(batch))
            error = exc if isinstance(exc, EmbedError) else ModelFailure(
                f"the model failed on a batch of {len(batch)} rows: {type(exc).__name__}: {exc}")
            for row in batch:
                row.job._fail(error)
            return
        finally:
            self._busy = False
        seconds = time.monotonic() - started
        tokens = sum(r.length for r in batch)
        self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * (tokens / max(seconds, 1e-6))
        for row, vector in zip(batch, vectors, strict=True):
            row.job._deliver(row.index, vector)
        if self._on_batch:
            padded = len(batch) * max(r.length for r in batch)
            self._on_batch(BatchStats(len(batch), tokens, padded, seconds))


__all__ = ["BatchPolicy", "BatchStats", "Batcher", "Job"]
