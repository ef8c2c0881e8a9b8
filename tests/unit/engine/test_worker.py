"""The worker thread: failures reach every caller, out-of-memory splits, non-finite vectors never leave."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from server.engine.batcher import Batcher, BatchPolicy
from server.engine.worker import TokenBudget
from server.errors import ModelFailure, NonFiniteVector, OutOfMemory
from tests.helpers.fake_backend import (
    NAN_TOKEN,
    POISON,
    FakeBackend,
    MemoryBoundBackend,
    NanBackend,
    assert_encodes,
    occupy,
    rows_of,
    run,
    started,
)


def test_a_failing_batch_fails_only_the_request_that_fails_alone_and_the_worker_lives_on() -> None:
    backend = FakeBackend()

    async def main() -> None:
        batcher = await started(backend)
        blocker = await occupy(batcher, backend)
        first, poisoned, second = (batcher.submit([[1, 2, 3, 4]]), batcher.submit([[POISON, 2, 3, 4]]),
                                   batcher.submit([[5, 6, 7, 8], [9, 10, 11, 12]]))
        backend.release()
        await blocker
        with pytest.raises(ModelFailure, match="poisoned row"):
            await poisoned.result()
        assert_encodes(await first.result(), [[1, 2, 3, 4]])  # its batch-mates run again, by halves
        assert_encodes(await second.result(), [[5, 6, 7, 8], [9, 10, 11, 12]])
        assert batcher.totals.failed_batches == 1
        # The batch; its halves (first | poisoned, second); the failing half's halves.
        assert [len(b) for b in backend.batches[-5:]] == [4, 1, 3, 1, 2]
        after = batcher.submit([[1, 2, 3, 4]])
        assert_encodes(await after.result(), [[1, 2, 3, 4]])
        await batcher.stop()

    run(main())


def test_out_of_memory_splits_the_batch_and_fails_only_rows_that_never_fit() -> None:
    rng = random.Random(11)
    fitting = [rows_of(rng, 3, (10, 20)) for _ in range(6)]
    too_long = [[5] * 80]
    backend = MemoryBoundBackend(capacity=40)

    async def main() -> None:
        batcher = await started(backend, BatchPolicy(max_batch_tokens=10_000, wait_s=0))
        blocker = await occupy(batcher, backend)
        jobs = [batcher.submit(rows) for rows in fitting]
        mixed = batcher.submit([fitting[0][0], too_long[0]])
        doomed = batcher.submit(too_long)
        backend.release()
        await blocker
        for rows, job in zip(fitting, jobs, strict=True):
            assert_encodes(await job.result(), rows)
        for job in (mixed, doomed):
            with pytest.raises(OutOfMemory, match=r"texts\[\d\] \(80 tokens\) does not fit"):
                await job.result()
        assert batcher.totals.oom_splits >= 3
        assert batcher.totals.oom_rows == 2  # each request's long row, each tried alone once
        assert batcher.totals.failed_batches == 0
        after = batcher.submit([[1, 2, 3, 4]])  # the worker lives on
        assert_encodes(await after.result(), [[1, 2, 3, 4]])
        await batcher.stop()

    run(main())
    assert all(len(b) * max(map(len, b)) <= backend.capacity for b in backend.batches[1:])


def test_after_out_of_memory_batches_stay_within_the_lowered_budget() -> None:
    rng = random.Random(12)
    backend = MemoryBoundBackend(capacity=200)

    async def main() -> None:
        batcher = await started(backend, BatchPolicy(max_batch_tokens=2_000, max_padding_fraction=1.0, wait_s=0))
        events = []
        batcher.delivery.on_out_of_memory = events.append
        for _ in range(3):  # each round queues more rows than fit in one batch
            blocker = await occupy(batcher, backend)
            jobs = [batcher.submit(rows_of(rng, 4, (20, 20))) for _ in range(5)]
            backend.release()
            await blocker
            await asyncio.gather(*(j.result() for j in jobs))
        await batcher.stop()
        assert batcher.totals.oom_splits == len(events) >= 1
        assert events[0].padded_tokens > 200 >= events[-1].budget_tokens

    run(main())
    assert len(backend.refused) <= 2  # once lowered, the budget keeps later batches from failing again


WARM_UP = [[101, 7, 8, 102], [101, 7, 102]]


@pytest.mark.parametrize("broken", [False, True])
def test_a_non_finite_vector_fails_its_request_and_the_probe_tells_a_broken_model(broken: bool) -> None:
    backend = NanBackend()

    async def main() -> None:
        batcher = Batcher(backend, BatchPolicy(wait_s=0))
        batcher.run_now(WARM_UP)  # becomes the probe
        events = []
        batcher.delivery.on_non_finite = events.append
        batcher.start()
        blocker = await occupy(batcher, backend)
        backend.broken = broken
        poisoned = batcher.submit([[1, 2, 3], [4, NAN_TOKEN, 5], [6, 7, 8]])
        clean = batcher.submit([[9, 10, 11]])
        backend.release()
        await blocker
        with pytest.raises(NonFiniteVector) as failure:
            await poisoned.result()
        if broken:  # every row is NaN now: the clean request fails too
            with pytest.raises(NonFiniteVector):
                await clean.result()
        else:
            assert_encodes(await clean.result(), [[9, 10, 11]])
        await batcher.stop()
        assert failure.value.row == (0 if broken else 1)
        assert len(events) == 1
        assert (events[0].rows, events[0].batch_rows, events[0].model_broken) == (4 if broken else 1, 4, broken)
        assert batcher.totals.non_finite_rows == events[0].rows and batcher.totals.failed_batches == 0

    run(main())
    assert backend.batches[-1] == WARM_UP  # the probe ran after the batch


def test_without_warm_up_rows_non_finite_vectors_fail_requests_but_judge_no_model() -> None:
    backend = NanBackend()
    backend.broken = True

    async def main() -> None:
        batcher = await started(backend)
        events = []
        batcher.delivery.on_non_finite = events.append
        with pytest.raises(NonFiniteVector):
            await batcher.submit([[1, 2, 3]]).result()
        await batcher.stop()
        assert [e.model_broken for e in events] == [False]

    run(main())
    assert backend.batches == [[[1, 2, 3]]]  # no probe to run


def test_out_of_memory_on_an_unpadded_backend_halves_its_real_tokens() -> None:
    backend = MemoryBoundBackend(capacity=100, is_padded=False)
    rows = [[9] * 60, *([i] * 10 for i in range(1, 9))]  # 140 real tokens, 540 padded

    async def main() -> None:
        batcher = await started(backend, BatchPolicy(max_batch_tokens=1_000, wait_s=0))
        events = []
        batcher.delivery.on_out_of_memory = events.append
        blocker = await occupy(batcher, backend)
        job = batcher.submit(rows)
        backend.release()
        await blocker
        assert_encodes(await job.result(), rows)
        await batcher.stop()
        assert [(e.rows, e.padded_tokens, e.budget_tokens) for e in events] == [(9, 540, 70)]
        assert batcher.budget_tokens == 70

    run(main())
    assert backend.refused == [140]


def test_the_budget_grows_back_after_enough_batches_within_it() -> None:
    budget = TokenBudget(1000)
    budget.lower_below(400)
    assert budget.tokens == 200
    for _ in range(63):
        budget.ran()
    assert budget.tokens == 200
    budget.ran()
    assert budget.tokens == 250
    for _ in range(64 * 10):
        budget.ran()
    assert budget.tokens == 1000


def test_a_failure_after_an_out_of_memory_split_reruns_only_rows_not_yet_computed() -> None:
    # Sorted by length the batch is [A0, C, A1, P]: out of memory, its shorter half (A0, C) runs and is delivered,
    # then the other half fails on P. Each request then runs alone, and A, whose A0 was delivered already, must get
    # A1 once more, not A0 twice (which completed it with a row missing).
    backend = MemoryBoundBackend(capacity=12)
    a_rows = [[1, 2], [5, 6, 7, 8, 9]]

    async def main() -> None:
        batcher = await started(backend, BatchPolicy(max_batch_tokens=10_000, wait_s=0))
        blocker = await occupy(batcher, backend)
        a, c, p = (batcher.submit(a_rows), batcher.submit([[3, 3, 3]]), batcher.submit([[POISON, 1, 1, 1, 1]]))
        backend.release()
        await blocker
        assert_encodes(await a.result(), a_rows)
        assert_encodes(await c.result(), [[3, 3, 3]])
        with pytest.raises(ModelFailure, match="poisoned row"):
            await p.result()
        # The halves, then A1 alone (not A0 again), then P alone (failing again); C is not run again.
        assert backend.batches[-4:] == [[a_rows[0], [3, 3, 3]], [a_rows[1], [POISON, 1, 1, 1, 1]], [a_rows[1]],
                                        [[POISON, 1, 1, 1, 1]]]
        await batcher.stop()

    run(main())


def test_one_bad_request_among_many_costs_a_few_batches_not_one_per_request() -> None:
    backend = FakeBackend()

    async def main() -> None:
        batcher = await started(backend, BatchPolicy(max_batch_tokens=10_000, wait_s=0))
        blocker = await occupy(batcher, backend)
        jobs = [batcher.submit([[POISON if i == 37 else 100 + i, 1, 2]]) for i in range(64)]
        calls = len(backend.batches)
        backend.release()
        await blocker
        outcomes = await asyncio.gather(*(job.result() for job in jobs), return_exceptions=True)
        assert [i for i, o in enumerate(outcomes) if isinstance(o, ModelFailure)] == [37]
        assert len(backend.batches) - calls == 1 + 2 * 6  # the batch, then two halves per level of 64 -> 1
        await batcher.stop()

    run(main())


def test_a_request_an_out_of_memory_half_answered_is_not_dropped_when_its_deadline_passes_later() -> None:
    # Out of memory: X's half runs (0.5 s) and answers it within its deadline; P's half then fails (another 0.5 s),
    # and the reruns come after X's deadline: X was answered, so it is neither failed nor counted dropped.
    backend = MemoryBoundBackend(capacity=8)
    backend.seconds_per_batch = 0.5

    async def main() -> None:
        batcher = await started(backend, BatchPolicy(max_batch_tokens=10_000, wait_s=0))
        blocker = await occupy(batcher, backend)
        x = batcher.submit([[1, 2]], deadline=time.monotonic() + 0.75 + backend.seconds_per_batch)
        p = batcher.submit([[POISON, 1, 1, 1, 1]])
        backend.release()
        await blocker
        assert_encodes(await x.result(), [[1, 2]])
        with pytest.raises(ModelFailure):
            await p.result()
        assert not x.failed and batcher.totals.dropped_rows == 0
        await batcher.stop()

    run(main())
