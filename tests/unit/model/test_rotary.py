from __future__ import annotations

import torch

from server.model.rotary import PerRowNTKRotary, row_position_ids
from server.model.spec import RotarySpec

SPEC = RotarySpec(base=1000.0, head_dim=64, max_trained_positions=2048, scaling_factor=2.0)


def test_bases_follow_the_original_formula() -> None:
    rotary = PerRowNTKRotary(SPEC)
    bases = rotary.bases(torch.tensor([10, 2048, 4096, 8192]))
    assert bases[:2].tolist() == [1000.0, 1000.0]
    for got, n in zip(bases[2:].tolist(), (4096, 8192), strict=True):
        assert abs(got - 1000.0 * ((2 * n / 2048) - 1) ** (64 / 62)) < 1e-6


def test_each_row_rotates_by_its_own_length() -> None:
    rotary = PerRowNTKRotary(SPEC)
    mask = torch.zeros(2, 3000, dtype=torch.long)
    mask[0, :100], mask[1, :] = 1, 1
    cos, _ = rotary(torch.zeros(2, 3000, 8), row_position_ids(mask))
    alone_cos, _ = rotary(torch.zeros(1, 100, 8), row_position_ids(torch.ones(1, 100, dtype=torch.long)))
    assert torch.equal(cos[0, :100], alone_cos[0])  # the short row is unaffected by its long batch-mate
    long_cos, _ = rotary(torch.zeros(1, 3000, 8), row_position_ids(torch.ones(1, 3000, dtype=torch.long)))
    assert torch.equal(cos[1], long_cos[0])
    assert not torch.allclose(cos[1, :100], cos[0, :100])  # the long row really is scaled
