"""What a checkpoint directory holds: its architecture (translated for transformers), pooling and limits."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from server.domain import BERT_UNCASED_PROBE, ModelFacts, TokenizerProbe
from server.errors import StartupError
from server.model.fingerprint import READ_FILES
from server.model.source import require_regular_file

log = logging.getLogger(__name__)

# Original nomic_bert config keys -> transformers 5 NomicBertConfig keys of the same meaning. transformers
# reads only the latter and silently keeps its defaults (a 768-wide, 12-layer model) when they are absent.
# The published config carries both sets since its 2026 revision, older revisions the original keys only.
# `n_positions` has no counterpart: it is the input limit (8192), where transformers' `max_position_embeddings`
# is the trained length (2048), the original `max_trained_positions`.
_SAME_MEANING = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_inner": "intermediate_size",
    "layer_norm_epsilon": "layer_norm_eps",
    "max_trained_positions": "max_position_embeddings",
}
# Original options this server implements only in one setting (None: the option is off).
_NOMIC_REQUIRED: dict[str, object] = {
    "activation_function": "swiglu",
    "prenorm": False,
    "rotary_emb_fraction": 1.0,
    "rotary_emb_interleaved": False,
    "rotary_emb_scale_base": None,
    "qkv_proj_bias": False,
    "mlp_fc1_bias": False,
    "mlp_fc2_bias": False,
    "causal": False,
    "parallel_block": False,
    "use_rms_norm": False,
}
# The transformers 5 spelling of the same settings.
_V5_REQUIRED: dict[str, object] = {"hidden_act": "silu"}
# What the original remote code (configuration_hf_nomic_bert.NomicBertConfig, which a config's auto_map names)
# takes for a setting its config leaves out, where that is not what the server runs: no rotary positions, GPT-2's
# activation, biases (refused). transformers' own nomic_bert takes the supported values instead.
_ORIGINAL_DEFAULTS: dict[str, object] = {"activation_function": "gelu_new", "rotary_emb_fraction": 0.0,
                                         "qkv_proj_bias": True, "mlp_fc1_bias": True, "mlp_fc2_bias": True}
# The original code's own default base differs between its published versions (1000 in some, 10_000 in others), so a
# config that names that code and leaves the base out means whichever version loads: refused, not guessed.
_ORIGINAL_ROTARY_BASES = "1000 in some published versions and 10000 in others"
_ORIGINAL_EPSILON = 1e-5  # GPT-2's, which the original config inherits (transformers' nomic_bert takes 1e-12)
_ROPE_TYPES = ("default", "dynamic")  # our per-row rotary replaces either (dynamic NTK, factor from --rotary-...)
DEFAULT_TRAINED_POSITIONS = 2048  # nomic-bert-2048: the trained length when a config names none


@dataclass(frozen=True)
class RotarySpec:
    """Rotary embedding of a nomic model, with dynamic NTK scaling beyond the trained positions."""

    base: float
    head_dim: int
    max_trained_positions: int
    scaling_factor: float  # 0 = no scaling


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint read for loading: its facts, plus what only the model layer needs (path, config, rotary)."""

    path: Path
    config: PretrainedConfig  # complete for transformers: original keys already translated
    rotary: RotarySpec | None  # set for nomic models: the server computes rotary per row
    facts: ModelFacts

    @property
    def tokenizer_probe(self) -> TokenizerProbe | None:
        """What the model's own vocabulary makes of a known text, where the model fixes its vocabulary."""
        return BERT_UNCASED_PROBE if self.facts.nomic else None


def read_model_spec(path: Path, rotary_scaling_factor: float = 2.0, revision: str = "",
                    model_id: str = "") -> ModelSpec:
    """Read and check `path`'s configs. `rotary_scaling_factor` overrides the checkpoint's (often null);
    `model_id` (default: the path) and `revision` say where the files came from."""
    try:
        return _read_model_spec(path, rotary_scaling_factor, revision, model_id or str(path))
    except (TypeError, ValueError, AttributeError, KeyError) as exc:  # a value of the wrong type or shape
        raise StartupError(f"the configs in {path} do not make sense: {type(exc).__name__}: {_one_line(exc)}") from None


def _read_model_spec(path: Path, rotary_scaling_factor: float, revision: str, model_id: str) -> ModelSpec:
    for name in READ_FILES:  # as the weights: a dangling link (a download cut short) must not read as absent
        require_regular_file(path / name)
    raw = _read_json(path / "config.json")
    if not isinstance(raw, dict):
        raise StartupError(f"{path / 'config.json'} is missing or not a JSON object")
    model_type = raw.get("model_type")
    is_nomic = model_type == "nomic_bert"
    if is_nomic:
        overrides, rotary = _translate_nomic(raw, rotary_scaling_factor)
    else:
        overrides, rotary = {}, None
    try:
        config = AutoConfig.from_pretrained(path, **overrides)
    except Exception as exc:
        raise StartupError(f"cannot read the model config in {path}: {_one_line(exc)}") from None
    pooling = _pooling_mode(path, int(config.hidden_size), is_nomic)
    if not is_nomic:
        _refuse_default_prompt(path)
    if is_nomic and pooling != "mean":
        raise StartupError(f"nomic models pool by mean; {path} asks for {pooling!r}")
    facts = ModelFacts(
        model_id=model_id,
        revision=revision,
        hidden_size=int(config.hidden_size),
        num_layers=int(config.num_hidden_layers),
        max_input_tokens=_max_input_tokens(path, config, raw, rotary),
        trained_positions=rotary.max_trained_positions if rotary else 0,
        pooling=pooling,
        nomic=is_nomic,
    )
    return ModelSpec(path=path, config=config, rotary=rotary, facts=facts)


def _translate_nomic(raw: dict[str, Any], scaling_factor: float) -> tuple[dict[str, Any], RotarySpec]:
    """transformers 5 settings of a nomic config, compared by meaning where both key sets are present."""
    remote = "configuration_hf_nomic_bert" in str((raw.get("auto_map") or {}).get("AutoConfig", ""))
    for key, default in _ORIGINAL_DEFAULTS.items() if remote else ():
        if key not in raw and not (key == "activation_function" and "hidden_act" in raw):
            raise StartupError(f"config.json has no {key}: the original code its auto_map names takes {default!r} "
                               f"for it, which is not supported (only {_NOMIC_REQUIRED[key]!r})")
    for key, wanted in {**_NOMIC_REQUIRED, **_V5_REQUIRED}.items():
        value = raw.get(key)
        if key in raw and value != wanted and not (wanted is False and value is None):
            raise StartupError(f"config.json: {key}={value!r} is not supported (only {wanted!r})")
    overrides: dict[str, Any] = {}
    conflicts = []
    for original, v5 in _SAME_MEANING.items():
        if raw.get(original) is None:
            continue
        overrides[v5] = raw[original]
        if raw.get(v5) is not None and not _same(raw[original], raw[v5]):
            conflicts.append(f"{original}={raw[original]!r} vs {v5}={raw[v5]!r}")
    if remote and raw.get("layer_norm_epsilon") is None:  # that code reads this key only
        if raw.get("layer_norm_eps") is not None and not _same(raw["layer_norm_eps"], _ORIGINAL_EPSILON):
            raise StartupError(f"config.json has no layer_norm_epsilon: the original code its auto_map names takes "
                               f"{_ORIGINAL_EPSILON} for it, transformers' nomic_bert reads layer_norm_eps="
                               f"{raw['layer_norm_eps']!r}; set layer_norm_epsilon")
        overrides["layer_norm_eps"] = _ORIGINAL_EPSILON
    if raw.get("n_embd") is not None and raw.get("n_inner") is None and raw.get("intermediate_size") is None:
        overrides["intermediate_size"] = 4 * int(raw["n_embd"])  # the original GPT-2 style default
    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise StartupError(f"config.json: rope_parameters={rope!r} is not an object")
    if rope.get("rope_type", "default") not in _ROPE_TYPES:
        raise StartupError(f"config.json: rope_parameters.rope_type={rope['rope_type']!r} is not supported "
                           f"(only {' or '.join(_ROPE_TYPES)})")
    bases = {key: value for key, value in {"rotary_emb_base": raw.get("rotary_emb_base"),
                                            "rope_parameters.rope_theta": rope.get("rope_theta"),
                                            "rope_theta": raw.get("rope_theta")}.items() if value is not None}
    for key, value in bases.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise StartupError(f"config.json: {key}={value!r} is not a number")  # float(True) would be 1.0
    if remote and "rotary_emb_base" not in bases:  # that code reads this key only
        raise StartupError("config.json has no rotary_emb_base: the original code its auto_map names takes "
                           f"{_ORIGINAL_ROTARY_BASES}; set it (nomic-embed-text-v1.5 publishes 1000)")
    (first, given), *others = bases.items() or [("", 1000.0)]
    conflicts += [f"{first}={given!r} vs {key}={value!r}" for key, value in others if not _same(given, value)]
    base = float(given)  # 0 included: refused below, never replaced by the default
    own = raw.get("rotary_scaling_factor") or rope.get("factor")
    if own is not None and not _same(own, scaling_factor):
        log.warning("config.json asks for rotary scaling factor %r; serving with --rotary-scaling-factor %g",
                    own, scaling_factor)
    if conflicts:
        raise StartupError("config.json disagrees with itself: " + "; ".join(conflicts))
    _check_sizes(raw, overrides)
    hidden = int(overrides.get("hidden_size", raw.get("hidden_size", 768)))
    heads = int(overrides.get("num_attention_heads", raw.get("num_attention_heads", 12)))
    if heads <= 0 or hidden % heads or (hidden // heads) % 2:
        raise StartupError(f"config.json: a width of {hidden} does not split into {heads} heads of even size")
    if raw.get("head_dim") is not None and int(raw["head_dim"]) != hidden // heads:
        raise StartupError(f"config.json disagrees with itself: head_dim={raw['head_dim']!r} vs "
                           f"n_embd/n_head={hidden}/{heads}={hidden // heads}")
    trained = int(overrides.get("max_position_embeddings") or raw.get("max_position_embeddings")
                  or DEFAULT_TRAINED_POSITIONS)
    if not (math.isfinite(base) and base > 0) or trained <= 0:
        raise StartupError(f"config.json: rotary base {base!r} and trained length {trained!r} must be positive")
    overrides |= {
        "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": base},
        "max_position_embeddings": trained,
        "head_dim": hidden // heads,  # derived at construction, so it must be passed too
    }
    rotary = RotarySpec(base=base, head_dim=hidden // heads, max_trained_positions=trained,
                        scaling_factor=scaling_factor)
    _check_scaled_base(rotary, int(raw.get("n_positions") or trained))
    return overrides, rotary


def _check_scaled_base(rotary: RotarySpec, longest: int) -> None:
    """The NTK-scaled base at the longest input must stay a finite float32, or every rotation vanishes."""
    f, d = rotary.scaling_factor, rotary.head_dim
    if not f or longest <= rotary.max_trained_positions:
        return
    try:
        scaled = rotary.base * ((f * longest / rotary.max_trained_positions) - (f - 1)) ** (d / (d - 2))
    except OverflowError:
        scaled = math.inf
    if not scaled < 3.4e38:  # float32's largest, where the rotary angles are computed
        raise StartupError(f"--rotary-scaling-factor {f:g} makes the rotary base {scaled:.3g} at {longest} tokens, "
                           "beyond float32: every position would look alike. Use a factor near 2 (the model card's)")


_POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "vocab_size", "type_vocab_size", "n_positions")


def _check_sizes(raw: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Sizes must be positive integers and the epsilon a positive number, in whichever key set named them."""
    original = {v5: orig for orig, v5 in _SAME_MEANING.items()}
    for key in _POSITIVE_INTS:
        named = original[key] if key in overrides and key in original else key  # as the config spells it
        value = overrides.get(key, raw.get(key))
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
            raise StartupError(f"config.json: {named}={value!r} is not a positive integer")
    eps = overrides.get("layer_norm_eps", raw.get("layer_norm_eps"))
    if eps is not None and not (isinstance(eps, int | float) and not isinstance(eps, bool)
                                and math.isfinite(eps) and 0 < eps < 1):
        raise StartupError(f"config.json: layer norm epsilon {eps!r} is not a small positive number")


def _same(a: object, b: object) -> bool:
    """Equal as numbers where both are numbers (1000 and 1000.0, 1e-12 written two ways), else equal."""
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


# sentence-transformers modules the server reproduces: the encoder, its pooling, and L2 normalization (which
# every answer gets). Anything else (Dense, LayerNorm, ...) would change the vector: refused, never skipped.
_MODULES = ("Transformer", "Pooling", "Normalize")
# sentence-transformers' legacy pooling switches, as its Pooling module maps them to `pooling_mode`.
_LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def _pooling_mode(path: Path, hidden: int, is_nomic: bool) -> str:
    """The sentence-transformers pooling of the checkpoint (either config format); mean where it names none.

    A Pooling module named in modules.json without its config (a download cut short) is refused, as
    sentence-transformers refuses it, unless the model is a nomic one, whose pooling is mean whatever it says."""
    modules = _read_json(path / "modules.json") or []
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise StartupError(f"{path / 'modules.json'} is not a list of modules")
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in _MODULES:
            raise StartupError(f"{path / 'modules.json'}: module {module.get('type')!r} is not supported (only "
                               f"{', '.join(_MODULES)}): serving without it would give other vectors")
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            folder = str(module.get("path") or "").strip("/")
            if folder in ("", ".") or Path(folder).is_absolute() or ".." in Path(folder).parts:
                # The model's own config.json would be read as the pooling's; sentence-transformers refuses it.
                if is_nomic:
                    return "mean"
                raise StartupError(f"{path / 'modules.json'}: the Pooling module's path {module.get('path')!r} "
                                   "is not a folder of the checkpoint: its pooling (mean or CLS) cannot be known")
            where = path / folder / "config.json"
            pooling = _read_json(where)
            if pooling is None and is_nomic:
                return "mean"
            if pooling is None:
                raise StartupError(f"{where} is missing, while {path / 'modules.json'} names a Pooling module at "
                                   f"{module.get('path')!r}: its pooling (mean or CLS) cannot be known")
            if not isinstance(pooling, dict):
                raise StartupError(f"{where} is not a JSON object")
            mode = pooling.get("pooling_mode")
            if mode is None:
                modes = [m for key, m in _LEGACY_POOLING.items() if pooling.get(key)]
                mode = modes[0] if len(modes) == 1 else modes or "mean"
            if isinstance(mode, list) and len(mode) == 1:
                mode = mode[0]
            if mode not in ("mean", "cls"):
                raise StartupError(f"{where}: pooling {mode!r} is not supported (mean or cls only)")
            if pooling.get("include_prompt") is False:
                raise StartupError(f"{where}: include_prompt false (prompt tokens left out of the pooling) is not "
                                   "supported")
            width = pooling.get("embedding_dimension", pooling.get("word_embedding_dimension"))
            if width is not None and width != hidden:
                raise StartupError(f"{where}: the pooling is {width!r} wide, the model {hidden}")
            return str(mode)
    return "mean"


def _refuse_default_prompt(path: Path) -> None:
    """A default prompt, which sentence-transformers puts before every text, is refused: the server prefixes only
    a nomic model's texts (by task), so it would serve the vectors of the texts without it."""
    where = path / "config_sentence_transformers.json"
    settings = _read_json(where)
    if not isinstance(settings, dict) or settings.get("default_prompt_name") is None:
        return
    name = settings["default_prompt_name"]
    prompts = settings.get("prompts")
    prompt = prompts.get(name) if isinstance(prompts, dict) and isinstance(name, str) else None
    shown = f" ({prompt!r})" if isinstance(prompt, str) else ""
    raise StartupError(f"{where}: default_prompt_name {name!r}{shown} puts a prompt before every text, which this "
                       "server does not (it prefixes only nomic models' texts, by task): remove the setting, and "
                       "send texts that carry the prompt themselves")


def _max_input_tokens(path: Path, config: PretrainedConfig, raw: dict[str, Any], rotary: RotarySpec | None) -> int:
    st = _read_json(path / "sentence_bert_config.json") or {}
    st_limit = st.get("max_seq_length")
    if st_limit is not None and not (isinstance(st_limit, int) and not isinstance(st_limit, bool) and st_limit > 0):
        raise StartupError(f"{path / 'sentence_bert_config.json'}: max_seq_length={st_limit!r} is not a positive "
                           "integer")
    if rotary is not None:
        # Rotary positions have no table to run out of: the input limit is n_positions (8192 for
        # nomic-embed-text-v1.5), or sentence-transformers' max_seq_length where a config has no n_positions.
        limit = int(raw.get("n_positions") or st_limit or rotary.max_trained_positions)
    else:
        limit = int(getattr(config, "max_position_embeddings", 512))  # a learned position table
    if limit <= 0:
        raise StartupError(f"{path}: the input limit must be positive, the config says {limit}")
    return min(limit, st_limit) if st_limit else limit


def _read_json(path: Path) -> Any:
    if path.is_dir():
        raise StartupError(f"{path} is a directory, not a JSON file")
    require_regular_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except OSError as exc:  # e.g. a folder in its path that is a file, a link loop, no permission
        raise StartupError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # not UTF-8, or not JSON
        raise StartupError(f"{path} is not valid JSON: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
