"""The steps after pooling: layer_norm over the full width, truncation, L2 normalization.

They run per batch on the model thread (finish_batch), so the event loop does nothing per vector; texts
embedded in several windows are averaged first and finished on the loop (finish_rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class Finish:
    """How a request's rows are finished: its Matryoshka dimensions, and whether the model normalizes first."""

    dimensions: int
    layer_norm: bool


def finish_rows(pooled: np.ndarray, dimensions: int, *, layer_norm: bool) -> np.ndarray:
    """pooled: (rows, width) floats. Returns float32 (rows, dimensions), each row of unit L2 norm."""
    v = pooled.astype(np.float64)
    if layer_norm:  # F.layer_norm without affine, over the full width, as the model card does
        v = (v - v.mean(axis=1, keepdims=True)) / np.sqrt(v.var(axis=1, keepdims=True) + LAYER_NORM_EPS)
    v = v[:, :dimensions]
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    return (v / np.maximum(norm, 1e-12)).astype(np.float32)


def finish(pooled: np.ndarray, dimensions: int, *, layer_norm: bool) -> np.ndarray:
    """pooled: one vector (float). Returns float32 of `dimensions`, unit L2 norm."""
    return finish_rows(pooled[np.newaxis], dimensions, layer_norm=layer_norm)[0]


def finish_batch(pooled: np.ndarray, finishes: Sequence[Finish | None]) -> Sequence[np.ndarray]:
    """Each row of a batch finished as its request asks; a row whose Finish is None stays as pooled (float32).

    The batch's vectors are checked finite before; rows that are not are never delivered, so what numpy
    says about them is silenced.
    """
    first = finishes[0]
    with np.errstate(all="ignore"):
        if first is not None and all(f == first for f in finishes):  # one request, or alike ones: one pass
            return finish_rows(pooled, first.dimensions, layer_norm=first.layer_norm)
        out: list[np.ndarray] = list(pooled.astype(np.float32, copy=False))
        for spec in {f for f in finishes if f is not None}:
            rows = [i for i, f in enumerate(finishes) if f == spec]
            for i, vector in zip(rows, finish_rows(pooled[rows], spec.dimensions, layer_norm=spec.layer_norm),
                                 strict=True):
                out[i] = vector
        return out


def weighted_mean(vectors: np.ndarray, weights: list[int]) -> np.ndarray:
    """Average pooled window vectors, each weighted by its token count."""
    w = np.asarray(weights, dtype=np.float64)
    return (vectors.astype(np.float64) * w[:, None]).sum(axis=0) / w.sum()
