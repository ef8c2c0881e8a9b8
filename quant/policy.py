"""Choosing a variant and a batch token budget: a pure function of the device, the model and the request.

- An explicit `--variant` is honoured if it runs on the device and fits.
- `auto` on CUDA: fp16 when it fits the free memory (less headroom) or `--max-memory`, else int8, else nf4.
  fp16 keeps mean cosine 1.00000 to fp32 on an H200 at ~1.5x its speed and half its weight memory; fp32 and
  bf16 (less precise than fp16 at the same cost) are served on request only.
- `auto` on a CPU: among the variants that fit, the best quality tier first (those within the lossless
  bar of fp32, then the 8-bit bar, then the 4-bit one), and within a tier the fastest on this CPU.
- CUDA graphs (fp32, fp16, bf16 on CUDA) get what memory the variant and its batch budget leave, up to
  `--cuda-graph-tokens`: they never cost precision or batch tokens.
- The batch token budget is the requested one, lowered to what fits after the weights. A variant fits
  when one longest input fits. When nothing fits, the error says how much the smallest one needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from quant.device import DeviceInfo
from quant.memory import (
    CUDA_HEADROOM,
    MemoryEstimate,
    ModelInfo,
    estimate,
    graph_tokens_that_fit,
    mib,
    tokens_that_fit,
)
from quant.variants import LOSSLESS_BAR, VARIANTS, Variant, get_variant

__all__ = ["Decision", "ModelInfo", "NoVariantFits", "Request", "choose_variant"]


@dataclass(frozen=True)
class Request:
    variant: str
    max_memory_bytes: int | None
    max_batch_tokens: int  # the budget asked for (--max-batch-tokens); lowered when memory is short
    longest_row: int  # tokens of the longest input a batch must be able to hold
    # CUDA graphs asked for (--cuda-graph-tokens; 0 for a model they do not run): their batches' padded tokens,
    # given whatever memory the variant and its batch budget leave.
    graph_tokens: int = 0
    # Where max_memory_bytes came from, as the reason and errors name it (a worker's share, for --workers).
    memory_source: str = "--max-memory"


@dataclass(frozen=True)
class Decision:
    variant: Variant
    reason: str
    batch_tokens: int
    memory: MemoryEstimate  # at batch_tokens
    graph_tokens: int = 0  # the largest CUDA graph's padded tokens; 0 = no graphs


class NoVariantFits(Exception):
    """Nothing fits the device or the cap (or the variant does not run there); the message says why."""


def choose_variant(device: DeviceInfo, model: ModelInfo, request: Request) -> Decision:
    available, budget_text = _available(device, request)
    most = max(request.max_batch_tokens, request.longest_row)
    if request.variant != "auto":
        variant = get_variant(request.variant)
        if device.kind not in variant.devices:
            raise NoVariantFits(f"variant {variant.name} does not run on {device.kind} "
                                f"(it runs on: {', '.join(variant.devices)})")
        note = ""
        if device.kind == "cpu" and variant.name == "bf16" and not device.native_bf16:
            note = "; this CPU has no native bf16 matmul, so it runs emulated, slower than fp32"
        decision = _fit(variant, device, model, request, available, most)
        if decision is None:
            need = estimate(variant, model, device.kind, request.longest_row, request.longest_row)
            raise NoVariantFits(_too_small(variant.name, need, request, budget_text))
        return _with_reason(decision, f"requested with --variant {variant.name}{note}; {budget_text}")

    runnable = _preference([v for v in VARIANTS.values() if device.kind in v.devices], device)
    fitting = [d for v in runnable if (d := _fit(v, device, model, request, available, most))]
    if not fitting:
        needs = {v.name: estimate(v, model, device.kind, request.longest_row, request.longest_row) for v in runnable}
        smallest = min(needs, key=lambda name: needs[name].total)
        raise NoVariantFits(_too_small(smallest, needs[smallest], request, budget_text, "no variant fits; "))
    chosen = fitting[0]
    return _with_reason(chosen, f"auto: {_why(chosen.variant, device, runnable, fitting)}; {budget_text}")


def _available(device: DeviceInfo, request: Request) -> tuple[int, str]:
    """Bytes the model may use, and how that was decided (for the reason and the errors)."""
    if device.kind == "cuda":
        usable = int(device.free_bytes * (1 - CUDA_HEADROOM))
        text = f"{mib(usable)} usable of {mib(device.free_bytes)} free on {device.describe()}"
    else:
        usable = device.free_bytes
        text = f"{mib(usable)} of host memory available"
    if request.max_memory_bytes is not None and request.max_memory_bytes < usable:
        return request.max_memory_bytes, f"{request.memory_source} {mib(request.max_memory_bytes)} ({text})"
    return usable, text


# What `auto` considers on CUDA, in order.
CUDA_AUTO = ("fp16", "int8", "nf4")


def _preference(variants: list[Variant], device: DeviceInfo) -> list[Variant]:
    if device.kind == "cuda":
        return [v for name in CUDA_AUTO for v in variants if v.name == name]
    # CPU: quality first (the lossless ones as one tier, then each lossy bar), then speed on this CPU.
    return sorted(variants, key=lambda v: (-min(v.quality_bar, LOSSLESS_BAR), -_cpu_speed(v, device), -v.rank))


def _cpu_speed(variant: Variant, device: DeviceInfo) -> float:
    return variant.cpu_speed_native_bf16 if device.native_bf16 else variant.cpu_speed


def _fit(variant: Variant, device: DeviceInfo, model: ModelInfo, request: Request, available: int,
         most: int) -> Decision | None:
    tokens = tokens_that_fit(variant, model, device.kind, available, request.longest_row, most)
    if not tokens:
        return None
    wanted = request.graph_tokens if device.kind == "cuda" and variant.cuda_graphs else 0
    graphs = graph_tokens_that_fit(variant, model, device.kind, available, tokens, request.longest_row, wanted)
    return Decision(variant, "", tokens, estimate(variant, model, device.kind, tokens, request.longest_row, graphs),
                    graphs)


def _with_reason(decision: Decision, reason: str) -> Decision:
    tokens = f"batch budget {decision.batch_tokens} tokens"
    if decision.graph_tokens:
        tokens += f", CUDA graphs up to {decision.graph_tokens}"
    return Decision(decision.variant, f"{reason}; {tokens}; needs {decision.memory.describe()}",
                    decision.batch_tokens, decision.memory, decision.graph_tokens)


def _why(chosen: Variant, device: DeviceInfo, runnable: list[Variant], fitting: list[Decision]) -> str:
    fits = {d.variant.name for d in fitting}
    excluded = [v.name for v in runnable if v.name not in fits]
    left_out = f" ({', '.join(excluded)} do not fit)" if excluded else ""
    if device.kind == "cuda":
        return (f"{chosen.name} is the first of {', '.join(CUDA_AUTO)} that fits{left_out}; fp32 and bf16 "
                "only on request")
    cpu = "native bf16" if device.native_bf16 else "no native bf16"
    if chosen.lossless:
        return (f"{chosen.name} is the fastest variant within mean cosine {LOSSLESS_BAR} of fp32 on this CPU "
                f"({cpu}) that fits{left_out}")
    return (f"no variant within mean cosine {LOSSLESS_BAR} of fp32 fits{left_out}; {chosen.name} is the fastest "
            f"that fits on this CPU ({cpu}) among those keeping mean cosine >= {chosen.quality_bar}")


def _too_small(name: str, need: MemoryEstimate, request: Request, budget_text: str, lead: str = "") -> str:
    return (f"{lead}{name} needs at least {need.describe()} (one {request.longest_row}-token input), "
            f"but the limit is {budget_text}. Raise --max-memory, free device memory, or lower --max-input-tokens")
