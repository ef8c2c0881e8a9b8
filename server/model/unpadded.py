"""NomicBERT's forward pass over packed rows: the token-wise layers never see padding.

transformers pads every row to the longest one. On a CPU the linear layers are nearly all of the
compute, so each padded token costs as much as a real one. Here the rows of a batch are concatenated;
embeddings, projections, MLPs and layer norms run on the real tokens only, and only attention pads
(each row to the batch's longest, with padded keys masked). Same modules, same weights, so any
variant that swaps a layer's Linear modules (quantized or not) runs here unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.models.nomic_bert.modeling_nomic_bert import NomicBertModel, apply_rotary_pos_emb

from server.model.rotary import row_position_ids


def supports_unpadded(model: PreTrainedModel) -> bool:
    """True for a NomicBERT whose layers have the structure this module drives."""
    if not isinstance(model, NomicBertModel):
        return False
    needed = ("self_attn", "mlp", "post_attention_layernorm", "post_mlp_layernorm")
    attn = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")
    return all(hasattr(layer, n) for layer in model.layers for n in needed) and all(
        hasattr(layer.self_attn, n) for layer in model.layers for n in attn
    )


@dataclass(frozen=True)
class Packing:
    """Where each real token of a batch sits, packed ([tokens]) and padded ([rows, longest])."""

    ids: torch.Tensor  # [T] token ids, rows concatenated
    lengths: torch.Tensor  # [B]
    mask: torch.Tensor  # [B, L] bool, True on real tokens
    slots: torch.Tensor  # [T] index of each real token in the flattened [B * L]
    row_of_token: torch.Tensor  # [T]

    @classmethod
    def of(cls, rows: Sequence[Sequence[int]], device: torch.device) -> Packing:
        """Worked out on the host and sent to the device in one copy (one wait for the device, not five)."""
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        tokens, batch, width = int(lengths.sum()), len(rows), int(lengths.max())
        mask = np.arange(width)[None, :] < lengths[:, None]
        host = np.concatenate([
            np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=tokens),  # ids
            lengths,
            np.flatnonzero(mask),  # slots
            np.repeat(np.arange(batch, dtype=np.int64), lengths),  # row_of_token
            mask.reshape(-1),
        ])
        ids, lengths_t, slots, row_of_token, mask_t = torch.from_numpy(host).to(device).split(
            [tokens, batch, tokens, tokens, batch * width])
        return cls(ids=ids, lengths=lengths_t, mask=mask_t.view(batch, width).bool(), slots=slots,
                   row_of_token=row_of_token)

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    @property
    def width(self) -> int:
        return int(self.mask.shape[1])

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """[T, ...] -> [B, L, ...] with zeros on padding."""
        out = packed.new_zeros((self.rows * self.width, *packed.shape[1:]))
        out[self.slots] = packed
        return out.view(self.rows, self.width, *packed.shape[1:])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [T, ...]."""
        return padded.reshape(self.rows * self.width, *padded.shape[2:])[self.slots]


class Layout(Protocol):
    """How a batch's tokens, kept as one [N] sequence, map to the [rows, longest] grid attention needs."""

    mask: torch.Tensor  # [B, L] bool, True on the tokens a row attends to and pools

    def pad(self, packed: torch.Tensor) -> torch.Tensor: ...

    def unpad(self, padded: torch.Tensor) -> torch.Tensor: ...


def encode_unpadded(model: NomicBertModel, packing: Packing) -> torch.Tensor:
    """Last hidden states of the real tokens, [T, hidden], rows in order."""
    return encode(model, packing.ids, packing)


def encode(model: NomicBertModel, ids: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Last hidden states of `ids` ([N] tokens laid out by `layout`), [N, hidden].

    Nothing here reads a value back to the host, so a forward at fixed shapes can be captured as a CUDA graph.
    """
    ids = ids[None]
    hidden = model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))[0]
    # Rotary angles from per-row positions (row_position_ids), exactly as the padded forward gets them.
    cos, sin = model.rotary_emb(hidden[None], row_position_ids(layout.mask.long()))
    cos, sin = layout.unpad(cos), layout.unpad(sin)  # [N, head_dim]
    key_mask = layout.mask[:, None, None, :]
    for layer in model.layers:
        attn = layer.self_attn
        q, k, v = (proj(hidden).view(hidden.shape[0], -1, attn.head_dim)
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        q, k, v = (layout.pad(t).transpose(1, 2) for t in (q, k, v))  # [B, heads, L, head_dim]
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=attn.scaling)
        context = layout.unpad(context.transpose(1, 2)).flatten(1)
        hidden = layer.post_attention_layernorm(hidden + attn.o_proj(context))
        hidden = layer.post_mlp_layernorm(hidden + layer.mlp(hidden))
    return hidden


# Tokens per float64 copy while pooling: ~25 MiB at 768 wide, whatever the batch.
_POOL_CHUNK_TOKENS = 4096


def pool(hidden: torch.Tensor, packing: Packing, mode: str) -> torch.Tensor:
    """Per-row mean (or first token) of packed hidden states, in float32.

    The sums add token after token (index_add_), so they accumulate in float64: in float32 an 8,192-token row
    came out ~1e-5 off per component, about 100x float32's rounding and growing with the length."""
    if mode == "cls":
        starts = torch.cumsum(packing.lengths, 0) - packing.lengths
        return hidden[starts].float()
    sums = torch.zeros((packing.rows, hidden.shape[1]), dtype=torch.float64, device=hidden.device)
    for start in range(0, hidden.shape[0], _POOL_CHUNK_TOKENS):
        end = start + _POOL_CHUNK_TOKENS
        sums.index_add_(0, packing.row_of_token[start:end], hidden[start:end].double())
    return (sums / packing.lengths[:, None]).float()
