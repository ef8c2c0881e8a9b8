"""The variants a model can be served as."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    devices: tuple[str, ...]  # device kinds it runs on: "cpu", "cuda"
    bytes_per_param: float  # weight storage of the quantized (Linear) layers
    rank: int  # higher = closer to fp32


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("fp32", "float32 weights and compute: the reference", ("cpu", "cuda"), 4.0, 100),
    )
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown variant {name!r}; choose auto or one of {', '.join(VARIANTS)}") from None
