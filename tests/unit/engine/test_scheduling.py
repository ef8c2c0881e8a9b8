"""Which rows form the next batch: the window around the oldest row of the caller whose turn it is, counted as
the backend says."""

from __future__ import annotations

import asyncio
import random

import pytest

from server.engine.jobs import Job, Row
from server.engine.policy import BatchPolicy
from server.engine.scheduling import RowQueue, batch_tokens, choose_window, count_windows


@pytest.mark.parametrize("lengths", [[5] * 10, [3, 4, 10, 11, 12, 40, 41, 90], list(range(1, 200, 7))])
def test_window_keeps_padding_within_policy(lengths: list[int]) -> None:
    policy = BatchPolicy(max_batch_tokens=600, max_batch_rows=6, max_padding_fraction=0.1, overhead_tokens=8)
    for anchor in range(len(lengths)):
        lo, hi = choose_window(lengths, anchor, policy)
        chosen = lengths[lo:hi]
        assert lo <= anchor < hi and len(chosen) <= policy.max_batch_rows
        padded = len(chosen) * max(chosen)
        assert len(chosen) == 1 or padded <= policy.max_batch_tokens
        assert padded - sum(chosen) <= max(0.1 * padded, policy.overhead_tokens)


def test_window_pads_a_small_batch_rather_than_run_two() -> None:
    policy = BatchPolicy(max_padding_fraction=0.1, overhead_tokens=32)
    assert choose_window([10, 30], 0, policy) == (0, 2)  # 20 padded tokens < one more forward pass
    assert choose_window([10, 90], 0, policy) == (0, 1)  # 80 padded tokens > one more forward pass

def test_a_batch_counts_padded_or_real_tokens() -> None:
    assert batch_tokens(rows=3, longest=10, total=21, is_padded=True) == 30
    assert batch_tokens(rows=3, longest=10, total=21, is_padded=False) == 21


def test_an_unpadded_window_counts_real_tokens_and_ignores_padding() -> None:
    policy = BatchPolicy(max_batch_tokens=100, max_padding_fraction=0.1, overhead_tokens=32)
    assert choose_window([10, 90], 0, policy, is_padded=True) == (0, 1)  # 180 padded tokens, 80 of padding
    assert choose_window([10, 90], 0, policy, is_padded=False) == (0, 2)  # 100 real tokens; padding is free
    assert choose_window([50, 50, 50], 0, policy, is_padded=False) == (0, 2)  # the budget still holds


def _take_all(queue: RowQueue, policy: BatchPolicy) -> list[list[Row]]:
    batches = []
    while batch := queue.take_batch(policy):
        batches.append(batch)
    return batches


def _callers(batch: list[Row]) -> set[object]:
    return {row.job.caller for row in batch}


def _queued(queue: RowQueue, caller: str, lengths: list[int]) -> Job:
    job = Job(rows=len(lengths), deadline=None, caller=caller)
    queue.add(job, [[7] * n for n in lengths])
    return job


ONE_ROW = BatchPolicy(max_batch_rows=1)


def test_a_caller_with_a_backlog_holds_a_later_caller_back_by_one_batch() -> None:
    async def main() -> None:
        queue = RowQueue()
        for _ in range(6):
            _queued(queue, "flood", [10])
        _queued(queue, "polite", [10])
        assert [_callers(b) for b in _take_all(queue, ONE_ROW)] == [{"flood"}, {"polite"}] + [{"flood"}] * 5

    asyncio.run(main())


def test_the_caller_just_served_goes_behind_a_newcomer_even_after_all_its_rows_were_taken() -> None:
    async def main() -> None:
        queue = RowQueue()
        _queued(queue, "flood", [10])
        assert _callers(queue.take_batch(ONE_ROW)) == {"flood"}  # its lane is empty now
        _queued(queue, "flood", [10, 10])
        _queued(queue, "polite", [10])
        assert [_callers(b) for b in _take_all(queue, ONE_ROW)] == [{"polite"}, {"flood"}, {"flood"}]

    asyncio.run(main())


def test_a_turn_anchors_the_window_and_other_callers_rows_still_fill_it() -> None:
    async def main() -> None:
        queue = RowQueue()
        _queued(queue, "flood", [40, 40, 9, 9])
        _queued(queue, "polite", [10])
        policy = BatchPolicy(max_batch_rows=4, max_padding_fraction=0.1, overhead_tokens=4)
        first, second, *_ = _take_all(queue, policy)
        assert [r.length for r in first] == [40, 40]  # flood's oldest row, and the row of its length
        assert sorted(r.length for r in second) == [9, 9, 10] and "polite" in _callers(second)

    asyncio.run(main())


def test_a_turn_takes_the_callers_own_rows_first_then_fills_with_others() -> None:
    async def main() -> None:
        queue = RowQueue()
        for _ in range(60):
            _queued(queue, "flood", [16] * 4)
        polite = _queued(queue, "polite", [16] * 64)
        policy = BatchPolicy(max_batch_rows=128)
        first, second = queue.take_batch(policy), queue.take_batch(policy)
        assert {row.job.caller for row in first} == {"flood"}
        assert len([row for row in second if row.job is polite]) == 64 and len(second) == 128

    asyncio.run(main())


def test_a_turn_fills_with_the_oldest_of_other_callers_rows() -> None:
    async def main() -> None:
        queue = RowQueue()
        first, second = _queued(queue, "a", [10] * 3), _queued(queue, "b", [10] * 3)
        _queued(queue, "c", [10])
        two = BatchPolicy(max_batch_rows=2)
        assert [_callers(queue.take_batch(two)) for _ in range(2)] == [{"a"}, {"b"}]
        third = queue.take_batch(two)  # c's turn, filled with the oldest row left: a's, not b's
        assert sorted((row.job.caller, row.index) for row in third) == [("a", 2), ("c", 0)]
        assert [(row.job, row.index) for row in queue.rows()] == [(second, 2)] and first.rows == 3

    asyncio.run(main())


def test_without_padding_a_turn_fills_past_a_row_over_the_budget_with_shorter_ones() -> None:
    async def main() -> None:
        queue = RowQueue(is_padded=False)
        _queued(queue, "a", [10, 50])
        _queued(queue, "b", [45, 10, 10, 10, 10])
        first = queue.take_batch(BatchPolicy(max_batch_tokens=100, max_batch_rows=64))
        assert sorted(row.length for row in first) == [10, 10, 10, 10, 10, 50]  # the 45 does not fit; the 10s do

    asyncio.run(main())


def test_a_callers_rows_count_the_batches_their_lengths_make() -> None:
    policy = BatchPolicy(max_batch_tokens=16384, max_batch_rows=128, max_padding_fraction=0.1, overhead_tokens=32)
    assert count_windows([8, 64, 256, 512, 1024], policy) == 5  # too far apart to share a batch
    assert count_windows([10] * 200, policy) == 2  # the row cap
    assert count_windows([10] * 200, policy, is_padded=False) == 2

    async def main() -> None:
        queue = RowQueue()
        _queued(queue, "a", [512] * 3)
        assert queue.turns_needed("a", [[1] * 8], policy) == 2
        assert queue.turns_needed("b", [[1] * 8, [1] * 9], policy) == 1

    asyncio.run(main())


def test_one_caller_is_served_in_arrival_order() -> None:
    async def main() -> None:
        queue = RowQueue()
        jobs = [_queued(queue, "only", [n]) for n in (30, 5, 17, 5, 60)]
        assert [b[0].job for b in _take_all(queue, ONE_ROW)] == jobs

    asyncio.run(main())


@pytest.mark.parametrize("seed", range(20))
def test_no_caller_waits_for_a_second_turn_of_another(seed: int) -> None:
    """Random arrivals from five callers: while a caller has rows queued, every other caller's batches are
    anchored at its rows at most once before it has its own turn; and every row is taken exactly once."""
    rng = random.Random(seed)

    async def main() -> None:
        queue, added, taken = RowQueue(), [], []
        turns_since: dict[str, dict[str, int]] = {}  # waiting caller -> turns each other caller had since
        for _ in range(300):
            for _ in range(rng.choice((0, 0, 1, 3))):
                caller = f"c{rng.randrange(5)}"
                job = _queued(queue, caller, [rng.randint(1, 60) for _ in range(rng.randint(1, 4))])
                added.append(job)
                turns_since.setdefault(caller, {})
            batch = queue.take_batch(BatchPolicy(max_batch_tokens=120, max_batch_rows=rng.randint(1, 3)))
            if not batch:
                continue
            taken += batch
            anchor = queue._last
            turns_since.pop(anchor, None)
            for waiting, turns in turns_since.items():
                turns[anchor] = turns.get(anchor, 0) + 1
                assert turns[anchor] <= 1, f"{waiting} waited for a second turn of {anchor}"
            still = {row.job.caller for row in queue.rows()}
            turns_since = {c: t for c, t in turns_since.items() if c in still}
            if anchor in still:
                turns_since[anchor] = {}
        for batch in _take_all(queue, BatchPolicy()):
            taken += batch
        assert len(queue) == 0
        assert sorted((id(r.job), r.index) for r in taken) == sorted((id(j), i) for j in added for i in range(j.rows))

    asyncio.run(main())


class _CancelledWhileRead(Job):
    """A job whose caller cancels while the queue is reading it: `dead` turns true at its `at`-th reading."""

    def __init__(self, at: int) -> None:
        super().__init__(rows=2, deadline=None, caller="leaving")
        self.at, self.reads = at, 0

    @property
    def dead(self) -> bool:  # type: ignore[override]
        self.reads += 1
        return self.reads >= self.at


@pytest.mark.parametrize("at", range(1, 8))
def test_a_cancel_while_dead_rows_are_dropped_leaves_the_queue_whole(at: int) -> None:
    async def main() -> None:
        queue = RowQueue()
        gone = _queued(queue, "gone", [4])
        gone.cancel()
        stays = _queued(queue, "stays", [5, 6])
        leaving = _CancelledWhileRead(at)
        queue.add(leaving, [[1] * 7, [1] * 8])
        queue.drop_dead(0.0)
        rows = [row for batch in _take_all(queue, BatchPolicy()) for row in batch]
        assert {row.job for row in rows} - {leaving} == {stays} and len(queue) == 0 and queue.callers == 0
        assert len([row for row in rows if row.job is leaving]) in (0, 2)

    asyncio.run(main())
