"""Whether a request may join the queue: a bound on queued tokens, and no work that cannot meet its deadline.

Callers are told apart (by connection, see RowQueue) and take turns, so neither check lets one caller's
backlog stand between another caller and the model. A refusal comes at once, on the event loop, with what a
caller needs to act on it: Overloaded carries an estimate of when the queue will have drained (sent as
google.rpc.RetryInfo), DeadlineExceeded the wait that exceeds the deadline. Both estimates come from the
model's recent speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from server.engine.policy import BatchPolicy
from server.errors import DeadlineExceeded, Overloaded


class Throughput:
    """Real tokens per second of model time over recent batches (written by the worker thread): recent tokens
    over recent seconds, each batch's share decaying by the same factor. Weighting by time, not by batch,
    keeps many small batches (a short request's turn among long ones) from passing for the model's speed; a
    batch counts as at most twice as slow as the estimate, so that one stalled batch (a collection pause, a
    busy host) moves the estimate instead of holding it down for the next twenty."""

    _DECAY = 0.8
    _MAX_SLOWER = 2.0

    def __init__(self) -> None:
        self.tokens_per_s = 0.0  # 0 until the first batch
        self._tokens = 0.0
        self._seconds = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        seconds = max(seconds, 1e-6)
        if self.tokens_per_s:
            seconds = min(seconds, self._MAX_SLOWER * tokens / self.tokens_per_s)
        self._tokens = self._DECAY * self._tokens + tokens
        self._seconds = self._DECAY * self._seconds + seconds
        self.tokens_per_s = self._tokens / self._seconds


class Admission:
    def __init__(self, max_queue_tokens: int, throughput: Throughput, policy: BatchPolicy | None = None) -> None:
        self.max_queue_tokens = max_queue_tokens
        self.throughput = throughput
        self.policy = policy or BatchPolicy()

    def check(self, queued: int, tokens: int, deadline: float | None, *, rows: int = 1,
              own: tuple[int, int] | None = None, others: Iterable[tuple[int, int]] = (),
              policy: BatchPolicy | None = None, running: tuple[int, float] | None = None,
              turns: Callable[[], int] | None = None) -> None:
        """Raise Overloaded or DeadlineExceeded for a request of `tokens` tokens in `rows` rows behind `queued`
        queued tokens: `own` (tokens, rows) of them its caller's, `others` each other caller's (tokens, rows)
        (RowQueue.caller_backlog, others_backlog); behind the batch `running` on the model, (its real tokens,
        when it started), if any. `policy` is the batch policy of now (after an out-of-memory, a lower token
        budget than the one given at construction, the default); `turns`, if given, counts the batches the
        caller's rows make (RowQueue.turns_needed), called only when the estimate needs it.

        An empty queue admits a request of any size: one larger than the bound still runs when nothing waits. A
        caller with nothing queued is admitted up to twice the bound, so that one caller who filled the queue
        does not lock the others out: callers take turns, so their wait does not grow with that caller's backlog.
        """
        own_tokens, own_rows = (queued, 0) if own is None else own
        limit = self.max_queue_tokens if own_tokens else 2 * self.max_queue_tokens
        if queued and queued + tokens > limit:
            raise Overloaded(f"queue full: {queued} tokens waiting, limit {self.max_queue_tokens}"
                             f"{'' if own_tokens else ' (twice that for a connection with nothing queued)'}",
                             retry_after_s=self.drain_estimate_s(queued))
        rate = self.throughput.tokens_per_s
        if deadline is None or rate <= 0:
            return
        now = time.monotonic()
        # The rest of the batch on the model comes first, whoever's turn is next.
        busy_s = max(0.0, running[0] / rate - (now - running[1])) if running else 0.0
        if now + busy_s + (queued + tokens) / rate <= deadline:
            return  # in time even behind everything queued
        # Refuse now what cannot finish in time, rather than compute it and throw it away. Ahead of this
        # request: its caller's own rows, and from each other caller at most one batch per turn this caller
        # needs (turns counted by tokens, by rows, or by the batches its rows make of their lengths, whichever
        # needs most; another caller's batch by tokens or by rows, whichever fills first).
        policy = policy or self.policy
        batch, cap = policy.max_batch_tokens, policy.max_batch_rows
        mine = own_tokens + tokens
        turns = max(-(-mine // batch), -(-(own_rows + rows) // cap), turns() if turns else 1)
        ahead = mine + sum(min(other, turns * min(batch, cap * other // max(other_rows, 1)))
                           for other, other_rows in others)
        wait_s = busy_s + ahead / rate
        if now + wait_s > deadline:
            raise DeadlineExceeded(f"the estimated time to compute this request behind {ahead - tokens} "
                                   f"queued tokens ({wait_s:.2f}s) exceeds its deadline")

    def drain_estimate_s(self, queued_tokens: int) -> float:
        """Seconds until `queued_tokens` are computed, within [0.05, 30]; 1 before any batch has run."""
        rate = self.throughput.tokens_per_s
        if rate <= 0:
            return 1.0
        return min(30.0, max(0.05, queued_tokens / rate))


__all__ = ["Admission", "Throughput"]
