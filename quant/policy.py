"""Choosing a variant: a pure function of the device, the model and the operator's request."""

from __future__ import annotations

from dataclasses import dataclass

from quant.probe import DeviceInfo
from quant.variants import VARIANTS, Variant, get_variant


@dataclass(frozen=True)
class ModelInfo:
    parameters: int
    hidden_size: int
    num_layers: int


@dataclass(frozen=True)
class Request:
    variant: str = "auto"
    max_memory_bytes: int | None = None


@dataclass(frozen=True)
class Decision:
    variant: Variant
    reason: str


class NoVariantFits(Exception):
    """Nothing fits the device or the cap; the message says how much is needed."""


def choose_variant(device: DeviceInfo, model: ModelInfo, request: Request) -> Decision:
    if request.variant != "auto":
        variant = get_variant(request.variant)
        if device.kind not in variant.devices:
            raise NoVariantFits(f"variant {variant.name} does not run on {device.kind}")
        return Decision(variant, f"requested with --variant {variant.name}")
    candidates = [v for v in VARIANTS.values() if device.kind in v.devices]
    best = max(candidates, key=lambda v: v.rank)
    return Decision(best, f"auto: {best.name} is the most precise variant on {device.kind}")
