"""Tokenized rows -> pooled float32 vectors. Runs on the single model worker thread."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from transformers import PreTrainedModel

from server.rotary import PerRowNTKRotary, row_position_ids


class Runner:
    def __init__(self, model: PreTrainedModel, *, pooling: str, pad_id: int, device: str,
                 per_row_rotary: bool,
                 compute_context: Callable[[], AbstractContextManager[object]] = nullcontext) -> None:
        self.model = model
        self.compute_context = compute_context
        self.pooling = pooling
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.per_row_rotary = per_row_rotary

    def run(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled hidden states, one float32 row per input row (before any normalization)."""
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        kwargs = {"token_type_ids": torch.zeros_like(ids)}
        if self.per_row_rotary:
            kwargs["position_ids"] = row_position_ids(mask)
        with torch.inference_mode(), self.compute_context():
            hidden = self.model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state.float()
            if self.pooling == "cls":
                pooled = hidden[:, 0]
            else:
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(dim=1) / m.sum(dim=1)
        return pooled.cpu().numpy()


def install_per_row_rotary(model: PreTrainedModel, rotary: PerRowNTKRotary) -> None:
    """Replace transformers' rotary module (which caches a dynamic base across calls) with ours."""
    if not hasattr(model, "rotary_emb"):
        raise TypeError(f"{type(model).__name__} has no rotary_emb to replace")
    device = next(model.parameters()).device
    model.rotary_emb = rotary.to(device)
