"""Admission: a bounded queue refuses with a retry hint, and work that cannot meet its deadline is refused."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.engine.admission import Admission, Throughput
from server.engine.batcher import BatchPolicy
from server.errors import DeadlineExceeded, Overloaded
from tests.helpers.fake_backend import FakeBackend, occupy, run, started


def test_a_full_queue_answers_overloaded_with_a_retry_hint() -> None:
    backend = FakeBackend()

    async def main() -> None:
        batcher = await started(backend, BatchPolicy(max_queue_tokens=10, wait_s=0))
        blocker = await occupy(batcher, backend)
        queued = batcher.submit([[1] * 8])
        with pytest.raises(Overloaded) as caught:
            batcher.submit([[2] * 5])
        assert caught.value.retry_after_s > 0
        backend.release()
        await asyncio.gather(blocker, queued.result())
        await batcher.stop()

    run(main())


def test_a_deadline_shorter_than_the_estimated_wait_is_refused_at_once() -> None:
    backend = FakeBackend(seconds_per_batch=0.05)

    async def main() -> None:
        batcher = await started(backend)
        await batcher.submit([[7] * 50]).result()  # teaches the batcher its speed: ~1,000 tokens/s
        blocker = await occupy(batcher, backend)
        batcher.submit([[8] * 400])  # ~0.4 s of work waits behind the held batch
        with pytest.raises(DeadlineExceeded, match="exceeds its deadline"):
            batcher.submit([[9] * 10], deadline=time.monotonic() + 0.05)
        patient = batcher.submit([[9] * 10], deadline=time.monotonic() + 30)
        backend.release()
        await blocker
        assert (await patient.result()).shape == (1, 2)
        await batcher.stop()

    run(main())

def test_the_first_batch_sets_the_speed_and_later_ones_move_it_by_their_share_of_the_time() -> None:
    speed = Throughput()
    speed.observe(1000, 1.0)
    assert speed.tokens_per_s == 1000
    speed.observe(2000, 1.0)
    assert speed.tokens_per_s == pytest.approx(2800 / 1.8)
    for _ in range(20):  # small batches in between, 5x slower per token, take little of the model's time
        speed.observe(1000, 1.0)
        speed.observe(10, 0.05)
    assert 950 < speed.tokens_per_s < 1000  # averaged per batch: ~600


def test_an_empty_queue_admits_anything_and_estimates_stay_bounded() -> None:
    speed = Throughput()
    admission = Admission(max_queue_tokens=10, throughput=speed)
    admission.check(queued=0, tokens=50, deadline=time.monotonic())  # nothing waits: it runs
    assert admission.drain_estimate_s(100) == 1.0  # no speed known yet
    speed.observe(100, 1.0)
    assert admission.drain_estimate_s(1) == 0.05 and admission.drain_estimate_s(10**6) == 30.0
    with pytest.raises(Overloaded):
        admission.check(queued=5, tokens=6, deadline=None)


def _at_1000_tokens_per_s(**policy: int) -> Admission:
    """Admission with an unbounded queue, a model of 1,000 tokens/s and this batch policy."""
    speed = Throughput()
    speed.observe(1000, 1.0)
    return Admission(max_queue_tokens=10**6, throughput=speed, policy=BatchPolicy(**policy))


def test_a_caller_who_filled_the_queue_is_refused_and_another_still_gets_in() -> None:
    admission = Admission(max_queue_tokens=100, throughput=Throughput())
    with pytest.raises(Overloaded, match=r"limit 100$"):
        admission.check(queued=95, tokens=10, deadline=None, own=(95, 9), others=[])
    admission.check(queued=95, tokens=10, deadline=None, own=(0, 0), others=[95])  # a newcomer: up to twice
    with pytest.raises(Overloaded, match=r"limit 100 \(twice that for a connection with nothing queued\)"):
        admission.check(queued=195, tokens=10, deadline=None, own=(0, 0), others=[95, 100])


def test_a_deadline_counts_at_most_one_batch_of_each_other_caller_per_turn() -> None:
    admission = _at_1000_tokens_per_s(max_batch_tokens=100, max_batch_rows=10)
    soon = time.monotonic() + 0.5
    # Behind a caller with 100,000 tokens queued (100 s), a newcomer waits for one of its batches.
    admission.check(queued=100_000, tokens=50, deadline=soon, own=(0, 0), others=[(100_000, 1000)])
    # Its own backlog counts in full, and each other caller's batches once per turn it needs (4 turns here):
    # 250 + 400 + 50 tokens ahead.
    with pytest.raises(DeadlineExceeded, match=r"behind 700 queued tokens \(0.80s\)"):
        admission.check(queued=100_250, tokens=100, deadline=soon, own=(250, 3), others=[(100_000, 1000), (50, 1)])


def test_turns_count_by_rows_when_short_rows_fill_batches_first() -> None:
    admission = _at_1000_tokens_per_s(max_batch_tokens=1000, max_batch_rows=10)
    soon = time.monotonic() + 2
    # 100 rows of 5 tokens fit one batch by tokens but need 10 by rows: 10 of the other caller's batches first.
    with pytest.raises(DeadlineExceeded, match=r"behind 10000 queued tokens"):
        admission.check(queued=15_000, tokens=500, deadline=soon, rows=100, own=(0, 0), others=[(15_000, 150)])
    # A batch budget lowered after an out-of-memory holds less of the other caller's backlog per turn.
    admission.check(queued=15_000, tokens=500, deadline=soon, rows=100, own=(0, 0), others=[(15_000, 150)],
                    policy=BatchPolicy(max_batch_tokens=100, max_batch_rows=10))


def test_a_request_whose_lengths_make_several_batches_counts_as_many_turns() -> None:
    admission = _at_1000_tokens_per_s(max_batch_tokens=1000, max_batch_rows=128)
    soon = time.monotonic() + 1.5
    admission.check(queued=15_000, tokens=100, deadline=soon, rows=5, own=(0, 0), others=[(15_000, 150)])
    # The same five rows, of lengths too far apart to share a batch: five turns of the other caller first.
    with pytest.raises(DeadlineExceeded, match="behind 5000 queued tokens"):
        admission.check(queued=15_000, tokens=100, deadline=soon, rows=5, own=(0, 0), others=[(15_000, 150)],
                        turns=lambda: 5)


def test_another_callers_short_rows_count_a_batch_as_the_rows_it_holds() -> None:
    admission = _at_1000_tokens_per_s(max_batch_tokens=16384, max_batch_rows=128)
    # 1,500 rows of 10 tokens: one turn of that caller is a batch of 128 rows, 1,280 tokens, not 16,384.
    admission.check(queued=15_000, tokens=10, deadline=time.monotonic() + 2, own=(0, 0), others=[(15_000, 1500)])
    with pytest.raises(DeadlineExceeded, match="behind 1280 queued tokens"):
        admission.check(queued=15_000, tokens=10, deadline=time.monotonic() + 1, own=(0, 0),
                        others=[(15_000, 1500)])


def test_the_rest_of_the_batch_on_the_model_counts() -> None:
    speed = Throughput()
    speed.observe(1000, 1.0)
    admission = Admission(max_queue_tokens=10**6, throughput=speed)
    started = time.monotonic() - 0.25  # 1,000 tokens on the model for 0.25 s: ~0.75 s to go
    with pytest.raises(DeadlineExceeded, match=r"\(0.7\ds\)"):
        admission.check(queued=0, tokens=10, deadline=time.monotonic() + 0.5, running=(1000, started))
    admission.check(queued=0, tokens=10, deadline=time.monotonic() + 1.5, running=(1000, started))
    admission.check(queued=0, tokens=10, deadline=time.monotonic() + 0.5, running=(1000, started - 1))  # overdue


def test_one_stalled_batch_moves_the_speed_without_holding_it_down() -> None:
    speed = Throughput()
    for _ in range(30):
        speed.observe(1000, 0.01)  # 100,000 tokens/s
    speed.observe(1000, 1.0)  # a one-second pause in one batch
    assert speed.tokens_per_s > 80_000
    for _ in range(5):
        speed.observe(1000, 0.01)
    assert speed.tokens_per_s > 90_000
    for _ in range(30):  # a host that really became ten times slower is followed within tens of batches
        speed.observe(1000, 0.1)
    assert speed.tokens_per_s < 15_000
