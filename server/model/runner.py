"""Tokenized rows -> pooled float32 vectors. Runs on the single model worker thread."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import PreTrainedModel

from server.domain import usable_rows
from server.errors import OutOfMemory
from server.model.buckets import Buckets, fill
from server.model.device import release_cached_memory
from server.model.graphs import CudaGraphs, bucket_forward
from server.model.rotary import PerRowNTKRotary, row_position_ids
from server.model.unpadded import Packing, encode, encode_unpadded, pool, supports_unpadded

# Not cuDNN attention, torch's first choice for half precision on Hopper: it builds a plan for each new
# shape, and batches change shape nearly every time (on an H200 fp16 ran 20x slower than fp32 with it).
_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# A CPU forward below this much work takes as long on one thread as on two, and the intra-op pool's other
# threads would spin-wait through all of it: measured on 2 cores, a 1-layer 64-wide model's 20x16 batch took
# 0.97 ms on one thread and 0.90 ms on two for twice the CPU; a full-size NomicBERT 1x16 forward (3.6 GFLOP)
# took 87 ms on one and 46 ms on two.
PARALLEL_MIN_FLOPS = 1e8


class Runner:
    """Runs a batch of token rows through the model and pools each row: the engine's Backend, in-process.

    NomicBERT runs unpadded (server.model.unpadded) unless `unpadded=False`; other models, and NomicBERT
    with `unpadded=False`, take transformers' padded forward. With `buckets`, a NomicBERT batch that fits
    one is padded to it (server.model.buckets) and, once `capture_graphs` has run, replayed as a CUDA graph.
    """

    # Padded either way, as far as memory goes: the unpadded forward runs its linear layers on real tokens,
    # but pads q, k, v and the attention output to [rows, heads, longest, head_dim] and computes the rotary
    # tables at [rows, longest]; and quant.memory sizes the batch budget in padded tokens (rows x longest,
    # plus a rows x longest x longest mask term). The batch window keeps padding near 10%, so counting real
    # tokens would buy a few more rows per batch and let a batch's padded size pass the budget that was fitted.
    is_padded = True
    max_batch_rows: int | None = None  # the batch policy's limit is the only one

    def __init__(self, model: PreTrainedModel, *, pooling: str, pad_id: int, device: str,
                 per_row_rotary: bool,
                 compute_context: Callable[[], AbstractContextManager[object]] = nullcontext,
                 unpadded: bool = True, threads: int | None = None, buckets: Buckets | None = None) -> None:
        self.model = model
        self.compute_context = compute_context
        self.pooling = pooling
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.per_row_rotary = per_row_rotary
        self.unpadded = unpadded and supports_unpadded(model)
        # Intra-op threads for a CPU batch worth parallelising (small ones take one); None leaves torch's.
        self.threads = threads if self.device.type == "cpu" else None
        self.flops_per_token = flops_per_token(model)
        self.buckets = buckets if self.unpadded else None
        self.graphs: CudaGraphs | None = None
        self._bucket_forward = bucket_forward(lambda ids, grid: encode(model, ids, grid), pooling)  # type: ignore[arg-type]

    def run(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Pooled hidden states, one float32 row per input row (before any normalization).

        Raises OutOfMemory when the device cannot hold the batch's activations.
        """
        if self.threads is not None:
            torch.set_num_threads(self.threads_for(rows))
        try:
            with self._forward_context():
                pooled = self._forward(rows)
            return pooled.cpu().numpy()
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            detail = str(exc).splitlines()[0][:300]
        # Outside the handler: the failed forward's frames, and the activations they hold, are freed.
        release_cached_memory(str(self.device))
        raise OutOfMemory(f"out of memory computing {len(rows)} rows of {sum(map(len, rows))} tokens: {detail}")

    def capture_graphs(self) -> None:
        """Capture a CUDA graph of every bucket's forward; batches that fit one replay it from now on."""
        if self.buckets is None or self.device.type != "cuda":
            raise ValueError("CUDA graphs need buckets, a NomicBERT model and a CUDA device")
        graphs = CudaGraphs(self.buckets, self.device)
        with self._forward_context():
            graphs.capture(self._bucket_forward)
        self.graphs = graphs

    def _forward_context(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        for context in (torch.inference_mode(), sdpa_kernel(_ATTENTION_BACKENDS), self.compute_context()):
            stack.enter_context(context)
        return stack

    def _forward(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        if self.buckets is not None:
            bucket = self.buckets.for_batch(len(rows), max(map(len, rows)))
            if bucket is not None:
                batch = fill(rows, bucket, self.pad_id)
                if self.graphs is not None:
                    return self.graphs.replay(batch, bucket, len(rows))
                return self._bucket_forward(torch.from_numpy(batch).to(self.device), bucket)[: len(rows)]
        return self._unpadded(rows) if self.unpadded else self._padded(rows)

    def threads_for(self, rows: Sequence[Sequence[int]]) -> int:
        """The intra-op threads for this batch: one when its forward is too small to share."""
        assert self.threads is not None
        if sum(map(len, rows)) * self.flops_per_token < PARALLEL_MIN_FLOPS:
            return 1
        return self.threads

    def healthy(self, rows: Sequence[Sequence[int]]) -> bool:
        """Whether `rows` (the warm-up's) still give one usable vector each (server.domain.usable_rows)."""
        vectors = self.run(rows)
        return len(vectors) == len(rows) and bool(usable_rows(vectors).all())

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


# What the CPU allocator, the CUDA runtime and driver, cuBLAS and cuDNN (their workspaces) and C++ say when
# they run out; CUDA's caching allocator raises torch.OutOfMemoryError.
_OUT_OF_MEMORY_MESSAGES = ("can't allocate memory", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED",
                           "CUDNN_STATUS_ALLOC_FAILED", "std::bad_alloc")


def flops_per_token(model: PreTrainedModel) -> float:
    """An encoder's multiply-adds per token, x2, from its config: Q, K, V, the output projection and two
    matrices of the MLP per layer (attention scores and NomicBERT's third, gating matrix left out: it
    only decides when a batch is worth parallelising)."""
    c = model.config
    hidden, layers = int(c.hidden_size), int(c.num_hidden_layers)
    inner = int(getattr(c, "intermediate_size", None) or 4 * hidden)
    return 2.0 * layers * (4 * hidden * hidden + 2 * hidden * inner)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError | MemoryError) or (
        isinstance(error, RuntimeError) and any(m in str(error) for m in _OUT_OF_MEMORY_MESSAGES))


def install_per_row_rotary(model: PreTrainedModel, rotary: PerRowNTKRotary) -> None:
    """Replace transformers' rotary module (which caches a dynamic base across calls) with ours."""
    if not hasattr(model, "rotary_emb"):
        raise TypeError(f"{type(model).__name__} has no rotary_emb to replace")
    device = next(model.parameters()).device
    model.rotary_emb = rotary.to(device)
