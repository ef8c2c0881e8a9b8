"""The event loop's side of every batch: vectors or errors reach the jobs, counters and hooks hear of it.

The worker thread posts each of these methods to the event loop (never calls them itself), so jobs'
futures, the totals and the hooks are only touched on the loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from server.engine.events import BatcherTotals, BatchStats, ModelBrokenEvent, NonFiniteEvent, OutOfMemoryEvent
from server.engine.jobs import Job, Row
from server.errors import DeadlineExceeded, EmbedError, NonFiniteVector


class Delivery:
    def __init__(self, on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self.totals = BatcherTotals()
        self.on_batch = on_batch  # after each delivered batch
        self.on_out_of_memory: Callable[[OutOfMemoryEvent], None] | None = None  # per split
        self.on_non_finite: Callable[[NonFiniteEvent], None] | None = None  # per batch with such vectors
        self.on_model_broken: Callable[[ModelBrokenEvent], None] | None = None  # a failed batch, failed probe
        self.on_model_recovered: Callable[[], None] | None = None  # after that, a batch ran and the probe passed

    def batch(self, batch: list[Row], vectors: Sequence[np.ndarray], stats: BatchStats) -> None:
        """The batch's vectors, one per row in order, as each row's job asked them finished."""
        for row, vector in zip(batch, vectors, strict=True):
            row.job.deliver(row.index, vector)
        self.totals.add(stats)
        if self.on_batch:
            self.on_batch(stats)

    def batch_failed(self, batch: list[Row], error: EmbedError) -> None:
        self.totals.failed_batches += 1
        for row in batch:
            row.job.fail(error)

    def model_broken(self, event: ModelBrokenEvent) -> None:
        if self.on_model_broken:
            self.on_model_broken(event)

    def model_recovered(self) -> None:
        if self.on_model_recovered:
            self.on_model_recovered()

    def too_large(self, rows: list[Row], error: EmbedError) -> None:
        """Rows that ran out of memory even alone."""
        self.totals.oom_rows += len(rows)
        for row in rows:
            row.job.fail(error)

    def non_finite(self, rows: list[Row], event: NonFiniteEvent) -> None:
        self.totals.non_finite_rows += len(rows)
        for row in sorted(rows, key=lambda r: r.index):  # a request hears of its first such row
            row.job.fail(NonFiniteVector(row.index, "the model gave a vector with NaN, infinity or no direction"))
        if self.on_non_finite:
            self.on_non_finite(event)

    def out_of_memory(self, event: OutOfMemoryEvent) -> None:
        self.totals.oom_splits += 1
        if self.on_out_of_memory:
            self.on_out_of_memory(event)

    def dropped(self, expired: list[Job], rows: int) -> None:
        """`rows` rows were skipped before compute; `expired` jobs among them ran out of time."""
        self.totals.dropped_rows += rows
        for job in expired:
            job.fail(DeadlineExceeded("the deadline passed while the request was queued"))


__all__ = ["Delivery"]
