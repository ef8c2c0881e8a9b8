"""Tokenized rows -> pooled float32 vectors. Runs on the single model worker thread."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from transformers import PreTrainedModel

from server.rotary import PerRowNTKRotary, row_position_ids
from server.unpadded import Packing, encode_unpadded, pool, supports_unpadded


class Runner:
    """Runs a batch of token rows through the model and pools each row.

    NomicBERT runs unpadded (server.unpadded) unless `unpadded=False`; other models, and NomicBERT
    with `unpadded=False`, take transformers' padded forward.
    """

    def __init__(self, model: PreTrainedModel, *, pooling: str, pad_id: int, device: str,
                 per_row_rotary: bool,
                 compute_context: Callable[[], AbstractContextManager[object]] = nullcontext,
                 unpadded: bool = True) -> None:
        self.model = model
        self.compute_context = compute_context
        self.pooling = pooling
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.per_row_rotary = per_row_rotary
        self.unpadded = unpadded and supports_unpadded(model)

    def run(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled hidden states, one float32 row per input row (before any normalization)."""
        with torch.inference_mode(), self.compute_context():
            pooled = self._unpadded(rows) if self.unpadded else self._padded(rows)
        return pooled.cpu().numpy()

    def _unpadded(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        packing = Packing.of(rows, self.device)
        return pool(encode_unpadded(self.model, packing), packing, self.pooling)  # type: ignore[arg-type]

    def _padded(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        ids_np = np.full((len(rows), width), self.pad_id, dtype=np.int64)
        mask_np = np.zeros((len(rows), width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids_np[i, : len(row)] = row
            mask_np[i, : len(row)] = 1
        ids, mask = torch.from_numpy(ids_np).to(self.device), torch.from_numpy(mask_np).to(self.device)
        kwargs = {"token_type_ids": torch.zeros_like(ids)}
        if self.per_row_rotary:
            kwargs["position_ids"] = row_position_ids(mask)
        hidden = self.model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state.float()
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1)


def install_per_row_rotary(model: PreTrainedModel, rotary: PerRowNTKRotary) -> None:
    """Replace transformers' rotary module (which caches a dynamic base across calls) with ours."""
    if not hasattr(model, "rotary_emb"):
        raise TypeError(f"{type(model).__name__} has no rotary_emb to replace")
    device = next(model.parameters()).device
    model.rotary_emb = rotary.to(device)
