"""Summaries of benchmark runs: latency percentiles, throughput, padding, ratios and the targets."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.load import LoadResult
from server.engine.batcher import BatcherTotals
from server.model.device import speed_flags


@dataclass(frozen=True)
class RunSummary:
    mode: str
    concurrency: int
    requests: int
    texts: int
    tokens: int
    wall_s: float
    p50_ms: float
    p99_ms: float
    batches: int
    mean_batch_rows: float
    padded_fraction: float  # of rows x longest row over the run's batches
    model_busy_s: float  # time the model spent on the run's batches
    errors: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def texts_s(self) -> float:
        return self.texts / self.wall_s

    @classmethod
    def of(cls, mode: str, concurrency: int, load: LoadResult, before: BatcherTotals,
           after: BatcherTotals) -> RunSummary:
        batches = after.batches - before.batches
        padded = after.padded_tokens - before.padded_tokens
        latencies_ms = np.asarray(load.latencies_s or [float("nan")]) * 1000
        return cls(
            mode=mode, concurrency=concurrency, requests=len(load.latencies_s), texts=load.texts,
            tokens=load.tokens, wall_s=load.wall_s, p50_ms=float(np.percentile(latencies_ms, 50)),
            p99_ms=float(np.percentile(latencies_ms, 99)), batches=batches,
            mean_batch_rows=(after.rows - before.rows) / max(batches, 1),
            padded_fraction=1 - (after.tokens - before.tokens) / padded if padded else 0.0,
            model_busy_s=after.busy_s - before.busy_s, errors=len(load.errors),
        )


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": speed_flags(),
        "memory_gib": round(memory_gib, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "commit": _commit(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def table(runs: list[RunSummary], st_fp32_tok_s: float, st_variant_tok_s: float) -> str:
    """A markdown table of the runs with their ratios to the in-process baselines."""
    lines = [
        "| mode | conc. | texts | tok/s | texts/s | p50 ms | p99 ms | batches | rows/batch | padded | model busy | "
        "x ST fp32 | x ST same variant |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in runs:
        lines.append(
            f"| {r.mode} | {r.concurrency} | {r.texts} | {r.tok_s:,.0f} | {r.texts_s:.1f} | {r.p50_ms:,.0f} | "
            f"{r.p99_ms:,.0f} | {r.batches} | {r.mean_batch_rows:.1f} | {r.padded_fraction:.1%} | "
            f"{r.model_busy_s / r.wall_s:.0%} | "
            f"{r.tok_s / st_fp32_tok_s:.2f} | {r.tok_s / st_variant_tok_s:.2f} |"
        )
    return "\n".join(lines)
