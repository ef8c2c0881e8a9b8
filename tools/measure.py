"""Measure one variant of one model as the server runs it: weights, memory peaks against the estimate, speed.

Run one variant per process (`python -m tools.measure ...`): a fresh process makes the resident-set
figures that variant's alone. Used by scripts/quality.py (CPU) and scripts/gpu_check.py (CUDA).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from quant.device import DeviceInfo
from quant.memory import ModelInfo, estimate
from quant.policy import Decision, Request, choose_variant
from server.domain import Task
from server.engine.tokenization import TextTokenizer
from server.model.device import peak_memory, probe_device, reset_peak_memory
from server.model.loader import LoadedModel, checkpoint_info, load_model
from server.model.rotary import PerRowNTKRotary
from server.model.runner import Runner, install_per_row_rotary
from server.model.spec import ModelSpec, read_model_spec
from server.model.tokenizer import load_tokenizer


@dataclass(frozen=True)
class Measurement:
    model: str
    variant: str
    device: str
    weight_bytes: int  # what the loaded model stores
    load_bytes: int  # in use after loading, over the process before it
    load_peak_bytes: int  # the most in use while loading (CPU: the float32 copy a quantized load passes through)
    peak_bytes: int  # the most in use while running a batch of `batch_tokens`, over the process before loading
    estimate_bytes: int  # quant.memory's estimate for that batch
    batch_tokens: int
    batch_rows: int
    tokens_per_s: float  # real (unpadded) tokens of the texts per second of compute
    texts: int
    text_tokens: int

    @property
    def estimate_error(self) -> float:
        """(estimate - measured) / measured: positive = the estimate is conservative."""
        return (self.estimate_bytes - self.peak_bytes) / self.peak_bytes


@dataclass(frozen=True)
class Built:
    """A variant of a model assembled the way the server assembles it, short of the batcher."""

    runner: Runner
    loaded: LoadedModel
    tokenizer: TextTokenizer
    spec: ModelSpec


def decide(model_dir: Path, variant: str, device: str, batch_tokens: int, longest_row: int,
           max_memory_bytes: int | None = None) -> tuple[DeviceInfo, ModelInfo, Decision]:
    info = probe_device(device)
    model_info = checkpoint_info(model_dir, read_model_spec(model_dir).config)
    request = Request(variant, max_memory_bytes, batch_tokens, longest_row)
    return info, model_info, choose_variant(info, model_info, request)


def build(model_dir: Path, decision: Decision, device: str, tokenizer: TextTokenizer | None = None) -> Built:
    spec = read_model_spec(model_dir)
    tokenizer = tokenizer or TextTokenizer(*load_tokenizer(model_dir))
    loaded = load_model(model_dir, spec.config, decision, device)
    if spec.rotary is not None:
        install_per_row_rotary(loaded.model, PerRowNTKRotary(spec.rotary))
    runner = Runner(loaded.model, pooling=spec.facts.pooling, pad_id=tokenizer.pad_id, device=device,
                    per_row_rotary=spec.rotary is not None, compute_context=loaded.compute_context)
    return Built(runner, loaded, tokenizer, spec)


def measure(model_dir: Path, variant: str, device: str, texts: list[str], *, batch_rows: int, row_tokens: int,
            text_batch_tokens: int, max_text_tokens: int) -> tuple[Measurement, np.ndarray]:
    """Load `variant` like the server does, run a `batch_rows x row_tokens` batch, then embed `texts`."""
    info, model_info, decision = decide(model_dir, variant, device, batch_rows * row_tokens, row_tokens)
    tokenizer = TextTokenizer(*load_tokenizer(model_dir))  # made first: its memory is not the model's
    before = reset_peak_memory(info.torch_device)
    built = build(model_dir, decision, info.torch_device, tokenizer)
    load_peak = peak_memory(info.torch_device) - before
    load_bytes = reset_peak_memory(info.torch_device) - before

    built.runner.run(probe_rows(built.tokenizer, batch_rows, row_tokens))
    peak = peak_memory(info.torch_device) - before
    tokens = batch_rows * row_tokens
    expected = estimate(decision.variant, model_info, info.kind, tokens, row_tokens).total

    prefix = Task.SEARCH_DOCUMENT.prefix if built.spec.facts.task_prefixes else ""
    rows = [tokenizer.wrap(ids[: max_text_tokens - tokenizer.special_tokens])
            for ids in tokenizer.content_ids(texts, prefix)]
    vectors, seconds = embed_rows(built.runner, rows, text_batch_tokens)
    text_tokens = sum(len(r) for r in rows)
    measurement = Measurement(
        model=model_dir.name, variant=variant, device=info.describe(), weight_bytes=built.loaded.weight_bytes,
        load_bytes=load_bytes, load_peak_bytes=load_peak, peak_bytes=peak, estimate_bytes=expected,
        batch_tokens=tokens, batch_rows=batch_rows, tokens_per_s=text_tokens / seconds, texts=len(texts),
        text_tokens=text_tokens,
    )
    return measurement, vectors


def probe_rows(tokenizer: TextTokenizer, rows: int, length: int) -> list[list[int]]:
    """Full-length rows of ordinary word pieces; the last one half as long, so the batch carries a mask."""
    generator = np.random.default_rng(0)
    content = [generator.integers(2000, 29000, size=length - tokenizer.special_tokens).tolist()
               for _ in range(rows)]
    content[-1] = content[-1][: max(1, len(content[-1]) // 2)]
    return [tokenizer.wrap(c) for c in content]


def embed_rows(runner: Runner, rows: list[list[int]], batch_tokens: int) -> tuple[np.ndarray, float]:
    """Vectors in input order, and the compute seconds (batches of similar lengths, after one warm-up)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    batches: list[list[int]] = [[]]
    for i in order:
        if batches[-1] and (len(batches[-1]) + 1) * len(rows[i]) > batch_tokens:
            batches.append([])
        batches[-1].append(i)
    runner.run([rows[i] for i in batches[0]])  # warm-up: first-call kernel selection is not throughput
    out: list[np.ndarray | None] = [None] * len(rows)
    seconds = 0.0
    for batch in batches:
        started = time.perf_counter()
        vectors = runner.run([rows[i] for i in batch])
        seconds += time.perf_counter() - started
        for i, v in zip(batch, vectors, strict=True):
            out[i] = v
    return np.stack(out), seconds  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--variant", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--texts", type=Path, required=True, help="JSON list of texts")
    p.add_argument("--vectors-out", type=Path, required=True, help=".npy file for the text vectors")
    p.add_argument("--batch-rows", type=int, default=4)
    p.add_argument("--row-tokens", type=int, default=512)
    p.add_argument("--text-batch-tokens", type=int, default=4096)
    p.add_argument("--max-text-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    measurement, vectors = measure(
        args.model, args.variant, args.device, json.loads(args.texts.read_text()), batch_rows=args.batch_rows,
        row_tokens=args.row_tokens, text_batch_tokens=args.text_batch_tokens, max_text_tokens=args.max_text_tokens,
    )
    np.save(args.vectors_out, vectors)
    sys.stdout.write(json.dumps(asdict(measurement)) + "\n")


if __name__ == "__main__":
    main()
