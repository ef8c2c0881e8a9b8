"""Padding a batch to a bucket (the CUDA graphs' fixed shapes) changes no vector."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from quant.memory import GRAPH_MAX_WIDTH, MIN_GRAPH_TOKENS
from server.model.buckets import ROWS, WIDTHS, Bucket, Buckets, fill
from server.model.rotary import PerRowNTKRotary
from server.model.runner import Runner, install_per_row_rotary
from server.model.spec import read_model_spec


def runner(path: Path, pooling: str, buckets: Buckets | None) -> Runner:
    spec = read_model_spec(path, rotary_scaling_factor=2.0)
    model = AutoModel.from_pretrained(path, config=spec.config, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    install_per_row_rotary(model, PerRowNTKRotary(spec.rotary))
    return Runner(model, pooling=pooling, pad_id=0, device="cpu", per_row_rotary=True, buckets=buckets)


def normalized(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_bucketed_equals_unbucketed(tiny_original: Path, pooling: str) -> None:
    buckets = Buckets(max_tokens=4096, max_rows=64)
    plain, bucketed = runner(tiny_original, pooling, None), runner(tiny_original, pooling, buckets)
    rng = random.Random(0)
    # Row counts that need filler rows (3 -> 4, 17 -> 24) and none (8); widths that need padding (5 -> 16,
    # 90 -> 96) and none (16); rows past the 16 trained positions, whose rotary base is their own length's.
    for lengths in ([5], [1, 2, 3], [16] * 8, [1, 5, 16, 17, 40, 90, 3], [rng.randrange(1, 60) for _ in range(17)]):
        rows = [[rng.randrange(1000, 30000) for _ in range(n)] for n in lengths]
        assert buckets.for_batch(len(rows), max(lengths)) is not None
        got, want = bucketed.run(rows), plain.run(rows)
        assert got.shape == want.shape == (len(rows), want.shape[1])
        assert np.isfinite(got).all()
        assert np.abs(normalized(got) - normalized(want)).max() <= 1e-6, lengths


def test_batches_beyond_every_bucket_run_eagerly(tiny_original: Path) -> None:
    buckets = Buckets(max_tokens=64, max_rows=4)
    plain, bucketed = runner(tiny_original, "mean", None), runner(tiny_original, "mean", buckets)
    rows = [[1000 + i] * 70 for i in range(2)] + [[2000] * 3] * 5  # too wide, then too many rows
    assert buckets.for_batch(2, 70) is None and buckets.for_batch(5, 3) is None
    for batch in (rows[:2], rows[2:]):
        assert np.abs(normalized(bucketed.run(batch)) - normalized(plain.run(batch))).max() <= 1e-6


def test_smallest_bucket_that_holds_the_batch() -> None:
    buckets = Buckets(max_tokens=2048, max_rows=48)
    assert buckets.for_batch(1, 1) == Bucket(1, 16)
    assert buckets.for_batch(3, 17) == Bucket(4, 32)
    assert buckets.for_batch(48, 20) == Bucket(48, 32) and buckets.for_batch(49, 20) is None  # --max-batch-rows
    assert buckets.for_batch(3, 512) == Bucket(4, 512) and buckets.for_batch(5, 512) is None  # 2048 tokens
    assert buckets.for_batch(1, 513) is None
    every = buckets.all
    assert every[0].tokens == max(b.tokens for b in every) and all(b.tokens <= 2048 and b.rows <= 48 for b in every)
    assert len(set(every)) == len(every)


def test_fill_lays_out_rows_then_lengths() -> None:
    batch = fill([[5, 6], [7]], Bucket(3, 4), pad_id=0)
    ids, lengths = batch[:12].reshape(3, 4), batch[12:]
    assert ids.tolist() == [[5, 6, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0]]
    assert lengths.tolist() == [2, 1, 1]  # the filler row holds one padding token, so its attention has a key


def test_the_flag_floor_is_the_smallest_bucket() -> None:
    assert min(WIDTHS) * min(ROWS) == MIN_GRAPH_TOKENS and max(WIDTHS) == GRAPH_MAX_WIDTH  # the memory model's
    assert Buckets(max_tokens=MIN_GRAPH_TOKENS, max_rows=128).all == [Bucket(1, min(WIDTHS))]


def test_no_wider_than_the_input_limit_needs() -> None:
    assert Buckets(max_tokens=16384, max_rows=128, longest=64).widths == [16, 32, 48, 64]
    assert Buckets(max_tokens=16384, max_rows=128, longest=65).widths[-1] == 96
    assert Buckets(max_tokens=16384, max_rows=128, longest=8192).widths == list(WIDTHS)
