"""How much a text's vector depends on what it is computed with, per variant: what Info and the docs state.

Each row is computed on its own positions and rotary base (no padding, no batch-wide scaling), so batch-mates
never enter a text's arithmetic, except through how the kernels round: a matmul over more rows may block and
accumulate differently. The same texts in the same batch give the same vectors every time.

Measured by scripts/batch_invariance.py (a text alone, among other texts of one request, in a stream) on a
2-core AMD EPYC with AVX-512F, AVX512_BF16 and AVX512_VNNI, for a random NomicBERT of the real model's shape
(768 x 12 layers): the largest difference in one component of the unit vector, and the lowest cosine. The
stated bound is two to three times the measured value; tests/integration/test_batch_dependence.py holds every
variant to it on the tiny test model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchDependence:
    bound: float  # stated: the largest difference per component of the unit vector
    measured: float
    min_cosine: float  # measured
    cause: str


CPU: dict[str, BatchDependence] = {
    "fp32": BatchDependence(1e-6, 3.3e-7, 0.9999999, "float32 rounding as matmul blocking follows the batch size"),
    "bf16": BatchDependence(5e-3, 2.2e-3, 0.99984, "bfloat16 matmuls round differently as the batch changes"),
    "int8": BatchDependence(3e-2, 1.1e-2, 0.9970, "LLM.int8() picks its float16 outlier columns per batch"),
    "int8-dynamic": BatchDependence(1e-1, 4.2e-2, 0.961, "activations share one int8 scale per batch"),
    # The larger of its two kernels: torch._int_mm (VNNI CPU above) 5.7e-3 / 0.99911; fbgemm's, with 7-bit
    # activation steps (an AVX2 AMD EPYC without VNNI) 1.4e-2 / 0.99340 (real MiniLM weights: 7.9e-3 / 0.99881).
    "int8-token": BatchDependence(3e-2, 1.4e-2, 0.9934, "each token has its own int8 scale, but float32 "
                                  "rounding that follows the batch shape moves values across int8 steps"),
    "nf4": BatchDependence(5e-3, 2.1e-3, 0.99987, "bitsandbytes' 4-bit CPU kernels; cause not traced"),
}


def describe(variant: str, device: str) -> str:
    """One line for Info: how far a vector may move with its batch-mates for `variant` on `device`."""
    known = CPU.get(variant) if device == "cpu" else None
    if known is None:
        return f"not measured for {variant} on {device}"
    return (f"up to {known.bound:.0e} per component with what a text is batched with ({known.cause}; measured "
            f"{known.measured:.1e}, lowest cosine {known.min_cosine}, on a random full-size NomicBERT); the same "
            "batch gives the same vectors every time")
