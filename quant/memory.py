"""How many bytes serving a model as a variant takes: weights + activation workspace + runtime overhead.

A pure model (no torch), fed with what the checkpoint headers say. The constants are calibrated against
peaks measured by `make quality` (CPU) and scripts/gpu_check.py (CUDA); docs/quantization.md reports
the estimate's error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from quant.variants import Variant

MIB = 2**20
# What the runtime adds beyond weights and activations: kernel scratch and what a quantizing load leaves
# resident on the CPU; cuBLAS workspaces, kernels loaded on first use and allocator rounding on CUDA.
RUNTIME_OVERHEAD = {"cpu": 64 * MIB, "cuda": 256 * MIB}
# Part of a GPU's free memory left alone: other processes' growth and fragmentation.
CUDA_HEADROOM = 0.10
# CUDA graphs' batches (server.model.buckets): rows of at most this many tokens, at least this many tokens.
GRAPH_MAX_WIDTH = 512
MIN_GRAPH_TOKENS = 16


@dataclass(frozen=True)
class ModelInfo:
    parameters: int
    linear_parameters: int  # weights of the Linear layers: the only ones a variant changes
    hidden_size: int
    mlp_width: int  # outputs of a layer's MLP input projections: intermediate size, twice it when gated
    num_layers: int


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    workspace: int
    overhead: int
    graphs: int = 0  # the CUDA graphs' shared pool: the activations of their largest batch

    @property
    def total(self) -> int:
        return self.weights + self.workspace + self.overhead + self.graphs

    def describe(self) -> str:
        graphs = f" + {mib(self.graphs)} CUDA graphs" if self.graphs else ""
        return (f"{mib(self.total)} = {mib(self.weights)} weights + {mib(self.workspace)} workspace{graphs} + "
                f"{mib(self.overhead)} runtime")


def mib(n: float) -> str:
    if n < MIB / 10:  # else a limit of a few bytes would read "0.0 MiB"
        return f"{n:,.0f} bytes"
    return f"{n / MIB:,.0f} MiB" if n >= 10 * MIB else f"{n / MIB:.1f} MiB"


def weight_bytes(variant: Variant, model: ModelInfo) -> int:
    other = model.parameters - model.linear_parameters  # embeddings, LayerNorm, biases: always float32
    return int(model.linear_parameters * variant.linear_bytes_per_param + other * 4)


def token_bytes(variant: Variant, model: ModelInfo, device_kind: str) -> float:
    """Activation bytes per token of a batch; layers run one after another, so depth does not count.

    The peak comes in the MLP (its input projections' outputs, the activation, the gate product) or in
    attention (q, k, v, their rotated copies, the output), hence a term in each width.
    """
    return variant.workspace_factor[device_kind] * (4 * model.hidden_size + model.mlp_width)


def mask_bytes(tokens: int, longest_row: int) -> int:
    """The boolean (rows x 1 x length x length) attention mask of a padded batch."""
    return tokens * longest_row


def workspace_bytes(variant: Variant, model: ModelInfo, device_kind: str, tokens: int, longest_row: int) -> int:
    return int(tokens * token_bytes(variant, model, device_kind)) + mask_bytes(tokens, min(longest_row, tokens))


def estimate(variant: Variant, model: ModelInfo, device_kind: str, tokens: int, longest_row: int,
             graph_tokens: int = 0) -> MemoryEstimate:
    """Bytes to serve batches of `tokens` padded tokens whose rows are at most `longest_row` long, with CUDA
    graphs of up to `graph_tokens` (never more than `tokens`) beside them: the eager batches' workspace and
    the graphs' pool are two allocations, so both count. Graphs hold rows of GRAPH_MAX_WIDTH tokens at most."""
    graphs = min(graph_tokens, tokens)
    return MemoryEstimate(weight_bytes(variant, model),
                          workspace_bytes(variant, model, device_kind, tokens, longest_row),
                          RUNTIME_OVERHEAD[device_kind],
                          workspace_bytes(variant, model, device_kind, graphs, min(longest_row, GRAPH_MAX_WIDTH))
                          if graphs else 0)


def tokens_that_fit(variant: Variant, model: ModelInfo, device_kind: str, available: int,
                    longest_row: int, most: int) -> int:
    """The largest batch token budget (at most `most`) whose estimate fits `available` bytes; 0 if none."""
    return _largest(longest_row, most, lambda t: estimate(variant, model, device_kind, t, longest_row).total
                    <= available)


def graph_tokens_that_fit(variant: Variant, model: ModelInfo, device_kind: str, available: int,
                          batch_tokens: int, longest_row: int, most: int) -> int:
    """The most CUDA graph tokens (at most `most`) that fit beside a batch budget of `batch_tokens`; 0 if
    not even the smallest graph does. Graphs take what is left: they never cost a variant or batch tokens."""
    return _largest(MIN_GRAPH_TOKENS, min(most, batch_tokens), lambda g: estimate(
        variant, model, device_kind, batch_tokens, longest_row, g).total <= available)


def _largest(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """The largest n in lo..hi with fits(n), for a `fits` that holds up to some n and not beyond; 0 if none."""
    if hi < lo or not fits(lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
