"""config.json read by meaning: the published revisions load, real contradictions are refused naming both keys."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import StartupError
from server.model.spec import read_model_spec
from tools.checkpoint import SENTENCE_TRANSFORMERS_FILES, hub_config

# The published model's sizes: these tests read configs only, no weights.
PUBLISHED = {"hidden": 768, "layers": 12, "heads": 12, "inner": 3072, "max_trained_positions": 2048}


def _write(path: Path, config: dict[str, Any], *, sentence_transformers: bool = True) -> Path:
    (path / "config.json").write_text(json.dumps(config))
    if sentence_transformers:
        for name, content in SENTENCE_TRANSFORMERS_FILES.items():
            (path / name).write_text(json.dumps(content))
    return path


@pytest.mark.parametrize("style", ["original", "v5"])
def test_published_revisions_mean_what_the_model_card_says(tmp_path: Path, style: str) -> None:
    spec = read_model_spec(_write(tmp_path, hub_config(**PUBLISHED, config_style=style)))  # type: ignore[arg-type]
    c = spec.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size) == (768, 12, 12, 3072)
    assert (c.layer_norm_eps, c.hidden_act, c.head_dim, c.vocab_size) == (1e-12, "silu", 64, 30528)
    assert c.rope_parameters["rope_theta"] == 1000.0
    assert spec.facts.max_input_tokens == 8192  # n_positions, the input limit
    assert spec.facts.trained_positions == 2048 == c.max_position_embeddings  # where dynamic NTK starts
    assert spec.rotary is not None and spec.rotary.scaling_factor == 2.0  # the model card's, over the config's null


def test_the_published_config_would_have_been_refused_by_key_equality() -> None:
    """The 2026 config puts 8192 and 2048 into the two position keys: they mean different things."""
    cfg = hub_config(**PUBLISHED, config_style="v5")  # type: ignore[arg-type]
    assert cfg["n_positions"] == 8192 and cfg["max_position_embeddings"] == 2048


CONTRADICTIONS = [
    ("hidden_size", 1024, "n_embd=768 vs hidden_size=1024"),
    ("num_hidden_layers", 6, "n_layer=12 vs num_hidden_layers=6"),
    ("num_attention_heads", 16, "n_head=12 vs num_attention_heads=16"),
    ("intermediate_size", 2048, "n_inner=3072 vs intermediate_size=2048"),
    ("layer_norm_eps", 1e-5, "layer_norm_epsilon=1e-12 vs layer_norm_eps=1e-05"),
    ("max_position_embeddings", 8192, "max_trained_positions=2048 vs max_position_embeddings=8192"),
    ("rope_parameters", {"rope_theta": 10000.0, "rope_type": "default"},
     "rotary_emb_base=1000 vs rope_parameters.rope_theta=10000.0"),
    ("head_dim", 32, "head_dim=32 vs n_embd/n_head=768/12=64"),
    ("hidden_act", "gelu", "hidden_act='gelu' is not supported"),
    ("rope_parameters", {"rope_theta": 1000.0, "rope_type": "yarn"}, "rope_type='yarn' is not supported"),
]


@pytest.mark.parametrize(("key", "value", "message"), CONTRADICTIONS, ids=[c[0] + str(i) for i, c in
                                                                             enumerate(CONTRADICTIONS)])
def test_a_real_contradiction_is_refused_naming_both_values(tmp_path: Path, key: str, value: object,
                                                            message: str) -> None:
    cfg = hub_config(**PUBLISHED, config_style="v5") | {key: value}  # type: ignore[arg-type]
    with pytest.raises(StartupError) as info:
        read_model_spec(_write(tmp_path, cfg))
    assert message in str(info.value)


def test_numbers_written_two_ways_agree(tmp_path: Path) -> None:
    cfg = hub_config(**PUBLISHED, config_style="v5") | {"rotary_emb_base": 1000.0, "layer_norm_eps": 1.0e-12}  # type: ignore[arg-type]
    assert read_model_spec(_write(tmp_path, cfg)).rotary.base == 1000.0  # type: ignore[union-attr]


@pytest.mark.parametrize("option", [("rotary_emb_scale_base", 512), ("rotary_emb_interleaved", True),
                                    ("prenorm", True), ("activation_function", "gelu")])
def test_original_options_the_server_does_not_implement_are_refused(tmp_path: Path,
                                                                    option: tuple[str, object]) -> None:
    key, value = option
    cfg = hub_config(**PUBLISHED, config_style="original") | {key: value}  # type: ignore[arg-type]
    with pytest.raises(StartupError, match=key):
        read_model_spec(_write(tmp_path, cfg))


def test_a_transformers_only_config_takes_its_input_limit_from_sentence_transformers(tmp_path: Path) -> None:
    """A config with the transformers 5 keys only: max_position_embeddings is the trained length, not a limit."""
    cfg = {k: v for k, v in hub_config(**PUBLISHED, config_style="v5").items()  # type: ignore[arg-type]
           if k not in ("n_embd", "n_layer", "n_head", "n_inner", "n_positions", "max_trained_positions",
                        "layer_norm_epsilon", "rotary_emb_base")}
    spec = read_model_spec(_write(tmp_path, cfg))
    assert (spec.facts.hidden_size, spec.facts.max_input_tokens, spec.facts.trained_positions) == (768, 8192, 2048)
    (tmp_path / "bare").mkdir()
    bare = read_model_spec(_write(tmp_path / "bare", cfg, sentence_transformers=False))
    assert (bare.facts.max_input_tokens, bare.facts.trained_positions) == (2048, 2048)  # only the trained length


def test_a_config_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(StartupError, match="not a JSON object"):
        read_model_spec(tmp_path)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
KEYS = sorted(hub_config(**PUBLISHED, config_style="v5"))  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(style=st.sampled_from(["original", "v5"]),
       changes=st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, min_size=1, max_size=3))
def test_any_corrupted_value_is_a_clean_refusal_or_a_consistent_spec(tmp_path: Path, style: str,
                                                                      changes: dict[str, object]) -> None:
    """Never a traceback: either one StartupError line, or a spec whose facts are usable numbers."""
    cfg = hub_config(**PUBLISHED, config_style=style) | changes  # type: ignore[arg-type]
    try:
        spec = read_model_spec(_write(tmp_path, cfg))
    except StartupError as exc:
        assert "\n" not in str(exc)
        return
    assert spec.facts.hidden_size > 0 and spec.facts.num_layers > 0 and spec.facts.max_input_tokens > 0
    assert spec.rotary is not None and spec.rotary.base > 0 and spec.facts.trained_positions > 0


def _without_original_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in ("n_embd", "n_layer", "n_head", "n_inner", "n_positions",
                                                       "max_trained_positions", "layer_norm_epsilon",
                                                       "rotary_emb_base")}


def test_a_transformers_only_config_keeps_its_own_trained_length(tmp_path: Path) -> None:
    cfg = _without_original_keys(hub_config(**PUBLISHED | {"max_trained_positions": 16}))  # type: ignore[arg-type]
    assert read_model_spec(_write(tmp_path, cfg)).facts.trained_positions == 16


def _pooled(tmp_path: Path, pooling: dict[str, Any], modules: list[dict[str, Any]] | None = None) -> Path:
    path = _write(tmp_path, hub_config(**PUBLISHED))  # type: ignore[arg-type]
    if modules is not None:
        (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return path


# What sentence-transformers 6 writes (`pooling_mode`), and the legacy switches older versions wrote.
@pytest.mark.parametrize("pooling", [{"embedding_dimension": 768, "pooling_mode": "mean", "include_prompt": True},
                                     {"word_embedding_dimension": 768, "pooling_mode_mean_tokens": True},
                                     {"pooling_mode": ["mean"]}, {}])
def test_mean_pooling_in_either_format_is_read(tmp_path: Path, pooling: dict[str, Any]) -> None:
    assert read_model_spec(_pooled(tmp_path, pooling)).facts.pooling == "mean"


@pytest.mark.parametrize(("pooling", "message"), [
    ({"embedding_dimension": 768, "pooling_mode": "cls", "include_prompt": True}, "nomic models pool by mean"),
    ({"pooling_mode": "max"}, "pooling 'max' is not supported"),
    ({"pooling_mode": ["mean", "max"]}, "is not supported"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, "is not supported"),
    ({"pooling_mode": "mean", "include_prompt": False}, "include_prompt false"),
    ({"embedding_dimension": 384, "pooling_mode": "mean"}, "384 wide, the model 768"),
])
def test_pooling_the_server_would_not_reproduce_is_refused(tmp_path: Path, pooling: dict[str, Any],
                                                           message: str) -> None:
    with pytest.raises(StartupError, match=message):
        read_model_spec(_pooled(tmp_path, pooling))


def test_a_module_after_the_pooling_is_refused_not_skipped(tmp_path: Path) -> None:
    modules = [*SENTENCE_TRANSFORMERS_FILES["modules.json"],
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    with pytest.raises(StartupError, match="Dense"):
        read_model_spec(_pooled(tmp_path, {"pooling_mode": "mean"}, modules))


@pytest.mark.parametrize("limit", [-1, 0, True, 100.7, "512"])
def test_a_sentence_transformers_limit_that_is_not_a_positive_integer_is_refused(tmp_path: Path,
                                                                                 limit: object) -> None:
    path = _write(tmp_path, hub_config(**PUBLISHED))  # type: ignore[arg-type]
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": limit}))
    with pytest.raises(StartupError, match="max_seq_length"):
        read_model_spec(path)


def test_a_legacy_rope_theta_that_contradicts_the_rotary_base_is_refused(tmp_path: Path) -> None:
    cfg = hub_config(**PUBLISHED) | {"rope_theta": 10000.0}  # type: ignore[arg-type]
    with pytest.raises(StartupError, match=r"rotary_emb_base=1000 vs rope_theta=10000\.0"):
        read_model_spec(_write(tmp_path, cfg))


@pytest.mark.parametrize(("changes", "message"), [
    ({"rotary_emb_base": True}, "rotary_emb_base=True is not a number"),  # float(True) served base 1.0
    ({"rotary_emb_base": "1000"}, "rotary_emb_base='1000' is not a number"),
    ({"rotary_emb_base": None, "rope_theta": "1000"}, "rope_theta='1000' is not a number"),
    ({"rotary_emb_base": None, "rope_parameters": None, "rope_theta": 0},
     "rotary base 0.0 and trained length 2048 must be positive"),
    ({"rotary_emb_base": None, "rope_theta": 0}, "rope_parameters.rope_theta=1000.0 vs rope_theta=0"),
])
def test_a_rotary_base_that_is_not_a_positive_number_is_refused(tmp_path: Path, changes: dict[str, object],
                                                                message: str) -> None:
    cfg = {k: v for k, v in (hub_config(**PUBLISHED) | changes).items() if v is not None}  # type: ignore[arg-type]
    with pytest.raises(StartupError) as info:
        read_model_spec(_write(tmp_path, cfg))
    assert message in str(info.value)


@pytest.mark.parametrize(("key", "default"), [("rotary_emb_fraction", "0.0"), ("activation_function", "'gelu_new'"),
                                              ("qkv_proj_bias", "True"), ("mlp_fc2_bias", "True")])
def test_a_setting_left_out_of_a_remote_code_config_means_the_original_codes_default(tmp_path: Path, key: str,
                                                                                     default: str) -> None:
    # The 2024 revisions load through the original code (auto_map), whose defaults for these are not what the
    # server runs: no rotary positions, GPT-2's activation, biases.
    cfg = {k: v for k, v in hub_config(**PUBLISHED, config_style="original").items() if k != key}  # type: ignore[arg-type]
    with pytest.raises(StartupError, match=rf"config.json has no {key}: the original code its auto_map names "
                                           rf"takes {re.escape(default)} for it, which is not supported"):
        read_model_spec(_write(tmp_path, cfg))
    v5 = {k: v for k, v in hub_config(**PUBLISHED, config_style="v5").items() if k != key}  # type: ignore[arg-type]
    read_model_spec(_write(tmp_path, v5))  # transformers' own nomic_bert: its defaults are the supported ones


def test_a_rotary_base_left_out_is_refused_where_the_code_that_reads_the_config_changed_its_default(
        tmp_path: Path) -> None:
    # configuration_hf_nomic_bert.NomicBertConfig, as published over time, defaults rotary_emb_base to 1000 in
    # some versions and to 10_000 in others: a config naming that code without a base means either.
    original = {k: v for k, v in hub_config(**PUBLISHED, config_style="original").items()  # type: ignore[arg-type]
                if k != "rotary_emb_base"}
    for theta in ({}, {"rope_theta": 1000.0}):  # which that code does not read
        with pytest.raises(StartupError, match=r"config.json has no rotary_emb_base: the original code its "
                                               r"auto_map names takes 1000 in some published versions and 10000"):
            read_model_spec(_write(tmp_path, original | theta))
    v5 = {k: v for k, v in hub_config(**PUBLISHED, config_style="v5").items()  # type: ignore[arg-type]
          if k not in ("rotary_emb_base", "rope_parameters")}
    spec = read_model_spec(_write(tmp_path, v5))
    assert spec.rotary is not None and spec.rotary.base == 1000.0  # transformers' nomic_bert's default


def test_a_layer_norm_epsilon_left_out_is_the_default_of_the_code_that_reads_the_config(tmp_path: Path) -> None:
    # The original NomicBertConfig subclasses GPT2Config, whose layer_norm_epsilon defaults to 1e-5;
    # transformers' nomic_bert takes 1e-12.
    original = {k: v for k, v in hub_config(**PUBLISHED, config_style="original").items()  # type: ignore[arg-type]
                if k != "layer_norm_epsilon"}
    assert read_model_spec(_write(tmp_path, original)).config.layer_norm_eps == 1e-5
    assert read_model_spec(_write(tmp_path, original | {"layer_norm_eps": 1e-5})).config.layer_norm_eps == 1e-5
    with pytest.raises(StartupError, match=r"no layer_norm_epsilon: the original code its auto_map names takes "
                                           r"1e-05 for it, transformers' nomic_bert reads layer_norm_eps=1e-12"):
        read_model_spec(_write(tmp_path, original | {"layer_norm_eps": 1e-12}))
    v5 = {k: v for k, v in hub_config(**PUBLISHED, config_style="v5").items()  # type: ignore[arg-type]
          if k not in ("layer_norm_epsilon", "layer_norm_eps")}
    assert read_model_spec(_write(tmp_path, v5)).config.layer_norm_eps == 1e-12
