"""Which admitted rows form the next batch: the queue of rows and the window chosen from it.

Rows are grouped by length under the batch token budget and a row cap, around the oldest row of one caller
at a time, callers taking turns: nothing starves, and a caller with much queued cannot hold others back.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Hashable, Iterator, Sequence
from itertools import count

from server.engine.jobs import Job, Row
from server.engine.policy import BatchPolicy


def batch_tokens(rows: int, longest: int, total: int, is_padded: bool) -> int:
    """What a batch of `rows` rows, the longest `longest` tokens and `total` tokens in all, counts against
    the batch token budget: rows x longest when the backend pads (Backend.is_padded), else its real tokens."""
    return rows * longest if is_padded else total


def choose_window(lengths: Sequence[int], anchor: int, policy: BatchPolicy, is_padded: bool = True) -> tuple[int, int]:
    """The slice [lo, hi) of length-sorted rows, around `anchor`, that forms the next batch.

    Grows one row at a time, toward whichever neighbour adds less padding, while the batch stays within the
    row cap and the token budget (counted by `batch_tokens`). For a padded backend its padding must also stay
    within the larger of `max_padding_fraction` of the batch and `overhead_tokens`; for one that does not
    pad, padding costs nothing.
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
            cost = batch_tokens(hi - lo + 1, max(longest, length), total + length, is_padded)
            if cost <= policy.max_batch_tokens and (
                not is_padded or waste <= max(policy.max_padding_fraction * padded, policy.overhead_tokens)
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


class _Lane:
    """One caller's queued rows, in arrival order (rows already taken into a batch are skipped lazily)."""

    __slots__ = ("arrivals", "rows", "tokens", "turn")

    def __init__(self, turn: int) -> None:
        self.arrivals: deque[Row] = deque()
        self.rows = 0  # not yet taken
        self.tokens = 0  # real tokens not yet taken
        self.turn = turn  # the last batch anchored at this caller's row (see RowQueue.take_batch)


class RowQueue:
    """Admitted rows, sorted by length for grouping and kept in arrival order per caller for fairness.

    Each batch is anchored at the oldest row of one caller: the one whose last turn is longest ago, and among
    equals the one whose oldest row is oldest. A caller that arrives joins one turn behind the latest batch
    (the caller of that batch keeps its own turn), so it goes ahead of the caller just served and behind every
    caller already waiting. A caller with many rows queued thus delays another by at most one batch per turn,
    and no caller waits for a second turn of another. With one caller this is arrival order.

    Changed only under the batcher's lock; `tokens` (real tokens queued) is also read without it, for metrics.
    """

    def __init__(self, is_padded: bool = True) -> None:
        self.is_padded = is_padded
        self._seq = count()
        self._turn = 0  # batches taken
        self._last: Hashable = None  # the caller whose turn the last batch was
        self._clear()

    def _clear(self) -> None:
        self._keys: list[tuple[int, int]] = []  # (length, seq), sorted
        self._rows: list[Row] = []  # parallel to _keys
        self._lanes: dict[Hashable, _Lane] = {}  # caller -> its rows
        self._taken: set[int] = set()  # seqs taken into a batch but still in a lane's arrivals
        self._jobs: dict[Job, int] = {}  # job -> its rows still queued
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._keys)

    def rows(self) -> list[Row]:
        return list(self._rows)

    @property
    def callers(self) -> int:
        """Callers with rows queued."""
        return len(self._lanes)

    def caller_backlog(self, caller: Hashable) -> tuple[int, int]:
        """Real tokens and rows queued for `caller`."""
        lane = self._lanes.get(caller)
        return (lane.tokens, lane.rows) if lane else (0, 0)

    def others_tokens(self, caller: Hashable) -> Iterator[int]:
        """Real tokens queued for each caller other than `caller` (lazily: under the lock)."""
        return (lane.tokens for other, lane in self._lanes.items() if other != caller)

    def add(self, job: Job, rows: Sequence[Sequence[int]]) -> None:
        lane = self._lanes.get(job.caller)
        if lane is None:
            # Behind every caller already waiting (who is older) and ahead of the caller just served, even
            # when that caller's rows were all taken and it comes back.
            lane = self._lanes[job.caller] = _Lane(self._turn if job.caller == self._last else self._turn - 1)
        for i, ids in enumerate(rows):
            row = Row(job, i, ids, next(self._seq))
            at = bisect.bisect_right(self._keys, (row.length, row.seq))
            self._keys.insert(at, (row.length, row.seq))
            self._rows.insert(at, row)
            lane.arrivals.append(row)
        tokens = sum(len(r) for r in rows)
        lane.rows += len(rows)
        lane.tokens += tokens
        self._jobs[job] = len(rows)
        self.tokens += tokens

    def drop_dead(self, now: float) -> tuple[list[Job], int]:
        """Forget the rows of jobs that were cancelled, failed or are past their deadline.

        Returns the jobs that just ran out of time (their callers must hear of it) and the rows dropped.
        """
        expired = [j for j in self._jobs if not j.dead and j.deadline is not None and now > j.deadline]
        for job in expired:
            job.failed = True
        before = len(self._rows)
        # One reading of who is dead: a caller can cancel on the event loop meanwhile, and every structure
        # below must drop the same jobs (a job's rows left in one and gone from another break the next batch).
        dead = {job for job in self._jobs if job.dead}
        if dead:
            keep = [i for i, row in enumerate(self._rows) if row.job not in dead]
            self._keys = [self._keys[i] for i in keep]
            self._rows = [self._rows[i] for i in keep]
            for caller, lane in list(self._lanes.items()):
                lane.arrivals = deque(r for r in lane.arrivals if r.job not in dead and r.seq not in self._taken)
                lane.rows, lane.tokens = len(lane.arrivals), sum(r.length for r in lane.arrivals)
                if not lane.rows:
                    del self._lanes[caller]
            self._taken.clear()
            self._jobs = {j: n for j, n in self._jobs.items() if j not in dead}
            self.tokens = sum(k[0] for k in self._keys)
        return expired, before - len(self._rows)

    def take_batch(self, policy: BatchPolicy) -> list[Row]:
        """Remove and return the next batch: the window around the oldest row of the caller whose turn it is
        ([] when empty)."""
        if not self._lanes:
            return []
        for lane in self._lanes.values():
            while lane.arrivals[0].seq in self._taken:
                self._taken.discard(lane.arrivals.popleft().seq)
        lane = min(self._lanes.values(), key=lambda lane: (lane.turn, lane.arrivals[0].seq))
        oldest = lane.arrivals[0]
        self._turn += 1
        lane.turn, self._last = self._turn, oldest.job.caller
        anchor = bisect.bisect_left(self._keys, (oldest.length, oldest.seq))
        lo, hi = choose_window(_Lengths(self._keys), anchor, policy, self.is_padded)
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
            owner = self._lanes[row.job.caller]
            owner.rows -= 1
            owner.tokens -= row.length
            if not owner.rows:  # all its rows are taken: forget them, and the lane
                self._taken.difference_update(r.seq for r in owner.arrivals)
                del self._lanes[row.job.caller]
        return batch

    def take_all(self) -> list[Row]:
        rows = self._rows
        self._clear()
        return rows


__all__ = ["RowQueue", "batch_tokens", "choose_window"]
