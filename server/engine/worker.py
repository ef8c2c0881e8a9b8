"""The model thread: it takes the next batch from the queue the moment it is free, runs it on the backend and
posts the outcome to the event loop.

A batch the device has no memory for is split in halves and retried down to single rows (only a row that does
not fit alone fails), and later batches are held below the size that failed until enough have run. A vector
with NaN, infinity or no direction is never delivered: its request fails, and the backend's health check on
the warm-up rows tells a model that has gone bad (health follows) from an input it cannot embed. Any other
failure is followed by the same check: a broken model fails the batch, else it runs again by halves, and only
requests that fail alone fail. The thread lives on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from server.domain import usable_rows
from server.engine import matryoshka
from server.engine.admission import Throughput
from server.engine.backend import Backend
from server.engine.delivery import Delivery
from server.engine.events import BatchStats, ModelBrokenEvent, NonFiniteEvent, OutOfMemoryEvent
from server.engine.jobs import Row
from server.engine.policy import BatchPolicy
from server.engine.scheduling import RowQueue, batch_tokens
from server.errors import EmbedError, ModelFailure, OutOfMemory

log = logging.getLogger("server.engine.batcher")  # the batcher's lines, whichever of its modules logs them

MODEL_THREAD = "model"  # the worker thread's name

# After an out-of-memory, this many batches run within the lowered budget before it grows again by a
# quarter, so a device whose memory came back regains full batches within a few hundred batches.
_BUDGET_RECOVERY_BATCHES = 64
_BUDGET_GROWTH = 1.25


class TokenBudget:
    """Tokens a batch may count now: the policy's, or less after an out-of-memory (written on the worker)."""

    def __init__(self, ceiling: int) -> None:
        self.ceiling = ceiling
        self.tokens = ceiling
        self._batches_within = 0

    def lower_below(self, failed_tokens: int) -> None:
        """A batch counting `failed_tokens` did not fit: later ones count at most half of it."""
        self.tokens = max(1, min(self.tokens, failed_tokens // 2))
        self._batches_within = 0

    def ran(self) -> None:
        if self.tokens < self.ceiling:
            self._batches_within += 1
            if self._batches_within >= _BUDGET_RECOVERY_BATCHES:
                self._batches_within = 0
                self.tokens = min(self.ceiling, int(self.tokens * _BUDGET_GROWTH))


class Worker:
    """Owns the model thread. The queue, `running` and `closing` are shared with the event loop under `lock`."""

    def __init__(self, backend: Backend, policy: BatchPolicy, queue: RowQueue, lock: threading.Condition,
                 delivery: Delivery, throughput: Throughput) -> None:
        self._backend = backend
        self.policy = policy
        self._queue = queue
        self._lock = lock
        self._delivery = delivery
        self._throughput = throughput
        self.budget = TokenBudget(policy.max_batch_tokens)
        self.probe: list[list[int]] | None = None  # the warm-up's rows, for the health check
        self.running: list[Row] = []  # the batch on the model now
        self.running_since = 0.0  # when it started (time.monotonic())
        self.running_tokens = 0  # its real tokens
        self.closing = False  # no more rows will come: finish the queue, then stop
        self.broken = False  # on the thread: a failed batch was followed by failing warm-up rows
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._work, name=MODEL_THREAD, daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self._lock:
            self.closing = True
            self._lock.notify()

    @property
    def started(self) -> bool:
        return self._thread is not None

    def join(self, timeout_s: float) -> bool:
        """Wait for the thread to finish the queue and stop; False if it is still running after the timeout."""
        assert self._thread is not None
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def run_now(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Run rows outside the queue on the calling thread; the first such rows become the health probe."""
        if self.probe is None:
            self.probe = [list(r) for r in rows]
        return self._backend.run(rows)

    # -- on the thread ---------------------------------------------------------------------------------
    def _work(self) -> None:
        last_end: float | None = None  # None: idle, the next row runs at once
        while True:
            with self._lock:
                batch = self._next_batch(last_end)
                if batch is None:
                    return
                self.running, self.running_since = batch, time.monotonic()
                self.running_tokens = sum(row.length for row in batch)
            if batch:
                self._execute(batch)
                last_end = time.monotonic()
            else:
                last_end = None
            with self._lock:
                self.running = []

    def _next_batch(self, last_end: float | None) -> list[Row] | None:
        """Under the lock: the next batch, [] after dropping dead rows, or None when stopped."""
        while not len(self._queue):
            if self.closing:
                return None
            self._lock.wait()
        if last_end is not None and time.monotonic() - last_end > self.policy.wait_s:
            last_end = None  # idle for longer than wait_s: the row runs at once
        if last_end is not None and not self.closing:
            until = last_end + self.policy.wait_s
            while not self.full() and (left := until - time.monotonic()) > 0:
                self._lock.wait(left)
        expired, dropped = self._queue.drop_dead(time.monotonic())
        if expired or dropped:
            self._post(self._delivery.dropped, expired, dropped)
        return self._queue.take_batch(self.policy_now())

    def policy_now(self) -> BatchPolicy:
        """The policy with the token budget of now (lower after an out-of-memory)."""
        if self.budget.tokens < self.policy.max_batch_tokens:
            return replace(self.policy, max_batch_tokens=self.budget.tokens)
        return self.policy

    def full(self) -> bool:
        """Enough is queued to fill a batch, by rows or by real tokens (a padded batch may be full sooner).

        Read under the lock, by the worker and by the batcher when it decides whether to wake the worker."""
        return len(self._queue) >= self.policy.max_batch_rows or self._queue.tokens >= self.policy.max_batch_tokens

    def _execute(self, batch: list[Row]) -> None:
        started = time.monotonic()
        was_broken = self.broken
        for row in batch:
            if row.job.started is None:
                row.job.started = started
        try:
            self._compute(batch)
        except Exception as exc:  # every caller of the batch hears of it; the worker lives on
            log.exception("model batch of %d rows failed", len(batch))
            # A model that cannot run the warm-up rows either would fail every batch from now on; else an input
            # the model cannot take is the fault, and it fails its own request only: the batch runs again by
            # halves of whole requests.
            judged = not isinstance(exc, EmbedError) and not self.broken  # else the error says it all
            if judged and self._probe_fails(errors_count=True):
                log.error("the warm-up rows fail too: the model is broken")
                self._fail(batch, exc)
                self._mark_broken(ModelBrokenEvent(len(batch), f"{type(exc).__name__}: {exc}"))
            elif judged and len({id(r.job) for r in batch}) > 1:
                self._rerun_by_halves(batch)
            else:
                self._fail(batch, exc)
            return
        self.budget.ran()
        # A batch ran: if the model was found broken before it, the warm-up rows decide whether it is back (a
        # fault that passed, not weights gone bad: those keep failing them).
        if was_broken and self.broken and not self._probe_fails(errors_count=True):
            log.warning("the warm-up rows pass again: the model is back in service")
            self.broken = False
            self._post(self._delivery.model_recovered)

    def _fail(self, batch: list[Row], exc: Exception) -> None:
        for row in batch:
            row.job.failed = True
        error = exc if isinstance(exc, EmbedError) else ModelFailure(
            f"the model failed on a batch of {len(batch)} rows: {type(exc).__name__}: {exc}")
        self._post(self._delivery.batch_failed, batch, error)

    def _rerun_by_halves(self, batch: list[Row]) -> None:
        """Run a failed batch again by halves, its requests whole, halving the halves that fail again: only the
        requests the model fails on alone fail, at a few batches' cost (not one per request)."""
        jobs: dict[int, list[Row]] = {}
        for row in batch:
            jobs.setdefault(id(row.job), []).append(row)
        groups = list(jobs.values())
        failed = self._bisect_halves(groups)
        log.warning("the %d requests of the failed batch ran again by halves: %d failed alone", len(groups), failed)

    def _bisect(self, groups: list[list[Row]]) -> int:
        """Run the rows of `groups` (a request's rows each) not yet computed; returns how many requests failed."""
        groups = [alive for g in groups if (alive := [r for r in g if not r.job.dead and not r.computed])]
        now = time.monotonic()
        expired = [g for g in groups if g[0].job.deadline is not None and now > g[0].job.deadline]
        if expired:  # their callers hear of it, as they would from the queue
            for g in expired:
                g[0].job.failed = True
            self._post(self._delivery.dropped, [g[0].job for g in expired], sum(map(len, expired)))
            groups = [g for g in groups if not g[0].job.failed]
        if not groups:
            return 0
        try:
            self._compute([row for g in groups for row in g])
            return 0
        except Exception as exc:
            if len(groups) == 1:
                self._fail(groups[0], exc)
                return 1
            return self._bisect_halves(groups)

    def _bisect_halves(self, groups: list[list[Row]]) -> int:
        middle = len(groups) // 2
        return self._bisect(groups[:middle]) + self._bisect(groups[middle:])

    def _compute(self, batch: list[Row]) -> None:
        """Run the batch and post its vectors; out of memory, run each half (shorter rows first) the same
        way, and fail only the requests of rows that do not fit alone."""
        started = time.monotonic()
        try:
            vectors = self._backend.run([r.ids for r in batch])
        except OutOfMemory as exc:
            self._split(batch, exc)
            return
        if len(vectors) != len(batch):
            raise RuntimeError(f"the model returned {len(vectors)} vectors for {len(batch)} rows")
        seconds = time.monotonic() - started
        usable = usable_rows(vectors)  # one pass over the batch
        if not usable.all():
            self._non_finite([row for row, ok in zip(batch, usable, strict=True) if not ok], len(batch))
        finished = matryoshka.finish_batch(vectors, [r.job.finish for r in batch])
        tokens = sum(r.length for r in batch)
        self._throughput.observe(tokens, seconds)
        stats = BatchStats(len(batch), tokens, len(batch) * max(r.length for r in batch), seconds)
        self._post(self._delivery.batch, batch, finished, stats)
        for row in batch:
            row.computed = True

    def _split(self, batch: list[Row], exc: OutOfMemory) -> None:
        longest = max(r.length for r in batch)
        if len(batch) == 1:
            row = batch[0]
            log.warning("a row of %d tokens does not fit in the device's memory alone", row.length)
            row.job.failed = True
            self._post(self._delivery.too_large, batch, OutOfMemory(
                f"texts[{row.index}] ({row.length} tokens) does not fit in the device's free memory even "
                f"alone; send it shorter, or serve a smaller variant ({exc})"))
            return
        padded = len(batch) * longest
        self.budget.lower_below(batch_tokens(len(batch), longest, sum(r.length for r in batch),
                                             self._queue.is_padded))
        log.warning("out of memory on a batch of %d rows (%d padded tokens): split in two; batches now "
                    "stay within %d tokens", len(batch), padded, self.budget.tokens)
        self._post(self._delivery.out_of_memory, OutOfMemoryEvent(len(batch), padded, self.budget.tokens))
        half = len(batch) // 2
        for part in (batch[:half], batch[half:]):
            alive = [r for r in part if not r.job.dead]  # a row that failed alone fails its request
            if alive:
                self._compute(alive)

    def _non_finite(self, bad: list[Row], batch_rows: int) -> None:
        """Fail the requests of rows whose vectors are not finite (before the batch's vectors are posted), and
        ask the backend's health to tell a broken model from inputs it cannot embed."""
        for row in bad:
            row.job.failed = True
        broken = self._probe_fails()
        log.error("the model gave %d of %d rows vectors with NaN, infinity or no direction; their requests fail%s",
                  len(bad), batch_rows, "; the warm-up rows do too: the model is broken" if broken else "")
        self._post(self._delivery.non_finite, bad, NonFiniteEvent(len(bad), batch_rows, broken))
        if broken and not self.broken:
            self._mark_broken(ModelBrokenEvent(batch_rows, "the warm-up rows give non-finite vectors"))

    def _mark_broken(self, event: ModelBrokenEvent) -> None:
        self.broken = True
        self._post(self._delivery.model_broken, event)

    def _probe_fails(self, *, errors_count: bool = False) -> bool:
        """Whether the warm-up rows no longer give finite vectors; with `errors_count`, also when they raise."""
        if self.probe is None:
            return False
        try:
            return not self._backend.healthy(self.probe)
        except OutOfMemory:  # memory is short for a moment: that says nothing of the model
            log.warning("the health check on the warm-up rows ran out of memory")
            return False
        except Exception:
            log.exception("the health check on the warm-up rows failed to run")
            return errors_count

    def _post(self, callback: Callable[..., None], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.debug("event loop closed; dropping %s", getattr(callback, "__name__", callback))


__all__ = ["MODEL_THREAD", "TokenBudget", "Worker"]
