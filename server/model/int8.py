"""int8 Linear layers for the CPU: per-token activation scales, per-channel weight scales, SmoothQuant smoothing.

Each token's activations get their own int8 scale (its absolute max / 127) and each output channel of a weight
its own, so a token's result never depends on its batch-mates' ranges. Outlier input channels, which would
waste a token's int8 range, are evened out first (SmoothQuant, Xiao et al. 2023): channel j of the input is
divided by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and the weight's column j multiplied by it, with max|X_j|
calibrated at load on a small fixed text set. BERT-style models normalise after the residual add, so the
LayerNorm output feeding a projection also feeds the residual stream and cannot absorb 1/s: the division is an
explicit multiply on the projection's input, folded into the pass that quantizes it. Each projection has its
own s (query, key and value read the same input but get one each: measured no slower, slightly more precise).

Two kernels, chosen by the CPU at load (`kernel_for`):
- `int_mm`, on CPUs with int8 dot-product instructions (VNNI, AMX) or not x86: torch._int_mm (oneDNN),
  compiled (torch.compile, dynamic in the token count) at load, which fuses the smoothing and the per-token
  quantization into one pass and the dequantization into another around the int8 matmul; where compiling fails
  (no C++ compiler) the same function runs eagerly, slower.
- `fbgemm`, on x86 CPUs without them (AVX2): torch._int_mm has no fast path there (measured ~50x slower than
  float32 on an AVX2 EPYC), while fbgemm's dynamic int8 Linear is ~2x faster than float32. That kernel takes one
  activation range per call, so each token is first mapped onto [-1, 1] by its own minimum and maximum
  (x = c + h * x', c the middle of its range, h half its width) and two constant rows, holding 1 and -1, are
  appended: the call's range is always exactly [-1, 1], whatever the batch. Its results are W x = h * (W x')
  + c * (W's row sums), per token. fbgemm quantizes activations to 7 bits on x86 (`reduce_range`: its AVX2
  kernel sums pairs of products in 16 bits); spending them on each token's own range rather than on +-its
  absolute max is what brings it near `int_mm`'s precision (docs/quantization.md).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence, Set
from pathlib import Path

import torch
from torch import nn

from server.model.device import cpu_flags
from server.model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

SMOOTHING_ALPHA = 0.5  # migrates half of the outliers' range (in log scale) into the weights
# x86 instructions that give torch._int_mm a fast int8 dot product (oneDNN's VNNI and AMX kernels).
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
KERNELS = ("int_mm", "fbgemm")

# Calibration input: varied prose, code, numbers and a list, as a served corpus might hold.
CALIBRATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "search_query: how do I reset a forgotten password on my laptop?",
    "search_document: Photosynthesis converts light energy into chemical energy stored in glucose, "
    "releasing oxygen as a by-product in the chloroplasts of plant cells.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
    "Quarterly revenue rose 12.5% to $4.3 billion, beating estimates of $4.1 billion; shares gained 3% "
    "in after-hours trading on 14 March 2024.",
    "Return a new list containing all items from the iterable in ascending order. A custom key function "
    "can be supplied to customize the sort order.",
    "Ingredients: 2 cups flour, 1 tsp baking soda, 3 eggs, 200 g butter. Preheat the oven to 180 C.",
    "The treaty, signed in 1648, ended thirty years of war and reshaped the political map of Europe.",
    "ERROR 2024-05-01T12:00:03Z connection refused (errno 111) while contacting upstream at 10.0.0.7:8080",
    "Neural networks learn representations by adjusting weights to minimise a loss over training examples.",
    "Is it possible to travel faster than light? Most physicists say no, because of special relativity.",
    "SELECT name, COUNT(*) FROM orders WHERE status = 'shipped' GROUP BY name ORDER BY 2 DESC;",
    "Les chats dorment souvent plus de douze heures par jour, surtout en hiver.",
    "Raise ValueError if the argument is not a positive integer; otherwise return its square root.",
    "Patients reported mild headaches and fatigue; no serious adverse events were observed in the trial.",
    "classification: This movie was a complete waste of time, the plot made no sense at all!",
)


def kernel_for(flags: Set[str]) -> str:
    """The int8 kernel to run on a CPU with these feature flags (see the module's docstring)."""
    x86_without_dot = "avx2" in flags and not flags & INT8_DOT_FLAGS
    return "fbgemm" if x86_without_dot and "fbgemm" in torch.backends.quantized.supported_engines else "int_mm"


class Int8Linear(nn.Module):
    """A Linear layer as int8 weights (one scale per output channel), run on per-token int8 activations."""

    def __init__(self, linear: nn.Linear, input_max: torch.Tensor | None, alpha: float = SMOOTHING_ALPHA,
                 kernel: str = "int_mm") -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"unknown int8 kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
        weight = linear.weight.detach().float()  # [out, in]
        inv_smooth = None
        if input_max is not None:
            smooth = (input_max.float().clamp(min=1e-5) ** alpha
                      / weight.abs().amax(dim=0).clamp(min=1e-5) ** (1 - alpha))
            weight = weight * smooth
            inv_smooth = 1 / smooth
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        quantized = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.packed = _fbgemm_pack(quantized, scale) if kernel == "fbgemm" else None
        # [in, out], as the int8 matmul takes it; fbgemm keeps its own packed copy instead.
        self.register_buffer("weight_t", None if self.packed is not None else quantized.t().contiguous())
        # The dequantized weight's row sums, for fbgemm's centred tokens: W (c + h x') = h W x' + c W 1.
        self.register_buffer("weight_sums", None if self.packed is None else
                             (quantized.double().sum(dim=1) * scale.double()).float())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("inv_smooth", inv_smooth)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel: Callable[..., torch.Tensor] = int8_linear

    def _save_to_state_dict(self, destination: dict[str, object], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed is not None:  # what fbgemm stores, as torch's quantized Linear shows it (stored_bytes)
            destination[prefix + "packed_weight"] = torch.ops.quantized.linear_unpack(self.packed)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.packed is not None:
            out = fbgemm_linear(flat, self.packed, self.weight_sums, self.inv_smooth, self.bias)
        else:
            out = self.kernel(flat, self.weight_t, self.weight_scale, self.inv_smooth, self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def _fbgemm_pack(quantized: torch.Tensor, scale: torch.Tensor) -> torch.ScriptObject:
    """The int8 weight [out, in] and its per-channel scales as fbgemm's packed Linear weight."""
    with warnings.catch_warnings():  # torch marks its quantized tensors deprecated in favour of torchao
        warnings.simplefilter("ignore", UserWarning)
        weight = torch._make_per_channel_quantized_tensor(
            quantized, scale.double(), torch.zeros(quantized.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(weight, None)


def fbgemm_linear(x: torch.Tensor, packed: torch.ScriptObject, weight_sums: torch.Tensor,
                  inv_smooth: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] float32 -> [T, out] float32 through fbgemm's int8 Linear, each row of x on its own range."""
    tokens = x.shape[0]
    normalized = torch.empty(tokens + 2, x.shape[1])
    rows = normalized[:tokens]
    if inv_smooth is not None:
        torch.mul(x, inv_smooth, out=rows)
    else:
        rows.copy_(x)
    high, low = rows.amax(dim=1, keepdim=True), rows.amin(dim=1, keepdim=True)
    centre, half = (high + low) / 2, ((high - low) / 2).clamp_(min=1e-12)
    # Clamped: rounding may land a row's end an ulp past 1, which would widen the call's range, and so every
    # row's steps, with the batch.
    rows.sub_(centre).div_(half).clamp_(-1.0, 1.0)
    if not (torch.isfinite(centre).all() and torch.isfinite(half).all()):
        # Zeros in the call, so that the range stays [-1, 1] for the other rows; its non-finite centre or
        # width then makes its own result non-finite, as the server expects of a broken row.
        rows.nan_to_num_(0.0, 0.0, 0.0)
    normalized[tokens:].zero_()  # the range rows (two: a layer may have a single input)
    normalized[tokens, 0], normalized[tokens + 1, 0] = 1.0, -1.0
    out = torch.ops.quantized.linear_dynamic(normalized, packed, True)[:tokens].mul_(half)
    out.addcmul_(centre, weight_sums)
    return out.add_(bias) if bias is not None else out


def int8_linear(x: torch.Tensor, weight_t: torch.Tensor, weight_scale: torch.Tensor,
                inv_smooth: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] float32 -> [T, out] float32 through an int8 x int8 -> int32 matmul, one scale per row of x."""
    if inv_smooth is not None:
        x = x * inv_smooth
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    quantized = torch.round(x / scale).to(torch.int8)
    out = torch._int_mm(quantized, weight_t).to(torch.float32)
    out = out * (scale * weight_scale)
    return out + bias if bias is not None else out


def calibration_rows(model_dir: Path) -> list[list[int]]:
    """The calibration texts as token rows (special tokens included), each short of any length limit."""
    tokenizer = load_tokenizer(model_dir).tokenizer
    return [encoding.ids[:128] for encoding in tokenizer.encode_batch(list(CALIBRATION_TEXTS))]


def input_maxima(model: nn.Module, rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """Each Linear layer's per-channel absolute input max over `rows`, each row run alone (no padding)."""
    names = {module: name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    maxima: dict[str, torch.Tensor] = {}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        name = names[module]
        current = args[0].detach().reshape(-1, args[0].shape[-1]).abs().amax(dim=0).float()
        maxima[name] = torch.maximum(maxima[name], current) if name in maxima else current

    handles = [module.register_forward_pre_hook(record) for module in names]
    try:
        with torch.inference_mode():
            for row in rows:
                ids = torch.tensor([list(row)])
                model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def quantize_int8(model: nn.Module, rows: Sequence[Sequence[int]], alpha: float | None = SMOOTHING_ALPHA,
                  kernel: str = "int_mm") -> list[Int8Linear]:
    """Replace every Linear layer of `model` with an `Int8Linear` run by `kernel`, smoothed with `alpha` (None:
    not smoothed)."""
    maxima = input_maxima(model, rows) if alpha is not None else {}
    modules = dict(model.named_modules())
    built = []
    for name, module in list(modules.items()):
        if not isinstance(module, nn.Linear):
            continue
        layer = Int8Linear(module, maxima.get(name), alpha or 0.0, kernel)
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, layer)
        built.append(layer)
    return built


def compile_kernels(layers: Sequence[Int8Linear]) -> None:
    """Run every layer through one torch.compile'd kernel, dynamic in the token count, compiled now: one graph
    for a single token and one for any other count, per combination of smoothing and bias (at most four)."""
    kernel = torch.compile(int8_linear, dynamic=True)
    with torch.inference_mode():
        for layer in layers:
            layer.kernel = kernel
            for tokens in (1, 3):
                layer(torch.zeros(tokens, layer.in_features))


def quantize_int8_token(model: nn.Module, model_dir: Path, kernel: str | None = None) -> None:
    """The `int8-token` variant: calibrate on the built-in texts, quantize every Linear layer for `kernel` (by
    default the one for this CPU), compile where the kernel is compiled."""
    kernel = kernel or kernel_for(cpu_flags())
    started = time.monotonic()
    layers = quantize_int8(model, calibration_rows(model_dir), kernel=kernel)
    calibrated = time.monotonic()
    if kernel == "int_mm":
        try:
            compile_kernels(layers)
        except Exception as exc:  # no C++ toolchain, an unsupported platform: the same arithmetic, eagerly
            for layer in layers:
                layer.kernel = int8_linear
            log.warning("int8-token: compiling the int8 kernel failed (%s: %s); running it eagerly, slower",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
    log.info("int8-token: calibrated and quantized %d Linear layers for the %s kernel in %.1fs%s", len(layers),
             kernel, calibrated - started,
             f", compiled in {time.monotonic() - calibrated:.1f}s" if kernel == "int_mm" else "")
