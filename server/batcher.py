"""Dynamic batching: admitted rows from many callers become model batches on one worker thread.

Knows nothing of gRPC or torch. The event loop only admits jobs and receives results; the worker
thread forms each batch itself the moment it is free, so the model never waits for the event loop
and every row that arrived during one batch can join the next. Rows are grouped by length under a
padded-token budget (rows x longest row) and a row cap; the oldest row always goes into the next
batch, so nothing starves. Rows whose caller cancelled or whose deadline passed are dropped before
compute, and every job gets its vectors or the error of a batch it was in. A batch the device has no
memory for is split in halves and retried down to single rows (only a row that does not fit alone
fails), and later batches are held below the size that failed until enough have run. A vector with NaN
or infinity is never delivered: its request fails, and the rows of the warm-up run again to tell a model
that has gone bad (health follows) from an input it cannot embed.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import count

import numpy as np

from server.errors import (
    DeadlineExceeded,
    EmbedError,
    ModelFailure,
    NonFiniteVector,
    OutOfMemory,
    Overloaded,
    Unavailable,
)

log = logging.getLogger(__name__)

RunFn = Callable[[Sequence[Sequence[int]]], np.ndarray]
MODEL_THREAD = "model"  # the worker thread's name


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_tokens: int = 16384  # padded tokens per batch; a longer single row still runs, alone
    max_batch_rows: int = 128
    max_queue_tokens: int = 1_000_000
    # After a batch, how long the worker waits for more rows when the next batch is not full (callers
    # answered by the last batch are often about to send again). An idle worker never waits.
    wait_s: float = 0.0
    max_padding_fraction: float = 0.1
    # A forward pass costs about this many tokens' worth of compute besides its padded tokens (weights
    # streamed once per pass), so a small batch may pad this much rather than run as two passes.
    overhead_tokens: int = 32


@dataclass(frozen=True)
class BatchStats:
    """What one model batch was: for metrics and benchmarks."""

    rows: int
    tokens: int
    padded_tokens: int
    seconds: float


@dataclass
class BatcherTotals:
    """Cumulative counters since start; compare two snapshots to describe a period."""

    batches: int = 0
    rows: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    busy_s: float = 0.0
    failed_batches: int = 0
    dropped_rows: int = 0  # skipped before compute: the caller cancelled, ran out of time or already failed
    oom_splits: int = 0  # batches split in two after the device ran out of memory
    oom_rows: int = 0  # rows that did not fit even alone (their requests failed)
    non_finite_rows: int = 0  # rows whose vector had NaN or infinity (their requests failed)

    def add(self, stats: BatchStats) -> None:
        self.batches += 1
        self.rows += stats.rows
        self.tokens += stats.tokens
        self.padded_tokens += stats.padded_tokens
        self.busy_s += stats.seconds

    def copy(self) -> BatcherTotals:
        return BatcherTotals(**vars(self))


@dataclass(frozen=True)
class OutOfMemoryEvent:
    """A batch of `rows` rows and `padded_tokens` padded tokens did not fit; later batches stay within
    `budget_tokens` until enough have run."""

    rows: int
    padded_tokens: int
    budget_tokens: int


@dataclass(frozen=True)
class NonFiniteEvent:
    """A batch of `batch_rows` rows gave `rows` vectors with NaN or infinity; their requests failed.

    `model_broken`: the warm-up rows give non-finite vectors too, so the model itself is bad and every answer
    is suspect. Otherwise the fault is in those inputs (e.g. an overflow in half precision): such a text fails
    its request without taking the server out of service.
    """

    rows: int
    batch_rows: int
    model_broken: bool


# After an out-of-memory, this many batches run within the lowered budget before it grows again by a
# quarter, so a device whose memory came back regains full batches within a few hundred batches.
_BUDGET_RECOVERY_BATCHES = 64
_BUDGET_GROWTH = 1.25


@dataclass(eq=False)
class Job:
    """The rows of one request. Await `result()` for its vectors in row order.

    Its future lives on the event loop; the worker thread reads only the plain flags.
    """

    rows: int
    deadline: float | None  # time.monotonic() value
    submitted: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    cancelled: bool = False  # set on the loop: the caller is gone
    failed: bool = False  # set on the worker: an error is on its way to the caller
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

    def _deliver(self, index: int, vector: np.ndarray) -> None:
        if self._future.done():
            return
        self._vectors[index] = vector
        self._remaining -= 1
        if self._remaining == 0:
            self.finished = time.monotonic()
            self._future.set_result(np.stack(self._vectors))  # type: ignore[arg-type]

    def _fail(self, error: BaseException) -> None:
        self.failed = True
        if not self._future.done():
            self.finished = time.monotonic()
            self._future.set_exception(error)


@dataclass(eq=False)
class _Row:
    job: Job
    index: int
    ids: Sequence[int]
    seq: int  # admission order, unique

    @property
    def length(self) -> int:
        return len(self.ids)


def choose_window(lengths: Sequence[int], anchor: int, policy: BatchPolicy) -> tuple[int, int]:
    """The slice [lo, hi) of length-sorted rows, around `anchor`, that forms the next batch.

    Grows one row at a time, toward whichever neighbour adds less padding, while the batch stays
    within the row cap and the padded-token budget and its padding stays within the larger of
    `max_padding_fraction` of the batch and `overhead_tokens`.
    """
    lo, hi = anchor, anchor + 1
    longest = total = lengths[anchor]
    while hi - lo < policy.max_batch_rows:
        options = []
        if lo > 0:  # a shorter row pads up to the longest
            options.append((longest - lengths[lo - 1], -1))
        if hi < len(lengths):  # a longer row makes every chosen row pad up to it
            options.append(((lengths[hi] - longest) * (hi - lo), 1))
        for _, side in sorted(options):
            length = lengths[lo - 1] if side < 0 else lengths[hi]
            padded = (hi - lo + 1) * max(longest, length)
            waste = padded - total - length
            if padded <= policy.max_batch_tokens and waste <= max(
                policy.max_padding_fraction * padded, policy.overhead_tokens
            ):
                break
        else:
            return lo, hi
        if side < 0:
            lo -= 1
        else:
            hi += 1
        longest, total = max(longest, length), total + length
    return lo, hi


class _Lengths(Sequence[int]):
    """The lengths of the queue's length-sorted keys, without copying them."""

    def __init__(self, keys: list[tuple[int, int]]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        return self._keys[i][0]


class _Queue:
    """Admitted rows, sorted by length for grouping and kept in arrival order for fairness.

    Used only under the batcher's lock.
    """

    def __init__(self) -> None:
        self._seq = count()
        self._clear()

    def _clear(self) -> None:
        self._keys: list[tuple[int, int]] = []  # (length, seq), sorted
        self._rows: list[_Row] = []  # parallel to _keys
        self._arrivals: deque[_Row] = deque()
        self._taken: set[int] = set()  # seqs taken into a batch but still in _arrivals
        self._jobs: dict[Job, int] = {}  # job -> its rows still queued
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, job: Job, rows: Sequence[Sequence[int]]) -> None:
        for i, ids in enumerate(rows):
            row = _Row(job, i, ids, next(self._seq))
            at = bisect.bisect_right(self._keys, (row.length, row.seq))
            self._keys.insert(at, (row.length, row.seq))
            self._rows.insert(at, row)
            self._arrivals.append(row)
        self._jobs[job] = len(rows)
        self.tokens += sum(len(r) for r in rows)

    def drop_dead(self, now: float) -> tuple[list[Job], int]:
        """Forget the rows of jobs that were cancelled, failed or are past their deadline.

        Returns the jobs that just ran out of time (their callers must hear of it) and the rows dropped.
        """
        expired = [j for j in self._jobs if not j.dead and j.deadline is not None and now > j.deadline]
        for job in expired:
            job.failed = True
        before = len(self._rows)
        if any(job.dead for job in self._jobs):
            keep = [i for i, row in enumerate(self._rows) if not row.job.dead]
            self._keys = [self._keys[i] for i in keep]
            self._rows = [self._rows[i] for i in keep]
            self._arrivals = deque(r for r in self._arrivals if not r.job.dead and r.seq not in self._taken)
            self._taken.clear()
            self._jobs = {j: n for j, n in self._jobs.items() if not j.dead}
            self.tokens = sum(k[0] for k in self._keys)
        return expired, before - len(self._rows)

    def take_batch(self, policy: BatchPolicy) -> list[_Row]:
        while self._arrivals and self._arrivals[0].seq in self._taken:
            self._taken.discard(self._arrivals.popleft().seq)
        if not self._arrivals:
            return []
        oldest = self._arrivals[0]
        anchor = bisect.bisect_left(self._keys, (oldest.length, oldest.seq))
        lo, hi = choose_window(_Lengths(self._keys), anchor, policy)
        batch = self._rows[lo:hi]
        del self._keys[lo:hi], self._rows[lo:hi]
        for row in batch:
            self._taken.add(row.seq)
            self.tokens -= row.length
            left = self._jobs[row.job] - 1
            if left:
                self._jobs[row.job] = left
            else:
                del self._jobs[row.job]
        return batch

    def take_all(self) -> list[_Row]:
        rows = self._rows
        self._clear()
        return rows


class Batcher:
    def __init__(self, run: RunFn, policy: BatchPolicy,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self._run = run
        self.policy = policy
        self.on_batch = on_batch  # called on the event loop after each delivered batch
        self.on_out_of_memory: Callable[[OutOfMemoryEvent], None] | None = None  # likewise, per split
        self.on_non_finite: Callable[[NonFiniteEvent], None] | None = None  # likewise, per batch
        self._probe: list[list[int]] | None = None  # the warm-up's rows
        self._budget_tokens = policy.max_batch_tokens  # lowered after an out-of-memory (worker thread only)
        self._batches_within_budget = 0
        self._queue = _Queue()
        self._lock = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._running: list[_Row] = []  # the batch on the model now
        self._accepting = False
        self._closing = False
        self._tokens_per_s = 0.0  # moving average, for retry hints
        self.totals = BatcherTotals()  # updated on the event loop

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._thread = threading.Thread(target=self._work, name=MODEL_THREAD, daemon=True)
        self._thread.start()

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting, finish what was admitted (up to the timeout), then stop the worker."""
        self._accepting = False
        with self._lock:
            self._closing = True
            self._lock.notify()
        if self._thread is None:
            return
        await asyncio.to_thread(self._thread.join, drain_timeout_s)
        if self._thread.is_alive():  # the timeout passed: whatever is left will not be computed
            with self._lock:
                left, running = self._queue.take_all(), list(self._running)
            for row in left:
                row.job._fail(Unavailable("the server stopped before this request was computed"))
            for row in running:
                row.job._fail(Unavailable("the server stopped while computing this request"))
            log.warning("stopped with %d rows uncomputed", len(left) + len(running))

    def run_now(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Run rows outside the queue on the calling thread (warm-up, before `start`).

        The first rows run here become the probe run after a batch with non-finite vectors: a working model
        gives them finite vectors.
        """
        if self._probe is None:
            self._probe = [list(r) for r in rows]
        return self._run(rows)

    @property
    def budget_tokens(self) -> int:
        """Padded tokens a batch may hold now: the policy's, or less after an out-of-memory."""
        return self._budget_tokens

    @property
    def queued_tokens(self) -> int:
        return self._queue.tokens

    def pending(self) -> tuple[int, int]:
        """(requests, rows) admitted and not yet computed: what leaving at once would drop."""
        with self._lock:
            rows = [*self._queue._rows, *self._running]
        return len({row.job for row in rows}), len(rows)

    # -- admission (event loop) ------------------------------------------------------------------
    def submit(self, rows: Sequence[Sequence[int]], deadline: float | None = None) -> Job:
        if not self._accepting:
            raise Unavailable("the server is shutting down")
        if not rows:
            raise ValueError("a job needs at least one row")
        tokens = sum(len(r) for r in rows)
        job = Job(rows=len(rows), deadline=deadline)
        with self._lock:
            queued = self._queue.tokens
            if queued and queued + tokens > self.policy.max_queue_tokens:
                raise Overloaded(
                    f"queue full: {queued} tokens waiting, limit {self.policy.max_queue_tokens}",
                    retry_after_s=self._drain_estimate_s(queued),
                )
            if deadline is not None and queued and self._tokens_per_s > 0:
                # Refuse now what cannot finish in time, rather than compute it and throw it away.
                wait_s = (queued + tokens) / self._tokens_per_s
                if time.monotonic() + wait_s > deadline:
                    raise DeadlineExceeded(
                        f"the estimated time to compute this request behind {queued} queued tokens "
                        f"({wait_s:.2f}s) exceeds its deadline"
                    )
            self._queue.add(job, rows)
            self._lock.notify()
        return job

    def _drain_estimate_s(self, queued_tokens: int) -> float:
        if self._tokens_per_s <= 0:
            return 1.0
        return min(30.0, max(0.05, queued_tokens / self._tokens_per_s))

    # -- the worker thread -----------------------------------------------------------------------
    def _work(self) -> None:
        last_end: float | None = None  # None: idle, the next row runs at once
        while True:
            with self._lock:
                batch = self._next_batch(last_end)
                if batch is None:
                    return
                self._running = batch
            if batch:
                self._execute(batch)
                last_end = time.monotonic()
            else:
                last_end = None
            with self._lock:
                self._running = []

    def _next_batch(self, last_end: float | None) -> list[_Row] | None:
        """Under the lock: the next batch, [] after dropping dead rows, or None when stopped."""
        while not len(self._queue):
            if self._closing:
                return None
            self._lock.wait()
        if last_end is not None and time.monotonic() - last_end > self.policy.wait_s:
            last_end = None  # idle for longer than wait_s: the row runs at once
        if last_end is not None and not self._closing:
            until = last_end + self.policy.wait_s
            while not self._full() and (left := until - time.monotonic()) > 0:
                self._lock.wait(left)
        expired, dropped = self._queue.drop_dead(time.monotonic())
        if expired or dropped:
            self._post(self._dropped, expired, dropped)
        policy = self.policy
        if self._budget_tokens < policy.max_batch_tokens:
            policy = replace(policy, max_batch_tokens=self._budget_tokens)
        return self._queue.take_batch(policy)

    def _full(self) -> bool:
        return len(self._queue) >= self.policy.max_batch_rows or self._queue.tokens >= self.policy.max_batch_tokens

    def _execute(self, batch: list[_Row]) -> None:
        started = time.monotonic()
        for row in batch:
            if row.job.started is None:
                row.job.started = started
        try:
            self._compute(batch)
        except Exception as exc:  # every caller of the batch hears of it; the worker lives on
            log.exception("model batch of %d rows failed", len(batch))
            error = exc if isinstance(exc, EmbedError) else ModelFailure(
                f"the model failed on a batch of {len(batch)} rows: {type(exc).__name__}: {exc}")
            for row in batch:
                row.job.failed = True
            self._post(self._fail_batch, batch, error)
            return
        if self._budget_tokens < self.policy.max_batch_tokens:
            self._batches_within_budget += 1
            if self._batches_within_budget >= _BUDGET_RECOVERY_BATCHES:
                self._batches_within_budget = 0
                self._budget_tokens = min(self.policy.max_batch_tokens, int(self._budget_tokens * _BUDGET_GROWTH))

    def _compute(self, batch: list[_Row]) -> None:
        """Run the batch and post its vectors; out of memory, run each half (shorter rows first) the same
        way, and fail only the requests of rows that do not fit alone."""
        started = time.monotonic()
        try:
            vectors = self._run([r.ids for r in batch])
        except OutOfMemory as exc:
            padded = len(batch) * max(r.length for r in batch)
            if len(batch) == 1:
                row = batch[0]
                log.warning("a row of %d tokens does not fit in the device's memory alone", row.length)
                row.job.failed = True
                self._post(self._fail_rows, batch, OutOfMemory(
                    f"texts[{row.index}] ({row.length} tokens) does not fit in the device's free memory even "
                    f"alone; send it shorter, or serve a smaller variant ({exc})"))
                return
            self._budget_tokens = max(1, min(self._budget_tokens, padded // 2))
            self._batches_within_budget = 0
            log.warning("out of memory on a batch of %d rows (%d padded tokens): split in two; batches now "
                        "stay within %d tokens", len(batch), padded, self._budget_tokens)
            self._post(self._out_of_memory, OutOfMemoryEvent(len(batch), padded, self._budget_tokens))
            half = len(batch) // 2
            for part in (batch[:half], batch[half:]):
                alive = [r for r in part if not r.job.dead]  # a row that failed alone fails its request
                if alive:
                    self._compute(alive)
            return
        if len(vectors) != len(batch):
            raise RuntimeError(f"the model returned {len(vectors)} vectors for {len(batch)} rows")
        seconds = time.monotonic() - started
        finite = np.isfinite(vectors).all(axis=1)  # one pass over the batch
        if not finite.all():
            self._non_finite([row for row, ok in zip(batch, finite, strict=True) if not ok], len(batch))
        tokens = sum(r.length for r in batch)
        rate = tokens / max(seconds, 1e-6)
        # The first batch sets the estimate: averaging it with zero would make it 5x too slow at first.
        self._tokens_per_s = 0.8 * self._tokens_per_s + 0.2 * rate if self._tokens_per_s else rate
        stats = BatchStats(len(batch), tokens, len(batch) * max(r.length for r in batch), seconds)
        self._post(self._deliver, batch, vectors, stats)

    def _non_finite(self, bad: list[_Row], batch_rows: int) -> None:
        """Fail the requests of rows whose vectors are not finite (before the batch's vectors are posted), and
        run the probe to tell a broken model from inputs it cannot embed."""
        for row in bad:
            row.job.failed = True
        broken = self._probe_fails()
        log.error("the model gave %d of %d rows non-finite vectors (NaN or infinity); their requests fail%s",
                  len(bad), batch_rows, "; the warm-up rows do too: the model is broken" if broken else "")
        self._post(self._fail_non_finite, bad, NonFiniteEvent(len(bad), batch_rows, broken))

    def _probe_fails(self) -> bool:
        if self._probe is None:
            return False
        try:
            return not np.isfinite(self._run(self._probe)).all()
        except Exception:
            log.exception("the probe after non-finite vectors failed to run")
            return False

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("event loop closed; dropping %s", getattr(callback, "__name__", callback))

    # -- delivery (event loop) -------------------------------------------------------------------
    def _deliver(self, batch: list[_Row], vectors: np.ndarray, stats: BatchStats) -> None:
        for row, vector in zip(batch, vectors, strict=True):
            row.job._deliver(row.index, vector)
        self.totals.add(stats)
        if self.on_batch:
            self.on_batch(stats)

    def _fail_batch(self, batch: list[_Row], error: EmbedError) -> None:
        self.totals.failed_batches += 1
        for row in batch:
            row.job._fail(error)

    def _fail_rows(self, rows: list[_Row], error: EmbedError) -> None:
        self.totals.oom_rows += len(rows)
        for row in rows:
            row.job._fail(error)

    def _fail_non_finite(self, rows: list[_Row], event: NonFiniteEvent) -> None:
        self.totals.non_finite_rows += len(rows)
        for row in sorted(rows, key=lambda r: r.index):  # a request hears of its first such row
            row.job._fail(NonFiniteVector(row.index, "the model gave a vector with NaN or infinity"))
        if self.on_non_finite:
            self.on_non_finite(event)

    def _out_of_memory(self, event: OutOfMemoryEvent) -> None:
        self.totals.oom_splits += 1
        if self.on_out_of_memory:
            self.on_out_of_memory(event)

    def _dropped(self, expired: list[Job], rows: int) -> None:
        self.totals.dropped_rows += rows
        for job in expired:
            job._fail(DeadlineExceeded("the deadline passed while the request was queued"))


__all__ = [
    "MODEL_THREAD", "BatchPolicy", "BatchStats", "Batcher", "BatcherTotals", "Job", "NonFiniteEvent",
    "OutOfMemoryEvent", "choose_window",
]
