"""The batcher end to end over a fake backend whose output encodes its input, so a misrouted vector fails."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest

from server.engine.batcher import BatchPolicy
from server.errors import DeadlineExceeded, Unavailable
from tests.helpers.fake_backend import FakeBackend, assert_encodes, occupy, rows_of, run, started


def test_each_caller_gets_its_own_rows_in_order() -> None:
    rng = random.Random(1)
    requests = [rows_of(rng, rng.randint(1, 9)) for _ in range(60)]

    async def main() -> list[np.ndarray]:
        batcher = await started(FakeBackend(), BatchPolicy(max_batch_tokens=400, max_batch_rows=16, wait_s=0.001))
        jobs = []
        for rows in requests:  # arrivals spread over time, so batches mix callers in varying ways
            jobs.append(batcher.submit(rows))
            await asyncio.sleep(rng.random() * 0.002)
        out = await asyncio.gather(*(j.result() for j in jobs))
        await batcher.stop()
        return out

    for rows, vectors in zip(requests, run(main()), strict=True):
        assert_encodes(vectors, rows)


def test_large_request_is_split_and_reassembled_in_order() -> None:
    rng = random.Random(2)
    rows = rows_of(rng, 300, (5, 40))
    backend = FakeBackend()

    async def main() -> np.ndarray:
        batcher = await started(backend, BatchPolicy(max_batch_tokens=100_000, max_batch_rows=64, wait_s=0))
        out = await batcher.submit(rows).result()
        await batcher.stop()
        return out

    assert_encodes(run(main()), rows)
    assert len(backend.batches) >= 300 / 64
    assert sorted(map(tuple, backend.seen)) == sorted(map(tuple, rows))


def test_small_requests_from_many_callers_share_a_batch() -> None:
    rng = random.Random(3)
    requests = [rows_of(rng, 1, (10, 12)) for _ in range(20)]
    backend = FakeBackend()

    async def main() -> list[np.ndarray]:
        batcher = await started(backend)
        blocker = await occupy(batcher, backend)
        jobs = [batcher.submit(rows) for rows in requests]
        backend.release()
        await blocker
        out = await asyncio.gather(*(j.result() for j in jobs))
        await batcher.stop()
        return out

    for rows, vectors in zip(requests, run(main()), strict=True):
        assert_encodes(vectors, rows)
    assert len(backend.batches) == 2  # the blocker, then all twenty together


def test_batches_respect_token_budget_and_row_cap() -> None:
    rng = random.Random(4)
    requests = [rows_of(rng, rng.randint(1, 12), (2, 90)) for _ in range(40)]
    policy = BatchPolicy(max_batch_tokens=300, max_batch_rows=7, wait_s=0)
    backend = FakeBackend()

    async def main() -> None:
        batcher = await started(backend, policy)
        blocker = await occupy(batcher, backend)
        jobs = [batcher.submit(rows) for rows in requests]
        backend.release()
        await asyncio.gather(blocker, *(j.result() for j in jobs))
        await batcher.stop()

    run(main())
    assert len(backend.batches) > 1
    for batch in backend.batches:
        assert len(batch) <= policy.max_batch_rows
        assert len(batch) * max(map(len, batch)) <= policy.max_batch_tokens


def test_a_row_longer_than_the_budget_runs_alone() -> None:
    backend = FakeBackend()
    long_row = list(range(1000, 1500))

    async def main() -> np.ndarray:
        batcher = await started(backend, BatchPolicy(max_batch_tokens=100, wait_s=0))
        blocker = await occupy(batcher, backend)
        job = batcher.submit([[5, 6], long_row, [7, 8, 9]])
        backend.release()
        await blocker
        out = await job.result()
        await batcher.stop()
        return out

    assert_encodes(run(main()), [[5, 6], long_row, [7, 8, 9]])
    assert [long_row] in backend.batches


def test_rows_are_grouped_by_length() -> None:
    rng = random.Random(5)
    short, long = rows_of(rng, 24, (10, 11)), rows_of(rng, 24, (200, 205))
    mixed = [r for pair in zip(short, long, strict=True) for r in pair]  # arrivals alternate short/long
    backend = FakeBackend()

    async def main() -> None:
        batcher = await started(backend, BatchPolicy(max_batch_tokens=10_000, max_batch_rows=64, wait_s=0))
        blocker = await occupy(batcher, backend)
        jobs = [batcher.submit([r]) for r in mixed]
        backend.release()
        await asyncio.gather(blocker, *(j.result() for j in jobs))
        await batcher.stop()

    run(main())
    batches = backend.batches[1:]
    assert len(batches) == 2
    for batch in batches:
        lengths = [len(r) for r in batch]
        assert 1 - sum(lengths) / (len(lengths) * max(lengths)) <= 0.1


def test_the_oldest_row_goes_into_the_next_batch() -> None:
    """However many short rows keep arriving, a long row that came first is not left behind."""
    backend = FakeBackend()
    long_row = list(range(2000, 2300))

    async def main() -> None:
        batcher = await started(backend, BatchPolicy(max_batch_tokens=2000, max_batch_rows=32, wait_s=0))
        blocker = await occupy(batcher, backend)
        old = batcher.submit([long_row])
        shorts = [batcher.submit([[i, i + 1, i + 2]]) for i in range(100, 400)]
        backend.release()
        await asyncio.gather(blocker, old.result(), *(j.result() for j in shorts))
        await batcher.stop()

    run(main())
    assert long_row in backend.batches[1]


def test_cancelled_rows_are_not_computed() -> None:
    backend = FakeBackend()

    async def main() -> np.ndarray:
        batcher = await started(backend)
        blocker = await occupy(batcher, backend)
        gone = batcher.submit([[9, 9, 9, 9], [8, 8, 8, 8]])
        kept = batcher.submit([[4, 5, 6]])
        gone.cancel()
        backend.release()
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await gone.result()
        out = await kept.result()
        assert batcher.queued_tokens == 0
        assert batcher.totals.dropped_rows == 2
        await batcher.stop()
        return out

    assert_encodes(run(main()), [[4, 5, 6]])
    assert [9, 9, 9, 9] not in backend.seen and [8, 8, 8, 8] not in backend.seen


def test_a_row_past_its_deadline_is_dropped_with_deadline_exceeded() -> None:
    backend = FakeBackend()

    async def main() -> None:
        batcher = await started(backend)
        blocker = await occupy(batcher, backend)
        late = batcher.submit([[7, 7, 7]], deadline=time.monotonic() + 0.05)
        on_time = batcher.submit([[3, 3]], deadline=time.monotonic() + 60)
        await asyncio.sleep(0.1)
        backend.release()
        await blocker
        with pytest.raises(DeadlineExceeded):
            await late.result()
        assert_encodes(await on_time.result(), [[3, 3]])
        await batcher.stop()

    run(main())
    assert [7, 7, 7] not in backend.seen


def test_the_event_loop_keeps_running_while_the_model_computes() -> None:
    backend = FakeBackend(seconds_per_batch=0.3)

    async def main() -> int:
        batcher = await started(backend)
        job = asyncio.ensure_future(batcher.submit([[1, 2]]).result())
        ticks = 0
        while not job.done():
            await asyncio.sleep(0.005)
            ticks += 1
        await batcher.stop()
        return ticks

    assert run(main()) >= 10  # a blocked loop would tick once


def test_an_idle_worker_does_not_wait_but_a_busy_one_gathers_rows() -> None:
    backend = FakeBackend()

    async def main() -> float:
        batcher = await started(backend, BatchPolicy(wait_s=1.0))
        first = batcher.submit([[1, 2]])
        await asyncio.wait_for(first.result(), 0.8)  # no wait_s at idle
        idle_s = first.inference_s + first.queue_s
        # Just after a batch, rows that arrive within wait_s go into one batch.
        jobs = []
        for i in range(5):
            jobs.append(batcher.submit([[10 + i, 11]]))
            await asyncio.sleep(0.02)
        await asyncio.gather(*(j.result() for j in jobs))
        await batcher.stop()
        return idle_s

    assert run(main()) < 0.8
    assert len(backend.batches) == 2


def test_stop_finishes_admitted_work_then_refuses_more() -> None:
    backend = FakeBackend(seconds_per_batch=0.01)
    rng = random.Random(6)
    requests = [rows_of(rng, 3) for _ in range(10)]

    async def main() -> None:
        batcher = await started(backend, BatchPolicy(max_batch_rows=4, wait_s=0))
        jobs = [batcher.submit(rows) for rows in requests]
        await batcher.stop(drain_timeout_s=10)
        for rows, job in zip(requests, jobs, strict=True):
            assert job.done
            assert_encodes(await job.result(), rows)
        with pytest.raises(Unavailable):
            batcher.submit([[1]])

    run(main())


def test_stop_after_its_timeout_fails_what_is_left() -> None:
    backend = FakeBackend()

    async def main() -> None:
        batcher = await started(backend)
        blocker = await occupy(batcher, backend)
        queued = batcher.submit([[1, 2, 3]])
        await batcher.stop(drain_timeout_s=0.05)
        for job in (queued,):
            with pytest.raises(Unavailable, match="before this request was computed"):
                await job.result()
        with pytest.raises(Unavailable, match="while computing"):
            await blocker
        backend.release()

    run(main())

def test_a_backend_row_limit_caps_every_batch() -> None:
    backend = FakeBackend(max_batch_rows=3)
    rows = [[i, i + 1] for i in range(10, 20)]

    async def main() -> np.ndarray:
        batcher = await started(backend, BatchPolicy(max_batch_rows=64, wait_s=0))
        assert batcher.policy.max_batch_rows == 3
        out = await batcher.submit(rows).result()
        await batcher.stop()
        return out

    assert_encodes(run(main()), rows)
    assert max(map(len, backend.batches)) == 3


@pytest.mark.parametrize("is_padded", [True, False])
def test_the_budget_counts_tokens_as_the_backend_says(is_padded: bool) -> None:
    """One long row and ten short ones: 200 real tokens, 1,100 padded; the budget is 200."""
    backend = FakeBackend(is_padded=is_padded)
    rows = [list(range(100, 200)), *([i] * 10 for i in range(1, 11))]

    async def main() -> np.ndarray:
        batcher = await started(backend, BatchPolicy(max_batch_tokens=200, wait_s=0))
        blocker = await occupy(batcher, backend)
        job = batcher.submit(rows)
        backend.release()
        await blocker
        out = await job.result()
        await batcher.stop()
        return out

    assert_encodes(run(main()), rows)
    batches = backend.batches[1:]
    if is_padded:
        assert len(batches) > 1 and all(len(b) * max(map(len, b)) <= 200 for b in batches)
    else:
        assert len(batches) == 1


def test_the_queue_is_backlogged_from_half_its_token_bound() -> None:
    backend = FakeBackend()

    async def main() -> list[bool]:
        batcher = await started(backend, BatchPolicy(max_batch_tokens=100, max_batch_rows=4, max_queue_tokens=40,
                                                     wait_s=0))
        seen = [batcher.backlogged]
        blocker = await occupy(batcher, backend)  # the model is busy: what comes next waits in the queue
        jobs = [batcher.submit([[1] * 10]) for _ in range(2)]
        seen.append(batcher.backlogged)  # 20 of 40 tokens
        backend.release()
        await asyncio.gather(blocker, *(j.result() for j in jobs))
        seen.append(batcher.backlogged)
        await batcher.stop()
        return seen

    assert run(main()) == [False, True, False]
