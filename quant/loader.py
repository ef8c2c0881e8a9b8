"""Apply a loading decision: build the model from its checkpoint as the chosen variant, strictly."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModel, PretrainedConfig, PreTrainedModel

from quant.policy import Decision, ModelInfo

log = logging.getLogger(__name__)


class CheckpointMismatch(Exception):
    """The checkpoint does not fill the model exactly: serving it would mean random weights."""


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    weight_bytes: int
    compute_dtype: torch.dtype
    # Entered around every forward pass (e.g. autocast for a mixed-precision variant).
    compute_context: Callable[[], AbstractContextManager[object]] = nullcontext


def load_model(path: Path, config: PretrainedConfig, decision: Decision, device: str) -> LoadedModel:
    try:
        model, info = AutoModel.from_pretrained(
            path, config=config, dtype=torch.float32, output_loading_info=True, attn_implementation="sdpa",
            ignore_mismatched_sizes=True,  # reported in the loading info, which is refused below
        )
    except (RuntimeError, ValueError, OSError) as exc:  # e.g. tensors whose shapes differ from the config
        raise CheckpointMismatch(f"cannot load the checkpoint in {path}: {exc}") from None
    _check_loading_info(path, info)
    model = model.to(device).eval()
    model.requires_grad_(False)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    log.info("loaded %s as %s on %s: %.1f MB of weights", path, decision.variant.name, device,
             weight_bytes / 1e6)
    return LoadedModel(model=model, weight_bytes=weight_bytes, compute_dtype=torch.float32)


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
    """Parameter count from the safetensors headers, without loading any tensor."""
    parameters = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                parameters += _numel(f.get_slice(key))
    return ModelInfo(parameters=parameters, hidden_size=int(config.hidden_size),
                     num_layers=int(config.num_hidden_layers))


def _numel(tensor_slice: object) -> int:
    n = 1
    for dim in tensor_slice.get_shape():  # type: ignore[attr-defined]
        n *= int(dim)
    return n
