"""The steps after pooling: layer_norm over the full width, truncation, L2 normalization."""

from __future__ import annotations

import numpy as np

LAYER_NORM_EPS = 1e-5


def finish(pooled: np.ndarray, dimensions: int, *, layer_norm: bool) -> np.ndarray:
    """pooled: one vector (float). Returns float32 of `dimensions`, unit L2 norm."""
    v = pooled.astype(np.float64)
    if layer_norm:  # F.layer_norm without affine, over the full width, as the model card does
        v = (v - v.mean()) / np.sqrt(v.var() + LAYER_NORM_EPS)
    v = v[:dimensions]
    norm = np.linalg.norm(v)
    return (v / max(norm, 1e-12)).astype(np.float32)


def weighted_mean(vectors: np.ndarray, weights: list[int]) -> np.ndarray:
    """Average pooled window vectors, each weighted by its token count."""
    w = np.asarray(weights, dtype=np.float64)
    return (vectors.astype(np.float64) * w[:, None]).sum(axis=0) / w.sum()
