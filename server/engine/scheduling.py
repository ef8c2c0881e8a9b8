"""Which admitted rows form the next batch: the queue of rows and the window chosen from it.

Rows are grouped by length under the batch token budget and a row cap, starting from the rows of one caller
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


def _fits(rows: int, longest: int, total: int, policy: BatchPolicy, is_padded: bool) -> bool:
    """Whether such a batch keeps to the row cap and the token budget and, for a padded backend, keeps its
    padding within the larger of `max_padding_fraction` of the batch and `overhead_tokens`."""
    padded = rows * longest
    return rows <= policy.max_batch_rows and batch_tokens(rows, longest, total, is_padded) <= policy.max_batch_tokens \
        and (not is_padded or padded - total <= max(policy.max_padding_fraction * padded, policy.overhead_tokens))


def choose_window(lengths: Sequence[int], anchor: int, policy: BatchPolicy, is_padded: bool = True) -> tuple[int, int]:
    """The slice [lo, hi) of length-sorted rows, around `anchor`, that forms the next batch.

    Grows one row at a time, toward whichever neighbour adds less padding, while the batch `_fits`: within the
    row cap and the token budget (counted by `batch_tokens`) and, for a padded backend, the padding bound; for
    one that does not pad, padding costs nothing.
    """
    return extend_window(lengths, anchor, anchor + 1, lengths[anchor], lengths[anchor], policy, is_padded)


def extend_window(lengths: Sequence[int], lo: int, hi: int, longest: int, total: int, policy: BatchPolicy,
                  is_padded: bool = True) -> tuple[int, int]:
    """`choose_window` grown from the slice [lo, hi) (its longest row and its total given)."""
    while hi - lo < policy.max_batch_rows:
        options = []
        if lo > 0:  # a shorter row pads up to the longest
            options.append((longest - lengths[lo - 1], -1))
        if hi < len(lengths):  # a longer row makes every chosen row pad up to it
            options.append(((lengths[hi] - longest) * (hi - lo), 1))
        for _, side in sorted(options):
            length = lengths[lo - 1] if side < 0 else lengths[hi]
            if _fits(hi - lo + 1, max(longest, length), total + length, policy, is_padded):
                break
        else:
            return lo, hi
        if side < 0:
            lo -= 1
        else:
            hi += 1
        longest, total = max(longest, length), total + length
    return lo, hi


def count_windows(lengths: list[int], policy: BatchPolicy, is_padded: bool = True) -> int:
    """How many batches sorted `lengths` make on their own, each the window `choose_window` grows from the
    longest row left (emptied on the way)."""
    windows = 0
    while lengths:
        lo, hi = choose_window(lengths, len(lengths) - 1, policy, is_padded)
        del lengths[lo:hi]
        windows += 1
    return windows


class _Lengths(Sequence[int]):
    """The lengths of length-sorted keys, without copying them."""

    def __init__(self, keys: list[tuple[int, int]]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        return self._keys[i][0]


class _RowLengths(Sequence[int]):
    """The lengths of length-sorted rows, without copying them."""

    def __init__(self, rows: list[Row]) -> None:
        self._rows = rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):  # type: ignore[no-untyped-def, override]
        return self._rows[i].length


def _by_length(row: Row) -> tuple[int, int]:
    return row.length, row.seq


class _Lane:
    """One caller's queued rows, in arrival order and by length; rows taken into a batch (`Row.taken`) are
    skipped, and dropped lazily."""

    __slots__ = ("arrivals", "by_length", "rows", "tokens", "turn")

    def __init__(self, turn: int) -> None:
        self.arrivals: deque[Row] = deque()
        self.by_length: list[Row] = []  # sorted by (length, seq)
        self.rows = 0  # not yet taken
        self.tokens = 0  # real tokens not yet taken
        self.turn = turn  # the last batch anchored at this caller's row (see RowQueue.take_batch)

    def oldest(self) -> Row:
        while self.arrivals[0].taken:
            self.arrivals.popleft()
        return self.arrivals[0]

    def sorted_rows(self) -> list[Row]:
        """Its rows not yet taken, by length."""
        if len(self.by_length) != self.rows:
            self.by_length = [row for row in self.by_length if not row.taken]
        return self.by_length


class RowQueue:
    """Admitted rows, sorted by length for grouping and kept in arrival order per caller for fairness.

    Each batch is a turn of one caller: the one whose last turn is longest ago, and among equals the one whose
    oldest row is oldest. The batch is that caller's rows around its oldest one first (the window
    `choose_window` picks among its own rows), then other callers' rows of lengths in that range, then, if all
    of those fit, rows beyond it as `extend_window` grows. A caller that arrives joins one turn behind the
    latest batch (the caller of that batch keeps its own turn), so it goes ahead of the caller just served and
    behind every caller already waiting. A caller with many rows queued thus delays another by one batch per
    turn, and no caller waits for a second turn of another. With one caller this is the window around the
    oldest row, in arrival order.

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

    def others_backlog(self, caller: Hashable) -> Iterator[tuple[int, int]]:
        """Real tokens and rows queued for each caller other than `caller` (lazily: under the lock)."""
        return ((lane.tokens, lane.rows) for other, lane in self._lanes.items() if other != caller)

    def turns_needed(self, caller: Hashable, rows: Sequence[Sequence[int]], policy: BatchPolicy) -> int:
        """The turns `caller` needs for its queued rows and `rows` more: the batches they make on their own."""
        lane = self._lanes.get(caller)
        lengths = sorted([*(row.length for row in lane.sorted_rows()), *map(len, rows)] if lane else map(len, rows))
        return count_windows(lengths, policy, self.is_padded)

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
            bisect.insort(lane.by_length, row, key=_by_length)
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
            for caller in {job.caller for job in dead}:  # other callers' lanes are unchanged
                lane = self._lanes[caller]
                lane.arrivals = deque(r for r in lane.arrivals if r.job not in dead and not r.taken)
                lane.by_length = [r for r in lane.by_length if r.job not in dead and not r.taken]
                lane.rows, lane.tokens = len(lane.arrivals), sum(r.length for r in lane.arrivals)
                if not lane.rows:
                    del self._lanes[caller]
            self._jobs = {j: n for j, n in self._jobs.items() if j not in dead}
            self.tokens = sum(k[0] for k in self._keys)
        return expired, before - len(self._rows)

    def take_batch(self, policy: BatchPolicy) -> list[Row]:
        """Remove and return the next batch, the turn of one caller ([] when empty)."""
        if not self._lanes:
            return []
        lane = min(self._lanes.values(), key=lambda lane: (lane.turn, lane.oldest().seq))
        oldest = lane.oldest()
        self._turn += 1
        lane.turn, self._last = self._turn, oldest.job.caller
        own = lane.sorted_rows()
        lo, hi = choose_window(_RowLengths(own), bisect.bisect_left(own, _by_length(oldest), key=_by_length), policy,
                               self.is_padded)
        picked = self._fill(own[lo:hi], policy)
        del own[lo:hi]  # taken: only rows taken in other callers' turns are left for sorted_rows to drop
        for row in picked:
            row.taken = True
            self.tokens -= row.length
            left = self._jobs[row.job] - 1
            if left:
                self._jobs[row.job] = left
            else:
                del self._jobs[row.job]
            owner = self._lanes[row.job.caller]
            owner.rows -= 1
            owner.tokens -= row.length
            if not owner.rows:  # all its rows are taken: forget the lane
                del self._lanes[row.job.caller]
        return picked

    def _fill(self, own: list[Row], policy: BatchPolicy) -> list[Row]:
        """The batch of a turn whose own rows are `own` (length-sorted): with other rows of lengths within
        theirs, longest first and oldest first, while the batch fits; if all of those fit, grown beyond as
        `extend_window` does. Removes the batch from the length-sorted keys."""
        shortest, longest = own[0].length, own[-1].length
        a = bisect.bisect_left(self._keys, (shortest, -1))
        b = bisect.bisect_left(self._keys, (longest + 1, -1))
        if b - a == len(own):  # nothing else of these lengths: grow as one window
            lo, hi = extend_window(_Lengths(self._keys), a, b, longest, sum(r.length for r in own), policy,
                                   self.is_padded)
            return self._remove(range(lo, hi))
        mine = {row.seq for row in own}
        chosen, total, complete = list(own), sum(row.length for row in own), True
        at = [bisect.bisect_left(self._keys, _by_length(row), a, b) for row in own]
        for i in self._longest_then_oldest(a, b):
            length, seq = self._keys[i]
            if seq in mine:
                continue
            if not _fits(len(chosen) + 1, longest, total + length, policy, self.is_padded):
                if self.is_padded or len(chosen) >= policy.max_batch_rows:
                    return self._remove(sorted(at))  # a shorter row pads more: it cannot fit either
                complete = False  # without padding, a shorter row may still fit the budget
                continue
            chosen.append(self._rows[i])
            at.append(i)
            total += length
        if not complete:
            return self._remove(sorted(at))
        lo, hi = extend_window(_Lengths(self._keys), a, b, longest, total, policy, self.is_padded)
        return self._remove(range(lo, hi))

    def _longest_then_oldest(self, a: int, b: int) -> Iterator[int]:
        """Indices in [a, b) of the length-sorted keys, the longest rows first (the least padding), each
        length oldest first."""
        end = b
        while end > a:
            start = bisect.bisect_left(self._keys, (self._keys[end - 1][0], -1), a, end)
            yield from range(start, end)
            end = start

    def _remove(self, indices: Sequence[int]) -> list[Row]:
        """Take the rows at these ascending indices out of the length-sorted keys."""
        rows = [self._rows[i] for i in indices]
        if isinstance(indices, range):
            del self._keys[indices.start:indices.stop], self._rows[indices.start:indices.stop]
        else:
            for i in reversed(indices):
                del self._keys[i], self._rows[i]
        return rows

    def take_all(self) -> list[Row]:
        rows = self._rows
        self._clear()
        return rows


__all__ = ["RowQueue", "batch_tokens", "choose_window", "count_windows", "extend_window"]
