"""Apply a loading decision: build the model from its checkpoint as the chosen variant, strictly.

Every variant changes only the Linear layers. Embeddings and LayerNorm keep float32 weights; in fp16 and
bf16 the matmuls run under autocast while the residual stream, LayerNorm, the rotary angles and pooling
stay float32 (autocast computes LayerNorm, softmax and elementwise ops in their inputs' float32).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import math
import re
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModel, BitsAndBytesConfig, PretrainedConfig, PreTrainedModel

from quant.memory import ModelInfo
from quant.policy import Decision
from server.model.int8 import quantize_int8_token

log = logging.getLogger(__name__)

ComputeContext = Callable[[], AbstractContextManager[object]]


class CheckpointMismatch(Exception):
    """The checkpoint does not fill the model exactly: serving it would mean random weights."""


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    weight_bytes: int
    compute_dtype: torch.dtype
    # Entered around every forward pass (e.g. autocast for a mixed-precision variant).
    compute_context: ComputeContext = nullcontext


def load_model(path: Path, config: PretrainedConfig, decision: Decision, device: str) -> LoadedModel:
    name = decision.variant.name
    kind = torch.device(device).type
    context: ComputeContext = nullcontext
    if name in ("int8", "nf4"):
        model = _from_pretrained(path, config, device_map={"": device},
                                 quantization_config=_bnb_config(name, kind))
        dtype = torch.float16 if name == "int8" else _nf4_compute(kind)
    else:
        # Built on the host and converted there, so the device never holds more than the final weights.
        model = _from_pretrained(path, config)
        if name in ("fp16", "bf16"):
            dtype = torch.float16 if name == "fp16" else torch.bfloat16
            for linear in _linears(model):
                linear.to(dtype)
            context = functools.partial(torch.autocast, device_type=kind, dtype=dtype)
        elif name == "int8-dynamic":
            model = _quantize_dynamic(model)
            dtype = torch.qint8
        elif name == "int8-token":
            quantize_int8_token(model, path)
            dtype = torch.int8
        else:
            dtype = torch.float32
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    if kind == "cpu" and name != "fp32":
        _release_checkpoint(model)
    size = stored_bytes(model)
    log.info("loaded %s as %s on %s: %.1f MB of weights", path, name, device, size / 1e6)
    return LoadedModel(model=model, weight_bytes=size, compute_dtype=dtype, compute_context=context)


def _from_pretrained(path: Path, config: PretrainedConfig, **kwargs: object) -> PreTrainedModel:
    try:
        model, info = AutoModel.from_pretrained(
            path, config=config, dtype=torch.float32, output_loading_info=True, attn_implementation="sdpa",
            ignore_mismatched_sizes=True,  # reported in the loading info, which is refused below
            **kwargs,
        )
    except Exception as exc:  # shapes that differ from the config, a malformed shard index, ...
        raise CheckpointMismatch(f"cannot load the checkpoint in {path}: {type(exc).__name__}: "
                                 f"{' '.join(str(exc).split())}") from None
    _check_loading_info(path, info)
    return model


def _linears(model: nn.Module) -> Iterable[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _bnb_config(name: str, kind: str) -> BitsAndBytesConfig:
    # An empty skip list quantizes every Linear layer (the default would keep the last one in float32,
    # a rule meant for language-model heads).
    if name == "int8":
        _quiet_bnb_int8()
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=[])
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=_nf4_compute(kind), llm_int8_skip_modules=[])


def _nf4_compute(kind: str) -> torch.dtype:
    # float32 on the CPU: float16 is emulated there and no faster; float16 on CUDA keeps 10 mantissa bits.
    return torch.float32 if kind == "cpu" else torch.float16


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def _quiet_bnb_int8() -> None:
    """bitsandbytes logs a warning on every int8 matmul whose input is not float16 (ours are float32)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage("MatMul8bitLt: inputs will be cast"))


def _quantize_dynamic(model: PreTrainedModel) -> PreTrainedModel:
    """int8 weights per output channel; activations quantized per batch from their observed range."""
    with warnings.catch_warnings():
        # torch.ao.quantization is marked deprecated in favour of torchao, whose equivalent measured
        # about 2x slower on these CPUs (docs/quantization.md).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(
            model, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True
        )


def _release_checkpoint(model: nn.Module) -> None:
    """Give the host memory a conversion used back, keeping only the converted weights resident.

    The loaded float32 tensors are views of the mapped checkpoint file. After a conversion the tensors
    left in float32 (embeddings, LayerNorm) would keep the whole mapping, with every page the conversion
    read, resident; copies of them let it go. glibc keeps freed heap unless asked to return it.
    """
    _trim_heap()  # first, so that the copies can take the heap the conversion freed
    with torch.no_grad():
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for name, tensor in tensors.items():
                    if tensor is not None and tensor.dtype.is_floating_point and not tensor.is_quantized:
                        tensors[name].data = tensor.data.clone()
    _trim_heap()


def _trim_heap() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def stored_bytes(model: nn.Module) -> int:
    """Bytes of everything the model stores: parameters, buffers and quantized packed weights."""
    return sum(_tensor_bytes(v) for v in model.state_dict().values())


def _tensor_bytes(value: object) -> int:
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(v) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    n = value.numel() * value.element_size()
    if value.is_quantized and value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        n += _tensor_bytes(value.q_per_channel_scales()) + _tensor_bytes(value.q_per_channel_zero_points())
    return n


def _check_loading_info(path: Path, info: dict[str, object]) -> None:
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in (info.get(kind) or ()))
        if keys:
            shown = ", ".join(keys[:12]) + (f" (+{len(keys) - 12} more)" if len(keys) > 12 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if info.get("error_msgs"):
        problems.append("errors: " + "; ".join(map(str, info["error_msgs"])))
    if problems:
        raise CheckpointMismatch(
            f"the checkpoint in {path} does not match its config ({'; '.join(problems)}); "
            "refusing to serve a model with missing or random weights"
        )


def checkpoint_info(path: Path, config: PretrainedConfig) -> ModelInfo:
    """Parameter counts from the safetensors headers, without loading any tensor.

    Two-dimensional tensors outside the embeddings are the Linear weights a variant quantizes. The first
    layer's Linear weights (4 x hidden^2 of attention, then hidden x intermediate per MLP projection) tell
    a gated MLP (two input projections) from a plain one.
    """
    parameters = linear = first_layer = 0
    for file in sorted(path.glob("*.safetensors")):
        for key, shape in _tensor_shapes(file):
            n = math.prod(shape)
            parameters += n
            if len(shape) == 2 and "embeddings" not in key:
                linear += n
                if _FIRST_LAYER.search(key):
                    first_layer += n
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    projections = max(1, round((first_layer - 4 * hidden * hidden) / (hidden * intermediate)) - 1)
    return ModelInfo(parameters=parameters, linear_parameters=linear, hidden_size=hidden,
                     mlp_width=projections * intermediate, num_layers=int(config.num_hidden_layers))


def _tensor_shapes(file: Path) -> list[tuple[str, list[int]]]:
    """Each tensor's name and shape from the header; a file shorter than its header says is refused, and so is
    a weight stored as integers (transformers would cast its codes to floats and serve them as weights)."""
    try:
        with safe_open(file, framework="pt") as f:
            tensors = [(key, f.get_slice(key)) for key in f.keys()]  # noqa: SIM118
    except Exception as exc:  # safetensors' own error type differs between its versions
        raise CheckpointMismatch(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    for key, tensor in tensors:
        dtype = tensor.get_dtype()
        if not dtype.startswith(("F", "BF")) and not key.endswith(_INDEX_BUFFERS):
            raise CheckpointMismatch(f"{file}: tensor {key} is stored as {dtype}: weights must be floating "
                                     "point (F32, F16, BF16), not a checkpoint quantized to integers")
    return [(key, [int(d) for d in tensor.get_shape()]) for key, tensor in tensors]


# Integer buffers some BERT checkpoints carry (all-MiniLM-L6-v2: embeddings.position_ids, I64).
_INDEX_BUFFERS = ("position_ids", "token_type_ids")


_FIRST_LAYER = re.compile(r"(^|\.)layers?\.0\.")
