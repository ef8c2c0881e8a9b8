"""The batching policy: how big a batch may be, how long the worker waits for one, how much may queue."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPolicy:
    # Tokens per batch, counted as the backend's `is_padded` says (rows x longest row, or real tokens);
    # a longer single row still runs, alone.
    max_batch_tokens: int = 16384
    max_batch_rows: int = 128
    max_queue_tokens: int = 1_000_000  # real tokens admitted and not yet computed
    # After a batch, how long the worker waits for more rows when the next batch is not full (callers
    # answered by the last batch are often about to send again). An idle worker never waits.
    wait_s: float = 0.0
    max_padding_fraction: float = 0.1
    # A forward pass costs about this many tokens' worth of compute besides its padded tokens (weights
    # streamed once per pass), so a small batch may pad this much rather than run as two passes.
    overhead_tokens: int = 32


__all__ = ["BatchPolicy"]
