"""When to retry: which codes, how long to wait (the server's hint first), and the overall deadline."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from client.errors import EmbedError

# The server is busy, away or going away; the same request can succeed later, on it or on another server
# of a balanced target. Anything else is final. Embedding is idempotent, so sending a request again is safe
# even when the first attempt was computed and only its answer was lost.
# - UNAVAILABLE: no server reachable; the connection broke mid-call (a killed server: "Connection reset by
#   peer"); a draining server refused new work, or cancelled what was still running when its grace ended.
# - RESOURCE_EXHAUSTED: the server's queue is full (with a RetryInfo hint when the server sent it).
# - CANCELLED: a stopping server's grpc core cancels the calls it had received but not yet handed to the
#   server (of 3,000 calls outstanding at SIGTERM, 2,506 came back CANCELLED), and core cancels calls
#   beyond its pending limit. Our own cancellation never arrives as a status: asyncio raises CancelledError,
#   and a blocking call cannot be cancelled (closing the client mid-call is not retried: EmbedClient._call).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED})


class Deadline:
    """An absolute point in time (or none) shared by all attempts of one operation."""

    def __init__(self, timeout_s: float | None) -> None:
        self._at = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self._at is None else max(0.0, self._at - time.monotonic())

    def allows(self, seconds: float) -> bool:
        remaining = self.remaining()
        return remaining is None or seconds < remaining

    def expired_error(self, what: str) -> EmbedError:
        return EmbedError(grpc.StatusCode.DEADLINE_EXCEEDED, f"the deadline passed {what}")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; a server's RetryInfo hint replaces the backoff."""

    max_attempts: int = 5  # tries of one request, the first included
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    hint_jitter: float = 0.2  # up to 20% added to a hint, so clients told the same delay do not return at once

    def delay(self, failures: int, hint_s: float | None = None) -> float:
        """Seconds to wait after the `failures`-th consecutive failure."""
        if hint_s is not None:
            return hint_s * (1 + random.uniform(0, self.hint_jitter))
        cap = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(0, failures - 1))
        return cap / 2 + random.uniform(0, cap / 2)

    def next_delay(self, error: EmbedError, failures: int, deadline: Deadline) -> float | None:
        """How long to wait before trying again, or None when `error` is final: not retryable, out of
        attempts, or the wait would pass the deadline."""
        if error.code not in RETRYABLE or failures >= self.max_attempts:
            return None
        delay = self.delay(failures, error.retry_after_s)
        return delay if deadline.allows(delay) else None


NO_RETRIES = RetryPolicy(max_attempts=1)
