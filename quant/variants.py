"""The variants a model can be served as: what each stores, where it runs, what it costs and promises.

Only the Linear layers change between variants. Embeddings, LayerNorm, the rotary angles, pooling and
the Matryoshka steps stay float32 in every one (see server.model.loader).
"""

from __future__ import annotations

from dataclasses import dataclass

# Mean cosine to fp32 a variant must keep for `auto` to prefer it for speed alone (the fp16/bf16 bar).
LOSSLESS_BAR = 0.999


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    devices: tuple[str, ...]  # device kinds it runs on: "cpu", "cuda"
    rank: int  # precision order: higher = closer to fp32
    quality_bar: float  # mean cosine to fp32 it must keep (checked by `make quality` and the tests)
    linear_bytes_per_param: float  # storage of the Linear weights, quantization scales included
    # Activation bytes per token and per element of (4 x hidden + MLP width), by device kind. CPU figures
    # are fitted to the peaks `make quality` measures; CUDA ones to scripts/gpu_check.py's peaks on an
    # H200 (full-size NomicBERT, 32 x 512 tokens), each at least 18% above what was measured.
    workspace_factor: dict[str, float]
    # Throughput relative to fp32 on a CPU without native bf16 matmul (AVX2: `make quality`) and on one
    # with it (AVX512-BF16: the design notes' figures); only the order matters, for `auto` on the CPU.
    cpu_speed: float = 0.0
    cpu_speed_native_bf16: float = 0.0
    # Whether its forward is captured as a CUDA graph: plain torch layers are. bitsandbytes' LLM.int8 picks
    # its outlier columns from each batch's values, which a replayed graph cannot; nf4 has not been tried.
    cuda_graphs: bool = False

    @property
    def lossless(self) -> bool:
        return self.quality_bar >= LOSSLESS_BAR


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("fp32", "float32 weights and compute: the reference", ("cpu", "cuda"), rank=100,
                quality_bar=1.0, linear_bytes_per_param=4.0, workspace_factor={"cpu": 7, "cuda": 7},
                cpu_speed=1.0, cpu_speed_native_bf16=1.0, cuda_graphs=True),
        Variant("fp16", "float16 Linear weights and matmuls under autocast; residual stream float32",
                ("cuda",), rank=90, quality_bar=0.999, linear_bytes_per_param=2.0, workspace_factor={"cuda": 4},
                cuda_graphs=True),
        Variant("bf16", "bfloat16 Linear weights and matmuls under autocast; residual stream float32",
                ("cpu", "cuda"), rank=80, quality_bar=0.999, linear_bytes_per_param=2.0,
                workspace_factor={"cpu": 7, "cuda": 4}, cpu_speed=0.2, cpu_speed_native_bf16=3.9, cuda_graphs=True),
        Variant("int8", "bitsandbytes LLM.int8(): int8 weights, int8 matmuls with float16 outlier columns",
                ("cpu", "cuda"), rank=60, quality_bar=0.99, linear_bytes_per_param=1.0,
                workspace_factor={"cpu": 33, "cuda": 8}, cpu_speed=0.4, cpu_speed_native_bf16=1.4),
        # Activations share one scale per batch, so outlier features (common in BERT-family models) cost
        # precision: it holds the 4-bit bar, not the 8-bit one (docs/quantization.md).
        Variant("int8-dynamic", "torch dynamic quantization (CPU): int8 weights per channel, activations "
                "quantized per tensor and batch, int8 matmuls (fbgemm)", ("cpu",), rank=55, quality_bar=0.97,
                linear_bytes_per_param=1.0, workspace_factor={"cpu": 16}, cpu_speed=1.4, cpu_speed_native_bf16=5.1),
        # One int8 scale per token and per output channel, outlier channels smoothed into the weights
        # (SmoothQuant, calibrated at load): the 8-bit bar at int8 speed. Its kernel follows the CPU
        # (server.model.int8): torch._int_mm, compiled at load, with VNNI or AMX; fbgemm on AVX2 without them.
        # Speed by scripts/int8_probe.py: on an AVX512-BF16/VNNI CPU 1.8-2.0x fp32 on MiniLM, 2.6-3.0x on
        # full-size NomicBERT; on an AVX2 CPU (fbgemm, `make quality`) 1.2x and 1.6x, about int8-dynamic's.
        Variant("int8-token", "int8 weights per channel, activations quantized per token after SmoothQuant "
                "smoothing, int8 matmuls (compiled at load)", ("cpu",), rank=58, quality_bar=0.99,
                linear_bytes_per_param=1.0, workspace_factor={"cpu": 19}, cpu_speed=1.3, cpu_speed_native_bf16=2.6),
        Variant("nf4", "bitsandbytes 4-bit NormalFloat weights (double-quantized scales), dequantized per matmul",
                ("cpu", "cuda"), rank=40, quality_bar=0.97, linear_bytes_per_param=0.52,
                workspace_factor={"cpu": 12, "cuda": 7}, cpu_speed=0.85, cpu_speed_native_bf16=0.85),
    )
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose auto or one of {', '.join(VARIANTS)}") from None
