"""The benchmark's side-by-side variants: each served, timed and compared with sentence-transformers fp32."""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.serving import DOCUMENT_PREFIX, Corpus
from bench.variants import VariantResult, compare, device_variants, parse_compare, table
from server.engine.tokenization import TextTokenizer
from server.model.tokenizer import load_tokenizer

TEXTS = [f"a short document number {i} about " + "things " * (i % 5) for i in range(12)]


def test_every_cpu_variant_is_listed_most_precise_first() -> None:
    assert device_variants("cpu") == ["fp32", "bf16", "int8", "int8-token", "int8-dynamic", "nf4"]
    assert device_variants("cuda") == ["fp32", "fp16", "bf16", "int8", "nf4"]


def test_variants_are_served_side_by_side_and_a_failure_is_reported(tiny_v5: Path) -> None:
    tokenizer = TextTokenizer(*load_tokenizer(tiny_v5))
    tokens = [len(ids) + tokenizer.special_tokens for ids in tokenizer.content_ids(TEXTS, DOCUMENT_PREFIX)]
    results = compare(tiny_v5, Corpus(TEXTS, tokens), ["fp32", "int8-dynamic", "no-such-variant"], 4, {})
    fp32, dynamic, missing = results
    assert fp32.variant == "fp32" and fp32.errors == 0 and not fp32.failed
    assert fp32.min_cos > 0.99999 and fp32.tok_s > 0 and fp32.st_fp32_tok_s > 0
    assert dynamic.errors == 0 and 0.9 < dynamic.mean_cos < 1.0 and dynamic.st_same_tok_s > 0
    assert missing.failed.startswith("StartupError") and "no-such-variant" in missing.failed
    text = table(results, 4)
    assert "| fp32 |" in text and "| no-such-variant | failed: StartupError" in text


def test_a_variant_result_round_trips_through_json() -> None:
    result = VariantResult("bf16", 10.0, 5.0, 2.0, 4.0, 0.9999, 0.999, 1.5)
    assert VariantResult.from_dict(json.loads(json.dumps(result.as_dict()))) == result
    unmeasured = VariantResult("nf4", failed="StartupError: ...")
    text = json.dumps(unmeasured.as_dict(), allow_nan=False)  # None, not NaN: strict JSON
    assert VariantResult.from_dict(json.loads(text)).failed == unmeasured.failed


def test_compare_takes_keywords_in_any_case_and_names_with_spaces() -> None:
    assert parse_compare(" All ", "cpu") == device_variants("cpu")
    assert parse_compare("NONE", "cpu") == [] and parse_compare("", "cpu") == []
    assert parse_compare("fp32, bf16,,", "cpu") == ["fp32", "bf16"]


def test_without_baselines_variants_are_served_and_timed_only(tiny_v5: Path) -> None:
    (result,) = compare(tiny_v5, Corpus(TEXTS, [10] * len(TEXTS)), ["fp32"], 4, {}, baselines=False)
    assert result.tok_s > 0 and result.errors == 0 and not result.failed
    assert math.isnan(result.mean_cos) and math.isnan(result.st_fp32_tok_s)
    assert "| fp32 |" in table([result], 4) and "n/a" in table([result], 4)
