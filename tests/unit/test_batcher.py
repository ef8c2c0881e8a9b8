"""The batcher with a fake model whose output encodes its input, so a misrouted vector fails a test."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Coroutine, Sequence
from typing import Any

import numpy as np
import pytest

from server.batcher import Batcher, BatchPolicy, choose_window
from server.errors import DeadlineExceeded, ModelFailure, NonFiniteVector, OutOfMemory, Overloaded, Unavailable

POISON = 666  # a token id the fake model fails on


def encode(ids: Sequence[int]) -> np.ndarray:
    """What the fake model returns for one row: its length and a position-sensitive hash of its ids."""
    digest = sum((i + 1) * t for i, t in enumerate(ids)) % 1_000_003
    return np.array([len(ids), digest], dtype=np.float64)


class FakeModel:
    """Records every batch; `hold()` makes the next batch wait until `release()`."""

    def __init__(self, seconds_per_batch: float = 0.0) -> None:
        self.batches: list[list[list[int]]] = []
        self.seconds_per_batch = seconds_per_batch
        self._gate: threading.Event | None = None
        self.entered = threading.Event()

    def hold(self) -> None:
        self._gate = threading.Event()
        self.entered.clear()

    def release(self) -> None:
        assert self._gate is not None
        self._gate.set()

    def __call__(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        self.batches.append([list(r) for r in rows])
        self.entered.set()
        if self._gate is not None:
            assert self._gate.wait(10), "held batch never released"
            self._gate = None
        time.sleep(self.seconds_per_batch)
        if any(POISON in r for r in rows):
            raise RuntimeError("poisoned row")
        return np.stack([encode(r) for r in rows])

    @property
    def seen(self) -> list[list[int]]:
        return [row for batch in self.batches for row in batch]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def rows_of(rng: random.Random, n: int, lengths: tuple[int, int] = (3, 60)) -> list[list[int]]:
    return [[rng.randrange(1000, 30000) for _ in range(rng.randint(*lengths))] for _ in range(n)]


async def started(model: FakeModel, policy: BatchPolicy | None = None) -> Batcher:
    batcher = Batcher(model, policy or BatchPolicy(wait_s=0))
    batcher.start()
    return batcher


async def occupy(batcher: Batcher, model: FakeModel) -> asyncio.Future[np.ndarray]:
    """Put the worker on a held batch, so what is submitted next queues up."""
    model.hold()
    blocker = asyncio.ensure_future(batcher.submit([[1, 2, 3]]).result())
    assert await asyncio.to_thread(model.entered.wait, 10)
    return blocker


def assert_encodes(vectors: np.ndarray, rows: Sequence[Sequence[int]]) -> None:
    np.testing.assert_array_equal(vectors, np.stack([encode(r) for r in rows]))


def test_each_caller_gets_its_own_rows_in_order() -> None:
    rng = random.Random(1)
    requests = [rows_of(rng, rng.randint(1, 9)) for _ in range(60)]

    async def main() -> list[np.ndarray]:
        batcher = await started(FakeModel(), BatchPolicy(max_batch_tokens=400, max_batch_rows=16, wait_s=0.001))
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
    model = FakeModel()

    async def main() -> np.ndarray:
        batcher = await started(model, BatchPolicy(max_batch_tokens=100_000, max_batch_rows=64, wait_s=0))
        out = await batcher.submit(rows).result()
        await batcher.stop()
        return out

    assert_encodes(run(main()), rows)
    assert len(model.batches) >= 300 / 64
    assert sorted(map(tuple, model.seen)) == sorted(map(tuple, rows))


def test_small_requests_from_many_callers_share_a_batch() -> None:
    rng = random.Random(3)
    requests = [rows_of(rng, 1, (10, 12)) for _ in range(20)]
    model = FakeModel()

    async def main() -> list[np.ndarray]:
        batcher = await started(model)
        blocker = await occupy(batcher, model)
        jobs = [batcher.submit(rows) for rows in requests]
        model.release()
        await blocker
        out = await asyncio.gather(*(j.result() for j in jobs))
        await batcher.stop()
        return out

    for rows, vectors in zip(requests, run(main()), strict=True):
        assert_encodes(vectors, rows)
    assert len(model.batches) == 2  # the blocker, then all twenty together


def test_batches_respect_token_budget_and_row_cap() -> None:
    rng = random.Random(4)
    requests = [rows_of(rng, rng.randint(1, 12), (2, 90)) for _ in range(40)]
    policy = BatchPolicy(max_batch_tokens=300, max_batch_rows=7, wait_s=0)
    model = FakeModel()

    async def main() -> None:
        batcher = await started(model, policy)
        blocker = await occupy(batcher, model)
        jobs = [batcher.submit(rows) for rows in requests]
        model.release()
        await asyncio.gather(blocker, *(j.result() for j in jobs))
        await batcher.stop()

    run(main())
    assert len(model.batches) > 1
    for batch in model.batches:
        assert len(batch) <= policy.max_batch_rows
        assert len(batch) * max(map(len, batch)) <= policy.max_batch_tokens


def test_a_row_longer_than_the_budget_runs_alone() -> None:
    model = FakeModel()
    long_row = list(range(1000, 1500))

    async def main() -> np.ndarray:
        batcher = await started(model, BatchPolicy(max_batch_tokens=100, wait_s=0))
        blocker = await occupy(batcher, model)
        job = batcher.submit([[5, 6], long_row, [7, 8, 9]])
        model.release()
        await blocker
        out = await job.result()
        await batcher.stop()
        return out

    assert_encodes(run(main()), [[5, 6], long_row, [7, 8, 9]])
    assert [long_row] in model.batches


def test_rows_are_grouped_by_length() -> None:
    rng = random.Random(5)
    short, long = rows_of(rng, 24, (10, 11)), rows_of(rng, 24, (200, 205))
    mixed = [r for pair in zip(short, long, strict=True) for r in pair]  # arrivals alternate short/long
    model = FakeModel()

    async def main() -> None:
        batcher = await started(model, BatchPolicy(max_batch_tokens=10_000, max_batch_rows=64, wait_s=0))
        blocker = await occupy(batcher, model)
        jobs = [batcher.submit([r]) for r in mixed]
        model.release()
        await asyncio.gather(blocker, *(j.result() for j in jobs))
        await batcher.stop()

    run(main())
    batches = model.batches[1:]
    assert len(batches) == 2
    for batch in batches:
        lengths = [len(r) for r in batch]
        assert 1 - sum(lengths) / (len(lengths) * max(lengths)) <= 0.1


def test_the_oldest_row_goes_into_the_next_batch() -> None:
    """However many short rows keep arriving, a long row that came first is not left behind."""
    model = FakeModel()
    long_row = list(range(2000, 2300))

    async def main() -> None:
        batcher = await started(model, BatchPolicy(max_batch_tokens=2000, max_batch_rows=32, wait_s=0))
        blocker = await occupy(batcher, model)
        old = batcher.submit([long_row])
        shorts = [batcher.submit([[i, i + 1, i + 2]]) for i in range(100, 400)]
        model.release()
        await asyncio.gather(blocker, old.result(), *(j.result() for j in shorts))
        await batcher.stop()

    run(main())
    assert long_row in model.batches[1]


def test_cancelled_rows_are_not_computed() -> None:
    model = FakeModel()

    async def main() -> np.ndarray:
        batcher = await started(model)
        blocker = await occupy(batcher, model)
        gone = batcher.submit([[9, 9, 9, 9], [8, 8, 8, 8]])
        kept = batcher.submit([[4, 5, 6]])
        gone.cancel()
        model.release()
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await gone.result()
        out = await kept.result()
        assert batcher.queued_tokens == 0
        assert batcher.totals.dropped_rows == 2
        await batcher.stop()
        return out

    assert_encodes(run(main()), [[4, 5, 6]])
    assert [9, 9, 9, 9] not in model.seen and [8, 8, 8, 8] not in model.seen


def test_a_row_past_its_deadline_is_dropped_with_deadline_exceeded() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher = await started(model)
        blocker = await occupy(batcher, model)
        late = batcher.submit([[7, 7, 7]], deadline=time.monotonic() + 0.05)
        on_time = batcher.submit([[3, 3]], deadline=time.monotonic() + 60)
        await asyncio.sleep(0.1)
        model.release()
        await blocker
        with pytest.raises(DeadlineExceeded):
            await late.result()
        assert_encodes(await on_time.result(), [[3, 3]])
        await batcher.stop()

    run(main())
    assert [7, 7, 7] not in model.seen


def test_a_failing_batch_reaches_every_caller_and_the_worker_lives_on() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher = await started(model)
        blocker = await occupy(batcher, model)
        victims = [batcher.submit([[1, 2, 3, 4]]), batcher.submit([[POISON, 2, 3, 4]]),
                   batcher.submit([[5, 6, 7, 8], [9, 10, 11, 12]])]
        model.release()
        await blocker
        for job in victims:
            with pytest.raises(ModelFailure, match="poisoned row"):
                await job.result()
        assert batcher.totals.failed_batches == 1
        after = batcher.submit([[1, 2, 3, 4]])
        assert_encodes(await after.result(), [[1, 2, 3, 4]])
        await batcher.stop()

    run(main())


def test_the_event_loop_keeps_running_while_the_model_computes() -> None:
    model = FakeModel(seconds_per_batch=0.3)

    async def main() -> int:
        batcher = await started(model)
        job = asyncio.ensure_future(batcher.submit([[1, 2]]).result())
        ticks = 0
        while not job.done():
            await asyncio.sleep(0.005)
            ticks += 1
        await batcher.stop()
        return ticks

    assert run(main()) >= 10  # a blocked loop would tick once


def test_an_idle_worker_does_not_wait_but_a_busy_one_gathers_rows() -> None:
    model = FakeModel()

    async def main() -> float:
        batcher = await started(model, BatchPolicy(wait_s=1.0))
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
    assert len(model.batches) == 2


def test_a_full_queue_answers_overloaded_with_a_retry_hint() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher = await started(model, BatchPolicy(max_queue_tokens=10, wait_s=0))
        blocker = await occupy(batcher, model)
        queued = batcher.submit([[1] * 8])
        with pytest.raises(Overloaded) as caught:
            batcher.submit([[2] * 5])
        assert caught.value.retry_after_s > 0
        model.release()
        await asyncio.gather(blocker, queued.result())
        await batcher.stop()

    run(main())


def test_stop_finishes_admitted_work_then_refuses_more() -> None:
    model = FakeModel(seconds_per_batch=0.01)
    rng = random.Random(6)
    requests = [rows_of(rng, 3) for _ in range(10)]

    async def main() -> None:
        batcher = await started(model, BatchPolicy(max_batch_rows=4, wait_s=0))
        jobs = [batcher.submit(rows) for rows in requests]
        await batcher.stop(drain_timeout_s=10)
        for rows, job in zip(requests, jobs, strict=True):
            assert job.done
            assert_encodes(await job.result(), rows)
        with pytest.raises(Unavailable):
            batcher.submit([[1]])

    run(main())


def test_stop_after_its_timeout_fails_what_is_left() -> None:
    model = FakeModel()

    async def main() -> None:
        batcher = await started(model)
        blocker = await occupy(batcher, model)
        queued = batcher.submit([[1, 2, 3]])
        await batcher.stop(drain_timeout_s=0.05)
        for job in (queued,):
            with pytest.raises(Unavailable, match="before this request was computed"):
                await job.result()
        with pytest.raises(Unavailable, match="while computing"):
            await blocker
        model.release()

    run(main())


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


def test_a_deadline_shorter_than_the_estimated_wait_is_refused_at_once() -> None:
    model = FakeModel(seconds_per_batch=0.05)

    async def main() -> None:
        batcher = await started(model)
        await batcher.submit([[7] * 50]).result()  # teaches the batcher its speed: ~1,000 tokens/s
        blocker = await occupy(batcher, model)
        batcher.submit([[8] * 400])  # ~0.4 s of work waits behind the held batch
        with pytest.raises(DeadlineExceeded, match="exceeds its deadline"):
            batcher.submit([[9] * 10], deadline=time.monotonic() + 0.05)
        patient = batcher.submit([[9] * 10], deadline=time.monotonic() + 30)
        model.release()
        await blocker
        assert (await patient.result()).shape == (1, 2)
        await batcher.stop()

    run(main())


class MemoryBoundModel(FakeModel):
    """Runs out of memory above `capacity` padded tokens, as a device does."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.refused: list[int] = []  # padded tokens of each batch that did not fit

    def __call__(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        padded = len(rows) * max(len(r) for r in rows)
        if padded > self.capacity:
            self.refused.append(padded)
            raise OutOfMemory(f"{padded} padded tokens")
        return super().__call__(rows)


def test_out_of_memory_splits_the_batch_and_fails_only_rows_that_never_fit() -> None:
    rng = random.Random(11)
    fitting = [rows_of(rng, 3, (10, 20)) for _ in range(6)]
    too_long = [[5] * 80]
    model = MemoryBoundModel(capacity=40)

    async def main() -> None:
        batcher = await started(model, BatchPolicy(max_batch_tokens=10_000, wait_s=0))
        blocker = await occupy(batcher, model)
        jobs = [batcher.submit(rows) for rows in fitting]
        mixed = batcher.submit([fitting[0][0], too_long[0]])
        doomed = batcher.submit(too_long)
        model.release()
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
    assert all(len(b) * max(map(len, b)) <= model.capacity for b in model.batches[1:])


def test_after_out_of_memory_batches_stay_within_the_lowered_budget() -> None:
    rng = random.Random(12)
    model = MemoryBoundModel(capacity=200)

    async def main() -> None:
        batcher = await started(model, BatchPolicy(max_batch_tokens=2_000, max_padding_fraction=1.0, wait_s=0))
        events = []
        batcher.on_out_of_memory = events.append
        for _ in range(3):  # each round queues more rows than fit in one batch
            blocker = await occupy(batcher, model)
            jobs = [batcher.submit(rows_of(rng, 4, (20, 20))) for _ in range(5)]
            model.release()
            await blocker
            await asyncio.gather(*(j.result() for j in jobs))
        await batcher.stop()
        assert batcher.totals.oom_splits == len(events) >= 1
        assert events[0].padded_tokens > 200 >= events[-1].budget_tokens

    run(main())
    assert len(model.refused) <= 2  # once lowered, the budget keeps later batches from failing again


NAN_TOKEN = 777  # a token id the fake model gives a NaN vector for


class NanModel(FakeModel):
    """NaN or infinity for rows with NAN_TOKEN, or for every row of batches that start once `broken`."""

    broken = False

    def __call__(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        broken = self.broken  # before a held batch waits
        vectors = super().__call__(rows)
        for i, row in enumerate(rows):
            if broken or NAN_TOKEN in row:
                vectors[i, 1] = np.nan if i % 2 else np.inf
        return vectors


WARM_UP = [[101, 7, 8, 102], [101, 7, 102]]


@pytest.mark.parametrize("broken", [False, True])
def test_a_non_finite_vector_fails_its_request_and_the_probe_tells_a_broken_model(broken: bool) -> None:
    model = NanModel()

    async def main() -> None:
        batcher = Batcher(model, BatchPolicy(wait_s=0))
        batcher.run_now(WARM_UP)  # becomes the probe
        events = []
        batcher.on_non_finite = events.append
        batcher.start()
        blocker = await occupy(batcher, model)
        model.broken = broken
        poisoned = batcher.submit([[1, 2, 3], [4, NAN_TOKEN, 5], [6, 7, 8]])
        clean = batcher.submit([[9, 10, 11]])
        model.release()
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
    assert model.batches[-1] == WARM_UP  # the probe ran after the batch


def test_without_warm_up_rows_non_finite_vectors_fail_requests_but_judge_no_model() -> None:
    model = NanModel()
    model.broken = True

    async def main() -> None:
        batcher = await started(model)
        events = []
        batcher.on_non_finite = events.append
        with pytest.raises(NonFiniteVector):
            await batcher.submit([[1, 2, 3]]).result()
        await batcher.stop()
        assert [e.model_broken for e in events] == [False]

    run(main())
    assert model.batches == [[[1, 2, 3]]]  # no probe to run
