"""The one place that asks the hardware what it has (the only module that touches torch.cuda)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    kind: str  # "cpu" or "cuda"
    index: int
    name: str
    total_bytes: int
    free_bytes: int

    @property
    def torch_device(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def describe(self) -> str:
        return self.name if self.kind == "cpu" else f"{self.torch_device} ({self.name})"


def probe_device(requested: str = "auto") -> DeviceInfo:
    """Describe the device to run on: CUDA when asked for or available under "auto", else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested}: CUDA is not available in this torch build or host")
        index = int(requested.split(":")[1]) if ":" in requested else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        return DeviceInfo("cuda", index, torch.cuda.get_device_name(index), int(total), int(free))
    if requested != "cpu":
        raise RuntimeError(f"--device {requested!r}: expected auto, cpu, cuda or cuda:N")
    total, free = _host_memory()
    return DeviceInfo("cpu", 0, "cpu", total, free)


def _host_memory() -> tuple[int, int]:
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines())
        total = int(fields["MemTotal"].split()[0]) * 1024
        free = int(fields["MemAvailable"].split()[0]) * 1024
        return total, free
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages
