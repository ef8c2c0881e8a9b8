"""In-process baselines on the same texts: sentence-transformers `encode`, the way most people embed."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer
from transformers import PreTrainedModel

BATCH_SIZE = 32


@dataclass(frozen=True)
class EncodeTiming:
    seconds: float
    vectors: np.ndarray  # pooled, not normalized


def sentence_transformer(path: Path, model: PreTrainedModel | None = None, device: str = "cpu"
                         ) -> SentenceTransformer:
    """sentence-transformers' pipeline for the checkpoint, on the server's device; with `model`, around
    that model instead.

    Passing the server's own model gives the baseline at the server's variant, however it was made.
    """
    st = SentenceTransformer(str(path), device=device)
    if model is not None:
        st[0].model = model
    return st


def time_encode(st: SentenceTransformer, texts: Sequence[str],
                context: Callable[[], AbstractContextManager[object]] = nullcontext) -> EncodeTiming:
    """One `encode` call over all texts (it sorts them by length and runs batches of 32), after a warm-up."""
    with context():
        st.encode(list(texts[:BATCH_SIZE // 4]), batch_size=BATCH_SIZE, show_progress_bar=False)
        started = time.perf_counter()
        vectors = st.encode(list(texts), batch_size=BATCH_SIZE, show_progress_bar=False, convert_to_numpy=True)
        return EncodeTiming(time.perf_counter() - started, np.asarray(vectors, dtype=np.float32))


def padded_fraction(texts: Sequence[str], tokens: Sequence[int]) -> float:
    """The padding `encode` computes: it sorts by characters, longest first, and pads each batch to its longest."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    padded = 0
    for start in range(0, len(order), BATCH_SIZE):
        batch = [tokens[i] for i in order[start : start + BATCH_SIZE]]
        padded += len(batch) * max(batch)
    return 1 - sum(tokens) / padded
