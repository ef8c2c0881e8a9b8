"""What the batcher reports: one value per batch or incident, and running totals (metrics, benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchStats:
    """What one model batch was: for metrics and benchmarks."""

    rows: int
    tokens: int
    padded_tokens: int  # rows x longest row, whether or not the backend pads
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
    `budget_tokens` (counted as the batch budget is) until enough have run."""

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


@dataclass(frozen=True)
class ModelBrokenEvent:
    """A batch of `batch_rows` rows failed (`error`: how) or gave non-finite vectors, and the warm-up rows fail
    too: the model itself no longer runs right (a device gone, a runtime left in a bad state, weights gone
    bad), so every later batch would fail."""

    batch_rows: int
    error: str


__all__ = ["BatchStats", "BatcherTotals", "ModelBrokenEvent", "NonFiniteEvent", "OutOfMemoryEvent"]
