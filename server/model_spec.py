"""What a checkpoint directory holds: its architecture (translated for transformers), pooling and limits."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from server.errors import StartupError

log = logging.getLogger(__name__)

NOMIC_MIN_DIMENSIONS = 64  # the smallest Matryoshka width nomic-embed-text-v1.5 was trained for

# Original nomic_bert config keys -> transformers 5 NomicBertConfig keys. transformers reads only the
# latter and silently keeps its defaults (a 768-wide, 12-layer model) when they are absent.
_NOMIC_KEYS = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_inner": "intermediate_size",
    "layer_norm_epsilon": "layer_norm_eps",
    "n_positions": "max_position_embeddings",
}
# Original options this server implements only in one setting.
_NOMIC_REQUIRED = {
    "activation_function": "swiglu",
    "prenorm": False,
    "rotary_emb_fraction": 1.0,
    "rotary_emb_interleaved": False,
    "qkv_proj_bias": False,
    "mlp_fc1_bias": False,
    "mlp_fc2_bias": False,
    "causal": False,
    "parallel_block": False,
    "use_rms_norm": False,
}


@dataclass(frozen=True)
class RotarySpec:
    """Rotary embedding of a nomic model, with dynamic NTK scaling beyond the trained positions."""

    base: float
    head_dim: int
    max_trained_positions: int
    scaling_factor: float  # 0 = no scaling


@dataclass(frozen=True)
class ModelSpec:
    path: Path
    config: PretrainedConfig  # complete for transformers: original keys already translated
    is_nomic: bool
    hidden_size: int
    max_input_tokens: int
    pooling: str  # "mean" or "cls"
    rotary: RotarySpec | None  # set for nomic models: the server computes rotary per row

    @property
    def min_dimensions(self) -> int:
        return min(NOMIC_MIN_DIMENSIONS, self.hidden_size) if self.is_nomic else self.hidden_size

    @property
    def task_prefixes(self) -> bool:
        return self.is_nomic

    @property
    def layer_norm_before_truncation(self) -> bool:
        return self.is_nomic


def read_model_spec(path: Path, rotary_scaling_factor: float = 2.0) -> ModelSpec:
    """Read and check `path`'s configs. `rotary_scaling_factor` overrides the checkpoint's (often null)."""
    raw = _read_json(path / "config.json")
    if raw is None:
        raise StartupError(f"{path / 'config.json'} is missing or not JSON")
    model_type = raw.get("model_type")
    if model_type == "nomic_bert":
        overrides, rotary = _translate_nomic(raw, rotary_scaling_factor)
    else:
        overrides, rotary = {}, None
    try:
        config = AutoConfig.from_pretrained(path, **overrides)
    except Exception as exc:
        raise StartupError(f"cannot read the model config in {path}: {exc}") from None
    pooling = _pooling_mode(path)
    if model_type == "nomic_bert" and pooling != "mean":
        raise StartupError(f"nomic models pool by mean; {path} asks for {pooling!r}")
    return ModelSpec(
        path=path,
        config=config,
        is_nomic=model_type == "nomic_bert",
        hidden_size=int(config.hidden_size),
        max_input_tokens=_max_input_tokens(path, config, raw),
        pooling=pooling,
        rotary=rotary,
    )


def _translate_nomic(raw: dict[str, Any], scaling_factor: float) -> tuple[dict[str, Any], RotarySpec]:
    for key, wanted in _NOMIC_REQUIRED.items():
        if key in raw and raw[key] != wanted and not (wanted is False and raw[key] is None):
            raise StartupError(f"config.json: {key}={raw[key]!r} is not supported (only {wanted!r})")
    original = {k: raw[k] for k in _NOMIC_KEYS if raw.get(k) is not None}
    if "n_embd" in original and "n_inner" not in original:
        original["n_inner"] = 4 * original["n_embd"]  # the original GPT-2 style default
    overrides: dict[str, Any] = {_NOMIC_KEYS[k]: v for k, v in original.items()}
    overrides["hidden_act"] = "silu"
    base = float(raw.get("rotary_emb_base") or raw.get("rope_parameters", {}).get("rope_theta") or 1000.0)
    overrides["rope_parameters"] = {"rope_type": "default", "rope_theta": base}
    conflicts = [
        f"{orig}={original[orig]} vs {new}={raw[new]}"
        for orig, new in _NOMIC_KEYS.items()
        if orig in original and new in raw and raw[new] != original[orig]
    ]
    if conflicts:
        raise StartupError("config.json disagrees with itself: " + "; ".join(conflicts))
    hidden = int(overrides.get("hidden_size", raw.get("hidden_size", 768)))
    heads = int(overrides.get("num_attention_heads", raw.get("num_attention_heads", 12)))
    max_trained = int(raw.get("max_trained_positions") or 2048)
    overrides["head_dim"] = hidden // heads  # derived at construction, so it must be passed too
    return overrides, RotarySpec(
        base=base, head_dim=hidden // heads, max_trained_positions=max_trained, scaling_factor=scaling_factor
    )


def _pooling_mode(path: Path) -> str:
    """The sentence-transformers pooling of the checkpoint; mean where it names none."""
    modules = _read_json(path / "modules.json") or []
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            pooling = _read_json(path / module.get("path", "") / "config.json") or {}
            if pooling.get("pooling_mode_cls_token"):
                return "cls"
            if pooling.get("pooling_mode_mean_tokens", True) and not any(
                pooling.get(k) for k in ("pooling_mode_max_tokens", "pooling_mode_mean_sqrt_len_tokens",
                                         "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
            ):
                return "mean"
            raise StartupError(f"{path}: pooling {pooling} is not supported (mean or cls only)")
    return "mean"


def _max_input_tokens(path: Path, config: PretrainedConfig, raw: dict[str, Any]) -> int:
    limit = int(raw.get("n_positions") or getattr(config, "max_position_embeddings", 512))
    st = _read_json(path / "sentence_bert_config.json") or {}
    if st.get("max_seq_length"):
        limit = min(limit, int(st["max_seq_length"]))
    return limit


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise StartupError(f"{path} is not valid JSON: {exc}") from None
