"""The variant policy over (device, free memory, request) cases, with CUDA devices described by fake probe results."""

from __future__ import annotations

import pytest

from quant.device import DeviceInfo
from quant.memory import CUDA_HEADROOM, MIB, ModelInfo, estimate
from quant.policy import NoVariantFits, Request, choose_variant
from quant.variants import VARIANTS

GIB = 2**30
# nomic-embed-text-v1.5: 12 layers of 768 wide, SwiGLU 3072; 30528 x 768 word embeddings.
NOMIC = ModelInfo(parameters=136_731_648, linear_parameters=113_246_208, hidden_size=768, mlp_width=2 * 3072,
                  num_layers=12)
# Inputs of up to 512 tokens: weights, not activations, set the order of the variants' needs.
ROW = 512
BUDGET = 16384  # --max-batch-tokens' default


def req(**fields: object) -> Request:
    return Request(**{"variant": "auto", "max_memory_bytes": None, "max_batch_tokens": BUDGET,  # type: ignore[arg-type]
                      "longest_row": ROW, **fields})


def cuda(free: int, native_bf16: bool = True) -> DeviceInfo:
    return DeviceInfo("cuda", 0, "NVIDIA Test", total_bytes=80 * GIB, free_bytes=free, native_bf16=native_bf16)


def cpu(free: int = 20 * GIB, native_bf16: bool = False) -> DeviceInfo:
    return DeviceInfo("cpu", 0, "cpu", total_bytes=24 * GIB, free_bytes=free, native_bf16=native_bf16)


def need(variant: str, kind: str, tokens: int = ROW, row: int = ROW) -> int:
    """Bytes `variant` needs at a budget of `tokens` (one longest row by default)."""
    return estimate(VARIANTS[variant], NOMIC, kind, tokens, min(tokens, row)).total


def free_for(cuda_bytes: int) -> int:
    """Free GPU memory whose usable part (less the headroom) is `cuda_bytes`."""
    return int(cuda_bytes / (1 - CUDA_HEADROOM)) + 1


def between(smaller: int, larger: int) -> int:
    assert smaller < larger
    return (smaller + larger) // 2


def squeeze(kind: str, fits: str, misses: str, row: int = ROW) -> int:
    """A memory size where `fits` fits and `misses` does not."""
    return between(need(fits, kind, row, row), need(misses, kind, row, row))


CASES = [
    # (id, device, request, variant chosen)
    ("cuda-ample", cuda(80 * GIB), req(), "fp16"),
    ("cuda-fp32-short", cuda(free_for(squeeze("cuda", "fp16", "fp32"))), req(), "fp16"),
    ("cuda-no-native-bf16", cuda(free_for(squeeze("cuda", "fp16", "fp32")), native_bf16=False), req(), "fp16"),
    ("cuda-explicit-fp32", cuda(80 * GIB), req(variant="fp32"), "fp32"),
    ("cuda-half-short", cuda(free_for(squeeze("cuda", "int8", "fp16"))), req(), "int8"),
    ("cuda-int8-short", cuda(free_for(squeeze("cuda", "nf4", "int8"))), req(), "nf4"),
    ("cuda-cap-below-free", cuda(80 * GIB), req(max_memory_bytes=squeeze("cuda", "int8", "fp16")), "int8"),
    ("cuda-cap-above-free", cuda(free_for(squeeze("cuda", "fp16", "fp32"))), req(max_memory_bytes=80 * GIB), "fp16"),
    ("cuda-explicit-nf4", cuda(80 * GIB), req(variant="nf4"), "nf4"),
    ("cpu-ample", cpu(), req(), "fp32"),
    ("cpu-native-bf16", cpu(native_bf16=True), req(), "bf16"),
    ("cpu-cap-excludes-fp32", cpu(), req(max_memory_bytes=squeeze("cpu", "bf16", "fp32")), "bf16"),
    # The 8-bit tier before the 4-bit one; within it int8-token, faster than bitsandbytes' int8 and smaller.
    ("cpu-cap-excludes-bf16", cpu(), req(max_memory_bytes=squeeze("cpu", "int8-token", "bf16")), "int8-token"),
    ("cpu-cap-short-inputs-8bit", cpu(),
     req(longest_row=64, max_memory_bytes=squeeze("cpu", "int8-token", "bf16", 64)), "int8-token"),
    ("cpu-cap-excludes-int8-token", cpu(), req(max_memory_bytes=squeeze("cpu", "int8-dynamic", "int8-token")),
     "int8-dynamic"),
    ("cpu-cap-excludes-int8", cpu(), req(max_memory_bytes=squeeze("cpu", "nf4", "int8-dynamic")), "nf4"),
    ("cpu-explicit-int8-token", cpu(native_bf16=True), req(variant="int8-token"), "int8-token"),
    ("cpu-host-memory-short", cpu(free=squeeze("cpu", "bf16", "fp32")), req(), "bf16"),
    ("cpu-explicit-int8", cpu(), req(variant="int8"), "int8"),
    ("cpu-explicit-bf16-emulated", cpu(), req(variant="bf16"), "bf16"),
]


@pytest.mark.parametrize(("device", "request_", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_choice(device: DeviceInfo, request_: Request, expected: str) -> None:
    decision = choose_variant(device, NOMIC, request_)
    assert decision.variant.name == expected
    assert request_.longest_row <= decision.batch_tokens <= request_.max_batch_tokens
    available = device.free_bytes * (1 - CUDA_HEADROOM) if device.kind == "cuda" else device.free_bytes
    assert decision.memory.total <= min(available, request_.max_memory_bytes or available)
    assert decision.memory == estimate(decision.variant, NOMIC, device.kind, decision.batch_tokens,
                                       request_.longest_row)


def test_ample_memory_keeps_the_requested_budget() -> None:
    assert choose_variant(cuda(80 * GIB), NOMIC, req(max_batch_tokens=32768)).batch_tokens == 32768


def test_budget_is_lowered_to_what_fits_after_the_weights() -> None:
    fits_8k_more = need("fp32", "cuda", ROW + 8192)
    decision = choose_variant(cuda(80 * GIB), NOMIC, req(variant="fp32", max_memory_bytes=fits_8k_more))
    assert decision.variant.name == "fp32"
    assert decision.batch_tokens == ROW + 8192
    one_more = estimate(decision.variant, NOMIC, "cuda", decision.batch_tokens + 1, ROW).total
    assert one_more > fits_8k_more  # the largest budget that fits, not merely one that does


def test_budget_never_below_one_longest_input() -> None:
    decision = choose_variant(cuda(80 * GIB), NOMIC, req(max_batch_tokens=100))
    assert decision.batch_tokens == ROW


def test_nothing_fits_names_the_smallest_need_and_the_limit() -> None:
    with pytest.raises(NoVariantFits) as info:
        choose_variant(cuda(80 * GIB), NOMIC, req(max_memory_bytes=100 * MIB))
    message = str(info.value)
    assert "no variant fits" in message and "nf4 needs at least" in message
    assert f"{need('nf4', 'cuda') / MIB:,.0f} MiB" in message
    assert "--max-memory 100 MiB" in message


def test_explicit_variant_that_does_not_fit_says_what_it_needs() -> None:
    with pytest.raises(NoVariantFits, match=f"fp32 needs at least {need('fp32', 'cpu') / MIB:,.0f} MiB"):
        choose_variant(cpu(), NOMIC, req(variant="fp32", max_memory_bytes=need("fp32", "cpu") - 1))


@pytest.mark.parametrize(("device", "variant"), [(cpu(), "fp16"), (cuda(80 * GIB), "int8-dynamic")])
def test_variant_not_built_for_the_device_is_refused(device: DeviceInfo, variant: str) -> None:
    with pytest.raises(NoVariantFits, match=f"{variant} does not run on {device.kind}"):
        choose_variant(device, NOMIC, req(variant=variant))


def test_unknown_variant_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="int8-dynamic"):
        choose_variant(cpu(), NOMIC, req(variant="int4"))


def test_reasons_say_why() -> None:
    assert "first of fp16, int8, nf4 that fits" in choose_variant(cuda(80 * GIB), NOMIC, req()).reason
    reason = choose_variant(cpu(), NOMIC, req(max_memory_bytes=squeeze("cpu", "int8-dynamic", "bf16"))).reason
    assert "--max-memory" in reason and "fp32, bf16" in reason and "do not fit" in reason
    assert "no native bf16" in choose_variant(cpu(), NOMIC, req(variant="bf16")).reason


def test_cuda_headroom_is_left_free() -> None:
    exactly_fp16 = need("fp16", "cuda")
    assert choose_variant(cuda(exactly_fp16), NOMIC, req()).variant.name != "fp16"
    assert choose_variant(cuda(free_for(exactly_fp16)), NOMIC, req()).variant.name == "fp16"


def test_auto_on_cuda_never_picks_fp32_or_bf16() -> None:
    for free in (free_for(need("fp32", "cuda")) * 4, free_for(need("fp16", "cuda")), free_for(need("int8", "cuda"))):
        assert choose_variant(cuda(free), NOMIC, req()).variant.name in ("fp16", "int8", "nf4")


def test_cuda_graphs_count_in_the_memory_and_only_for_variants_that_capture() -> None:
    graphs = 4096
    fp16 = choose_variant(cuda(80 * GIB), NOMIC, req(graph_tokens=graphs))
    assert fp16.variant.name == "fp16" and fp16.graph_tokens == graphs and fp16.batch_tokens == BUDGET
    assert fp16.memory.graphs == estimate(fp16.variant, NOMIC, "cuda", graphs, ROW).workspace
    assert fp16.memory.total == need("fp16", "cuda", BUDGET) + fp16.memory.graphs
    assert "CUDA graphs up to 4096" in fp16.reason and "MiB CUDA graphs + " in fp16.reason
    # bitsandbytes' int8 picks outlier columns per batch, so it runs without graphs and their memory.
    int8 = choose_variant(cuda(80 * GIB), NOMIC, req(variant="int8", graph_tokens=graphs))
    assert int8.graph_tokens == 0 and int8.memory.graphs == 0
    # Never on a CPU, and never more than the batch budget.
    assert choose_variant(cpu(), NOMIC, req(graph_tokens=graphs)).graph_tokens == 0
    assert choose_variant(cuda(80 * GIB), NOMIC, req(graph_tokens=10**6)).graph_tokens == BUDGET


def test_cuda_graphs_take_only_what_the_variant_and_its_budget_leave() -> None:
    batch = need("fp16", "cuda", 8192)
    room_for_graphs = estimate(VARIANTS["fp16"], NOMIC, "cuda", 1000, ROW).workspace
    decision = choose_variant(cuda(80 * GIB), NOMIC, req(max_memory_bytes=batch + room_for_graphs,
                                                         max_batch_tokens=8192, graph_tokens=16384))
    assert decision.variant.name == "fp16" and decision.batch_tokens == 8192
    assert 900 <= decision.graph_tokens <= 1000 and decision.memory.total <= batch + room_for_graphs
    none_left = choose_variant(cuda(80 * GIB), NOMIC, req(max_memory_bytes=batch, max_batch_tokens=8192,
                                                          graph_tokens=16384))
    assert none_left.batch_tokens == 8192 and none_left.graph_tokens == 0 and none_left.memory.graphs == 0
    assert "CUDA graphs" not in none_left.reason


def test_cuda_graphs_never_lower_the_precision_or_refuse_a_start() -> None:
    # One 8192-token input in fp16 just fits: graphs must not push auto to a 4-bit variant, nor refuse fp16.
    cap = need("fp16", "cuda", 8192, 8192) + 50 * MIB
    for variant in ("auto", "fp16"):
        decision = choose_variant(cuda(80 * GIB), NOMIC, req(variant=variant, longest_row=8192, max_memory_bytes=cap,
                                                             graph_tokens=16384))
        assert decision.variant.name == "fp16" and decision.memory.total <= cap
        # Graphs hold rows of up to 512 tokens, so their workspace is counted at that width, not 8192.
        graphs = estimate(decision.variant, NOMIC, "cuda", decision.graph_tokens, 512).workspace
        assert decision.memory.graphs == (graphs if decision.graph_tokens else 0)
