"""The one place that asks the hardware what it has (the only module that touches torch.cuda)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from quant.device import DeviceInfo


def probe_device(requested: str = "auto") -> DeviceInfo:
    """Describe the device to run on: CUDA when asked for or available under "auto", else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {requested}: CUDA is not available in this torch build or host")
        index = int(requested.split(":")[1]) if ":" in requested else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)
        with torch.cuda.device(index):
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return DeviceInfo("cuda", index, torch.cuda.get_device_name(index), int(total), int(free), bf16)
    if requested != "cpu":
        raise RuntimeError(f"--device {requested!r}: expected auto, cpu, cuda or cuda:N")
    total, free = _host_memory()
    flags = cpu_flags()
    return DeviceInfo("cpu", 0, "cpu", total, free, native_bf16=bool(flags & _CPU_BF16_FLAGS))


# x86: avx512_bf16, amx_bf16; aarch64: bf16. Without them torch emulates bf16, slower than fp32.
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def set_threads(threads: int) -> None:
    """Intra-op threads of the model's CPU kernels."""
    torch.set_num_threads(threads)


# The x86 flags that decide the CPU variants' speed (native bf16, int8 dot products): what a figure needs beside it.
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")


def speed_flags() -> str:
    """The SPEED_FLAGS this CPU has, space-separated, or a line saying it has none."""
    flags = cpu_flags()
    return " ".join(f for f in SPEED_FLAGS if f in flags) or "none of " + "/".join(SPEED_FLAGS)


def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (x86 "flags", Arm "Features"); empty if unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def _host_memory() -> tuple[int, int]:
    """(total, available) bytes; inside a container, bounded by its cgroup limit."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines())
        total = int(fields["MemTotal"].split()[0]) * 1024
        free = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total = free = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_value("memory.max")
    if limit is not None:
        used = _cgroup_value("memory.current") or 0
        total, free = min(total, limit), min(free, max(0, limit - used))
    return total, free


def available_cpus() -> int:
    """Cores this process may use: its CPU affinity, bounded by a cgroup CPU quota (container limits)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def _cgroup_value(name: str) -> int | None:
    """A cgroup v2 number of this process ("max" or absent -> None)."""
    try:
        text = Path(f"/sys/fs/cgroup/{name}").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def reset_peak_memory(device: str) -> int:
    """Start a new peak-memory window; returns the bytes in use now (CPU: resident set; CUDA: allocated)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    try:  # "5" resets the kernel's resident-set high-water mark (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _proc_status_bytes("VmRSS")


def release_cached_memory(device: str) -> None:
    """Hand the caching allocator's free blocks back (after an out-of-memory), so a smaller retry can fit."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def peak_memory(device: str) -> int:
    """The most bytes in use since `reset_peak_memory`."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return _proc_status_bytes("VmHWM")


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")
