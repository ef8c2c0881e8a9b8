"""config.json read by meaning: the published revisions load, real contradictions are refused naming both keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.errors import StartupError
from server.model_spec import read_model_spec
from tests.helpers.checkpoint import SENTENCE_TRANSFORMERS_FILES, hub_config

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
