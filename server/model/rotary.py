"""Rotary embedding for nomic models with dynamic NTK scaling computed per row.

The original code derives the scaled base from the padded batch length and caches it across calls,
so a text's embedding depends on its batch-mates and on earlier inputs. Here each row's base comes
from that row's own length: at batch size 1 this equals the original, and it never depends on others.
"""

from __future__ import annotations

import torch
from torch import nn

from server.model.spec import RotarySpec


def row_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0..len-1 per row and 0 on padding, so a row's length is its max position + 1."""
    positions = torch.cumsum(attention_mask, dim=1) - 1
    return (positions * attention_mask).clamp_(min=0)


class PerRowNTKRotary(nn.Module):
    """Drop-in for transformers' NomicBertRotaryEmbedding: forward(x, position_ids) -> (cos, sin).

    `position_ids` must come from `row_position_ids`; padding positions get some rotation, which is
    harmless because padded keys are masked and padded outputs are not pooled.
    """

    def __init__(self, spec: RotarySpec) -> None:
        super().__init__()
        self.spec = spec
        exponents = torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim
        self.register_buffer("exponents", exponents, persistent=False)

    def bases(self, lengths: torch.Tensor) -> torch.Tensor:
        """The rotary base for rows of these lengths (float64)."""
        s = self.spec
        lengths = lengths.to(torch.float64)
        base = torch.full_like(lengths, s.base)
        if s.scaling_factor:
            f, trained, d = s.scaling_factor, s.max_trained_positions, s.head_dim
            scaled = s.base * ((f * lengths / trained) - (f - 1)) ** (d / (d - 2))
            base = torch.where(lengths > trained, scaled, base)
        return base

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        position_ids = position_ids.to(x.device)
        if position_ids.shape[0] == 1 and x.shape[0] > 1:
            position_ids = position_ids.expand(x.shape[0], -1)
        lengths = position_ids.max(dim=1).values + 1
        # float32 like the original: base rounded to float32, then base ** exponents.
        bases = self.bases(lengths).to(device=x.device, dtype=torch.float32)
        inv_freq = 1.0 / bases[:, None] ** self.exponents.to(x.device)[None, :]
        freqs = position_ids[..., None].to(torch.float32) * inv_freq[:, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
