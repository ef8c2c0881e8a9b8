"""Fixed batch shapes: a batch padded to the smallest (rows, width) bucket that holds it.

A CUDA graph replays one forward at one shape, so batches are padded to a small set of shapes, one graph
each. Padding changes no vector: extra width is masked out of attention and pooling, and extra rows are
one padding token each (never an empty row, whose attention would be all masked and NaN), dropped after
pooling. A row's rotary angles come from its own length (server.model.rotary), so neither changes them.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Widths a bucket pads rows to: at most 1.5x the longest row above 32 tokens. Longer batches run eagerly:
# their forward keeps the GPU busy for longer than launching its kernels takes.
WIDTHS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)
ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


@dataclass(frozen=True, order=True)
class Bucket:
    rows: int
    width: int

    @property
    def tokens(self) -> int:
        return self.rows * self.width


class Buckets:
    """The buckets of at most `max_tokens` padded tokens and `max_rows` rows, no wider than needed for rows of
    `longest` tokens (the input limit)."""

    def __init__(self, max_tokens: int, max_rows: int, longest: int | None = None, widths: Sequence[int] = WIDTHS,
                 rows: Sequence[int] = ROWS) -> None:
        self.widths = sorted(widths)
        if longest is not None:
            self.widths = self.widths[: bisect.bisect_left(self.widths, longest) + 1]
        self._rows = {w: [r for r in sorted(rows) if r <= max_rows and r * w <= max_tokens] for w in self.widths}
        self.widths = [w for w in self.widths if self._rows[w]]

    @property
    def all(self) -> list[Bucket]:
        """Every bucket, largest first (the order to capture them in, so smaller ones reuse its memory)."""
        return sorted((Bucket(r, w) for w in self.widths for r in self._rows[w]), key=lambda b: -b.tokens)

    def for_batch(self, rows: int, longest: int) -> Bucket | None:
        """The smallest bucket holding `rows` rows of up to `longest` tokens; None when none does."""
        i = bisect.bisect_left(self.widths, longest)
        if i == len(self.widths):
            return None
        width = self.widths[i]
        heights = self._rows[width]
        j = bisect.bisect_left(heights, rows)
        return Bucket(heights[j], width) if j < len(heights) else None


def fill(rows: Sequence[Sequence[int]], bucket: Bucket, pad_id: int) -> np.ndarray:
    """The batch as one int64 array: [rows x width] token ids, then [rows] lengths (the device's input)."""
    n = len(rows)
    lengths = np.ones(bucket.rows, dtype=np.int64)  # filler rows: one padding token each
    lengths[:n] = np.fromiter(map(len, rows), dtype=np.int64, count=n)
    out = np.full(bucket.tokens + bucket.rows, pad_id, dtype=np.int64)
    mask = np.arange(bucket.width)[None, :] < lengths[:n, None]
    out[np.flatnonzero(mask)] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64,
                                            count=int(lengths[:n].sum()))
    out[bucket.tokens:] = lengths
    return out


@dataclass(frozen=True)
class Grid:
    """A bucket's batch on the device: every [rows, width] position is a token, padding included."""

    ids: torch.Tensor  # [rows * width]
    lengths: torch.Tensor  # [rows]
    mask: torch.Tensor  # [rows, width] bool

    @classmethod
    def of(cls, batch: torch.Tensor, bucket: Bucket) -> Grid:
        """From `fill`'s array on the device; device work only, so it can be captured."""
        ids, lengths = batch.split([bucket.tokens, bucket.rows])
        mask = torch.arange(bucket.width, device=batch.device)[None, :] < lengths[:, None]
        return cls(ids=ids, lengths=lengths, mask=mask)

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        return packed.view(*self.mask.shape, *packed.shape[1:])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        return padded.reshape(self.mask.numel(), *padded.shape[2:])

    def pool(self, hidden: torch.Tensor, mode: str) -> torch.Tensor:
        """Per-row mean over the real tokens (or the first token), float32, [rows, hidden]."""
        hidden = self.pad(hidden.float())
        if mode == "cls":
            return hidden[:, 0]
        return (hidden * self.mask[..., None]).sum(dim=1) / self.lengths[:, None].to(hidden.dtype)
