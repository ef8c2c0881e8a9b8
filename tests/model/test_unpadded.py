"""The unpadded NomicBERT forward gives what transformers' padded forward gives, row for row."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel

from server.model.rotary import PerRowNTKRotary
from server.model.runner import Runner, install_per_row_rotary
from server.model.spec import read_model_spec
from server.model.unpadded import Packing, pool
from tests.conftest import TINY


def runners(path: Path, pooling: str) -> tuple[Runner, Runner]:
    spec = read_model_spec(path, rotary_scaling_factor=2.0)
    model = AutoModel.from_pretrained(path, config=spec.config, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    install_per_row_rotary(model, PerRowNTKRotary(spec.rotary))
    make = dict(pooling=pooling, pad_id=0, device="cpu", per_row_rotary=True)
    return Runner(model, unpadded=True, **make), Runner(model, unpadded=False, **make)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_unpadded_matches_padded(tiny_original: Path, pooling: str) -> None:
    unpadded, padded = runners(tiny_original, pooling)
    assert unpadded.unpadded and not padded.unpadded
    rng = random.Random(0)
    # Lengths from 1 token to far beyond the 16 trained positions, so rows get different rotary bases.
    lengths = [1, 2, 5, 16, 17, 40, 3, 90]
    rows = [[rng.randrange(1000, 30000) for _ in range(n)] for n in lengths]
    got, want = unpadded.run(rows), padded.run(rows)
    assert got.shape == (len(rows), TINY["hidden"]) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-5
    # Batch-mates do not change a row.
    alone = np.stack([unpadded.run([r])[0] for r in rows])
    assert np.abs(got - alone).max() <= 1e-5


def test_packing_places_every_token() -> None:
    packing = Packing.of([[5, 6], [7], [8, 9, 10]], torch.device("cpu"))
    assert packing.ids.tolist() == [5, 6, 7, 8, 9, 10] and packing.lengths.tolist() == [2, 1, 3]
    assert packing.mask.dtype == torch.bool
    assert packing.mask.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert packing.slots.tolist() == [0, 1, 3, 6, 7, 8] and packing.row_of_token.tolist() == [0, 0, 1, 2, 2, 2]
    padded = packing.pad(packing.ids[:, None].float())
    assert padded[..., 0].tolist() == [[5, 6, 0], [7, 0, 0], [8, 9, 10]]
    assert packing.unpad(padded).squeeze(1).tolist() == [5, 6, 7, 8, 9, 10]


def test_mean_pooling_of_a_long_row_keeps_float32_precision() -> None:
    # A row of 8,192 tokens and a short one; summed token after token in float32 the long row's mean was ~1e-5
    # off per component (the error grows with the length), against ~1e-7 for float32 rounding of the mean.
    rows = [[7] * 8192, [7] * 3]
    packing = Packing.of(rows, torch.device("cpu"))
    hidden = (1.0 + 0.1 * torch.randn(packing.ids.shape[0], 64, generator=torch.Generator().manual_seed(0))).float()
    got = pool(hidden, packing, "mean")
    want = torch.stack([hidden[:8192].double().mean(0), hidden[8192:].double().mean(0)])
    assert got.dtype == torch.float32 and got.shape == (2, 64)
    assert (got.double() - want).abs().max() <= 1e-6
    assert torch.equal(pool(hidden, packing, "cls"), hidden[[0, 8192]])
