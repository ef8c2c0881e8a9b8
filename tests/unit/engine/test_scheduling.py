"""Which rows form the next batch: the window around the oldest row, counted as the backend says."""

from __future__ import annotations

import pytest

from server.engine.policy import BatchPolicy
from server.engine.scheduling import batch_tokens, choose_window


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
