"""Independent plain-torch reference of the original NomicBERT embedding recipe.

Written from the original nomic-ai remote-code architecture (post-norm blocks, fused Wqkv, SwiGLU via
fc11/fc12, non-interleaved rotary with dynamic NTK scaling) and the model card's pooling. It shares no code
with transformers' NomicBert classes or with the server, which is what makes it useful as an oracle.
Everything runs in float64 on one unpadded text at a time, so there is no masking to get wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer

FloatArray = npt.NDArray[np.float64]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    # GPT-NeoX style (rotary_emb_interleaved=false): halves, not even/odd pairs.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class ReferenceNomic:
    """Reads config.json (original keys only), model.safetensors (original names) and tokenizer.json."""

    def __init__(self, path: Path, rotary_scaling_factor: float | None = 2.0) -> None:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
        self.hidden: int = int(cfg["n_embd"])
        self.layers: int = int(cfg["n_layer"])
        self.heads: int = int(cfg["n_head"])
        self.inner: int = int(cfg["n_inner"])
        self.head_dim: int = self.hidden // self.heads
        self.rotary_emb_base: float = float(cfg["rotary_emb_base"])
        self.max_trained_positions: int = int(cfg["max_trained_positions"])
        self.eps: float = float(cfg["layer_norm_epsilon"])
        # The caller's factor wins over the config's: the real config ships null and users pass 2 at load.
        self.rotary_scaling_factor = rotary_scaling_factor
        self._w = {k: v.to(torch.float64) for k, v in load_file(str(path / "model.safetensors")).items()}
        self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self._tok.no_truncation()
        self._tok.no_padding()

    def token_ids(self, text: str) -> list[int]:
        """[CLS] ... [SEP] ids of the full text (prefix included), never truncated."""
        return list(self._tok.encode(text).ids)

    def _rotary_base(self, seqlen: int) -> float:
        # Dynamic NTK as in the original NomicBertDynamicNTKRotaryEmbedding, evaluated afresh for this
        # text's length (the original caches it statefully across calls; a fresh model behaves like this).
        factor = self.rotary_scaling_factor
        if factor and seqlen > self.max_trained_positions:
            d = self.head_dim
            scale = (factor * seqlen / self.max_trained_positions) - (factor - 1)
            return self.rotary_emb_base * scale ** (d / (d - 2))
        return self.rotary_emb_base

    def _cos_sin(self, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.head_dim
        inv_freq = 1.0 / self._rotary_base(seqlen) ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        freqs = torch.outer(torch.arange(seqlen, dtype=torch.float64), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # (seqlen, head_dim): each frequency serves both halves
        return emb.cos(), emb.sin()

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden,), self._w[name + ".weight"], self._w[name + ".bias"], self.eps)

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ self._w[name + ".weight"].T  # no biases anywhere in this model

    def last_hidden_state(self, text: str, *, prefix: str | None) -> FloatArray:
        """Encoder output, shape (tokens, hidden), before any pooling."""
        return self._encode(self._full_text(text, prefix)).numpy()

    def embed(self, text: str, *, prefix: str | None, dimensions: int | None = None) -> FloatArray:
        """Unit-norm float64 embedding: mean pool, plain layer_norm, Matryoshka truncation, L2 normalize."""
        if dimensions is not None and not 1 <= dimensions <= self.hidden:
            raise ValueError(f"dimensions must be in [1, {self.hidden}], got {dimensions}")
        pooled = self._encode(self._full_text(text, prefix)).mean(dim=0)
        return self.finish(pooled.numpy(), dimensions)

    def pooled_ids(self, ids: list[int]) -> FloatArray:
        """Mean-pooled encoder output of explicit token ids (special tokens included)."""
        return self._encode_ids(torch.tensor(ids, dtype=torch.long)).mean(dim=0).numpy()

    def finish(self, pooled: FloatArray, dimensions: int | None = None) -> FloatArray:
        """Plain layer_norm over the full width, Matryoshka truncation, L2 normalization."""
        v = F.layer_norm(torch.from_numpy(pooled), (self.hidden,), eps=1e-5)  # before truncation
        if dimensions is not None:
            v = v[:dimensions]
        return F.normalize(v, p=2.0, dim=-1).numpy()

    @staticmethod
    def _full_text(text: str, prefix: str | None) -> str:
        return f"{prefix}: {text}" if prefix is not None else text

    def _encode(self, text: str) -> torch.Tensor:
        return self._encode_ids(torch.tensor(self.token_ids(text), dtype=torch.long))

    @torch.no_grad()
    def _encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        n, nh, d = ids.numel(), self.heads, self.head_dim
        w = self._w
        h = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.token_type_embeddings.weight"][0]
        h = self._ln(h, "emb_ln")
        cos, sin = self._cos_sin(n)
        for i in range(self.layers):
            p = f"encoder.layers.{i}."
            q, k, v = self._lin(h, p + "attn.Wqkv").split(self.hidden, dim=-1)
            q, k, v = (x.view(n, nh, d).transpose(0, 1) for x in (q, k, v))  # (heads, seq, head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
            attn = (probs @ v).transpose(0, 1).reshape(n, self.hidden)
            # Post-norm blocks (prenorm=false): residual add, then LayerNorm.
            h = self._ln(h + self._lin(attn, p + "attn.out_proj"), p + "norm1")
            gated = self._lin(h, p + "mlp.fc11") * F.silu(self._lin(h, p + "mlp.fc12"))
            h = self._ln(h + self._lin(gated, p + "mlp.fc2"), p + "norm2")
        return h


__all__ = ["ReferenceNomic"]
