"""Whether a request may join the queue: a bound on queued tokens, and no work that cannot meet its deadline.

A refusal comes at once, on the event loop, with what a caller needs to act on it: Overloaded carries an
estimate of when the queue will have drained (sent as google.rpc.RetryInfo), DeadlineExceeded the wait
that exceeds the deadline. Both estimates come from the model's recent speed.
"""

from __future__ import annotations

import time

from server.errors import DeadlineExceeded, Overloaded


class Throughput:
    """Real tokens per second of model time, a moving average over batches (written by the worker thread)."""

    def __init__(self) -> None:
        self.tokens_per_s = 0.0  # 0 until the first batch

    def observe(self, tokens: int, seconds: float) -> None:
        rate = tokens / max(seconds, 1e-6)
        # The first batch sets the estimate: averaging it with zero would make it 5x too slow at first.
        self.tokens_per_s = 0.8 * self.tokens_per_s + 0.2 * rate if self.tokens_per_s else rate


class Admission:
    def __init__(self, max_queue_tokens: int, throughput: Throughput) -> None:
        self.max_queue_tokens = max_queue_tokens
        self.throughput = throughput

    def check(self, queued: int, tokens: int, deadline: float | None) -> None:
        """Raise Overloaded or DeadlineExceeded for a request of `tokens` tokens behind `queued` queued ones.

        An empty queue admits anything: a request larger than the bound still runs when nothing waits.
        """
        if not queued:
            return
        if queued + tokens > self.max_queue_tokens:
            raise Overloaded(f"queue full: {queued} tokens waiting, limit {self.max_queue_tokens}",
                             retry_after_s=self.drain_estimate_s(queued))
        rate = self.throughput.tokens_per_s
        if deadline is not None and rate > 0:
            # Refuse now what cannot finish in time, rather than compute it and throw it away.
            wait_s = (queued + tokens) / rate
            if time.monotonic() + wait_s > deadline:
                raise DeadlineExceeded(f"the estimated time to compute this request behind {queued} queued tokens "
                                       f"({wait_s:.2f}s) exceeds its deadline")

    def drain_estimate_s(self, queued_tokens: int) -> float:
        """Seconds until `queued_tokens` are computed, within [0.05, 30]; 1 before any batch has run."""
        rate = self.throughput.tokens_per_s
        if rate <= 0:
            return 1.0
        return min(30.0, max(0.05, queued_tokens / rate))


__all__ = ["Admission", "Throughput"]
