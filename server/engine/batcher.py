"""Dynamic batching: admitted rows from many callers become model batches on one worker thread.

Knows nothing of gRPC or torch. The event loop only admits jobs (admission) and receives results (delivery);
the worker thread (worker) forms each batch itself the moment it is free (scheduling), so the model never
waits for the event loop and every row that arrived during one batch can join the next. The model is a
Backend (backend). Rows whose caller cancelled or whose deadline passed are dropped before compute, and
every job gets its vectors or the error of a batch it was in.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace

import numpy as np

from server.engine.admission import Admission, Throughput
from server.engine.backend import Backend
from server.engine.delivery import Delivery
from server.engine.events import BatcherTotals, BatchStats, NonFiniteEvent, OutOfMemoryEvent
from server.engine.jobs import Job
from server.engine.matryoshka import Finish
from server.engine.policy import BatchPolicy
from server.engine.scheduling import RowQueue, choose_window
from server.engine.worker import MODEL_THREAD, Worker
from server.errors import Unavailable

log = logging.getLogger(__name__)


class Batcher:
    def __init__(self, backend: Backend, policy: BatchPolicy,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        if backend.max_batch_rows is not None and backend.max_batch_rows < policy.max_batch_rows:
            policy = replace(policy, max_batch_rows=backend.max_batch_rows)
        self.backend = backend
        self.policy = policy
        # Its hooks (on_batch, on_out_of_memory, on_non_finite) and totals live on the event loop.
        self.delivery = Delivery(on_batch)
        throughput = Throughput()
        self._admission = Admission(policy.max_queue_tokens, throughput, policy)
        self._queue = RowQueue(backend.is_padded)
        self._lock = threading.Condition()
        self._worker = Worker(backend, policy, self._queue, self._lock, self.delivery, throughput)
        self._accepting = False

    # -- hooks and counters (event loop) ---------------------------------------------------------
    @property
    def totals(self) -> BatcherTotals:
        """Counters since start, updated on the event loop."""
        return self.delivery.totals

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self._accepting = True
        self._worker.start(asyncio.get_running_loop())

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop admitting, finish what was admitted (up to the timeout), then stop the worker."""
        self._accepting = False
        self._worker.close()
        if not self._worker.started:
            return
        if await asyncio.to_thread(self._worker.join, drain_timeout_s):
            return
        # The timeout passed: whatever is left will not be computed.
        with self._lock:
            left, running = self._queue.take_all(), list(self._worker.running)
        for row in left:
            row.job.fail(Unavailable("the server stopped before this request was computed"))
        for row in running:
            row.job.fail(Unavailable("the server stopped while computing this request"))
        log.warning("stopped with %d rows uncomputed", len(left) + len(running))

    def run_now(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Run rows outside the queue on the calling thread (warm-up, before `start`).

        The first rows run here are the ones the backend's health check runs after a batch with non-finite
        vectors: a working model gives them finite vectors.
        """
        return self._worker.run_now(rows)

    @property
    def budget_tokens(self) -> int:
        """Tokens a batch may count now (see BatchPolicy.max_batch_tokens): the policy's, or less after an
        out-of-memory."""
        return self._worker.budget.tokens

    @property
    def queued_tokens(self) -> int:
        return self._queue.tokens

    @property
    def queued_callers(self) -> int:
        """Callers with rows queued (read without the lock, for metrics)."""
        return self._queue.callers

    @property
    def backlogged(self) -> bool:
        """At least half of the queue's token bound is admitted and waiting: the model is behind."""
        return self._queue.tokens * 2 >= self.policy.max_queue_tokens

    def pending(self) -> tuple[int, int]:
        """(requests, rows) admitted and not yet computed: what leaving at once would drop."""
        with self._lock:
            rows = [*self._queue.rows(), *self._worker.running]
        return len({row.job for row in rows}), len(rows)

    # -- admission (event loop) ------------------------------------------------------------------
    def submit(self, rows: Sequence[Sequence[int]], deadline: float | None = None,
               finish: Finish | None = None, caller: Hashable = None) -> Job:
        """Queue a request's rows, or refuse them at once (Unavailable, Overloaded, DeadlineExceeded).

        With `finish`, the job's vectors come back finished so (server.engine.matryoshka), else as pooled.
        Callers (any key: the transport gives the connection's peer) take turns in the queue."""
        if not self._accepting:
            raise Unavailable("the server is shutting down")
        if not rows:
            raise ValueError("a job needs at least one row")
        job = Job(rows=len(rows), deadline=deadline, finish=finish, caller=caller)
        with self._lock:
            policy, worker = self._worker.policy_now(), self._worker
            self._admission.check(
                self._queue.tokens, sum(len(r) for r in rows), deadline, rows=len(rows),
                own=self._queue.caller_backlog(caller), others=self._queue.others_backlog(caller), policy=policy,
                running=(worker.running_tokens, worker.running_since) if worker.running else None,
                turns=lambda: self._queue.turns_needed(caller, rows, policy))
            was_empty = not len(self._queue)
            self._queue.add(job, rows)
            # The worker waits for a first row, or for a full batch until its window ends: waking it for
            # every row in between would only cost the event loop and the worker a thread switch each.
            if was_empty or self._worker.full():
                self._lock.notify()
        return job


__all__ = [
    "MODEL_THREAD", "Backend", "BatchPolicy", "BatchStats", "Batcher", "BatcherTotals", "Job", "NonFiniteEvent",
    "OutOfMemoryEvent", "choose_window",
]
