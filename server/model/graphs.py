"""CUDA graphs: each bucket's forward captured once at start-up and replayed per batch.

An eager NomicBERT forward launches ~360 kernels; for small batches launching them takes several times
longer than the GPU takes to run them (measured on an H200: 13.4 ms of CPU for 1.7 ms of GPU at 16
tokens). A replay launches them all in one call. Every graph shares one memory pool and they are
captured largest first, so the smaller ones reuse the largest one's activations: the pool holds about
one largest-bucket batch, which the memory model counts (quant.memory, graph_tokens).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from server.model.buckets import Bucket, Buckets, Grid

log = logging.getLogger(__name__)

# A bucket's forward: its batch (fill's layout, on the device) -> pooled float32 [rows, hidden].
Forward = Callable[[torch.Tensor, Bucket], torch.Tensor]


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    batch: torch.Tensor  # the static input the graph reads: fill's layout
    pooled: torch.Tensor  # the static output it writes


class CudaGraphs:
    """The captured buckets of one model on one CUDA device."""

    def __init__(self, buckets: Buckets, device: torch.device) -> None:
        self.buckets = buckets
        self.device = device
        self._graphs: dict[Bucket, _Captured] = {}
        self.pool_bytes = 0

    def capture(self, forward: Forward) -> None:
        """Capture every bucket, largest first, into one shared memory pool."""
        started = time.monotonic()
        with torch.cuda.device(self.device):  # capture streams are made on the current device: make it ours
            before = _reserved_after_emptying(self.device)
            pool = torch.cuda.graph_pool_handle()
            side = torch.cuda.Stream(self.device)
            for bucket in self.buckets.all:
                batch = torch.zeros(bucket.tokens + bucket.rows, dtype=torch.int64, device=self.device)
                batch[bucket.tokens:] = 1  # one-token rows: a valid batch to warm up on
                # Warm-up runs on a side stream first, as capture requires (cuBLAS sets up its handles there).
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    forward(batch, bucket)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    pooled = forward(batch, bucket)
                self._graphs[bucket] = _Captured(graph, batch, pooled)
            # Graph pools outlive emptying the cache; the warm-ups' blocks do not.
            self.pool_bytes = _reserved_after_emptying(self.device) - before
        largest = self.buckets.all[0]
        log.info("captured %d CUDA graphs (the largest %d rows x %d tokens) in %.1fs; they hold %.0f MiB",
                 len(self._graphs), largest.rows, largest.width, time.monotonic() - started, self.pool_bytes / 2**20)

    def replay(self, batch: np.ndarray, bucket: Bucket, rows: int) -> torch.Tensor:
        """The first `rows` pooled rows of `batch` (fill's array for `bucket`), on the device."""
        captured = self._graphs[bucket]
        with torch.cuda.device(self.device):
            captured.batch.copy_(torch.from_numpy(batch))
            captured.graph.replay()
        return captured.pooled[:rows]


def _reserved_after_emptying(device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_reserved(device)


def bucket_forward(encode: Callable[[torch.Tensor, Grid], torch.Tensor], pooling: str) -> Forward:
    """The forward of one bucket's batch: grid, encoder, pooling."""
    def forward(batch: torch.Tensor, bucket: Bucket) -> torch.Tensor:
        grid = Grid.of(batch, bucket)
        return grid.pool(encode(grid.ids, grid), pooling)
    return forward
