"""What the policy knows of a device: a plain value the model layer's probe fills in."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cpu" or "cuda"
    index: int
    name: str
    total_bytes: int
    free_bytes: int
    # Hardware bf16 matmul: AVX512-BF16 / AMX / Arm BF16 on a CPU, compute capability >= 8.0 on CUDA.
    native_bf16: bool = False

    @property
    def torch_device(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def describe(self) -> str:
        return self.name if self.kind == "cpu" else f"{self.torch_device} ({self.name})"
