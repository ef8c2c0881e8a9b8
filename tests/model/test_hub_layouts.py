"""Both published revisions of nomic-embed-text-v1.5, in every layout users keep, serve the reference embeddings.

The checkpoints carry the hub's config.json key by key (tools/checkpoint.py: the 2024 revision with the
original keys only, the 2026 one with both key sets), the sentence-transformers and tokenizer files as published,
and the real trained length of 2048 positions, so that a ~3,000-token document is embedded with dynamic NTK
scaling (factor 2). Only the widths are small.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest

from client import Task
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from tools.checkpoint import write_tiny_nomic
from tools.hub_layouts import (
    REPO_ID,
    fake_commit,
    write_hf_cache,
    write_local_dir,
    write_sentence_transformers_save,
)
from tools.reference import ReferenceNomic
from tools.servers import running_server

SIZES = {"hidden": 128, "layers": 2, "heads": 4, "inner": 256}
TRAINED = 2048  # max_trained_positions / max_position_embeddings as published
REVISIONS = ("original", "v5")  # the 2024 and the 2026 revision of config.json
COMMITS = {"original": fake_commit("nomic-embed-text-v1.5 2024"), "v5": fake_commit("nomic-embed-text-v1.5 2026")}
TAG_2024 = "v1.5-2024"  # a tag naming the older revision in refs/
TOL = 1e-5
SHORT = "The cat sat on the mat."
WORDS = ("retrieval", "over", "whole", "pages", "of", "text", "needs", "long", "context", "windows")
LONG = " ".join(WORDS[i % len(WORDS)] + str(i // len(WORDS)) for i in range(1400))  # ~3,200 tokens
TASKS = {Task.SEARCH_DOCUMENT: "search_document", Task.SEARCH_QUERY: "search_query",
         Task.CLUSTERING: "clustering", Task.CLASSIFICATION: "classification"}


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each revision's files as published; the same weights in both, as on the hub."""
    root = tmp_path_factory.mktemp("published")
    return {rev: write_tiny_nomic(root / rev, config_style=rev, max_trained_positions=TRAINED, seed=3, **SIZES)
            for rev in REVISIONS}


@pytest.fixture(scope="module")
def hf_home(published: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache holding both revisions: main -> 2026, tag v1.5-2024 -> 2024."""
    home = tmp_path_factory.mktemp("hf-home")
    write_hf_cache(home, published["original"], commit=COMMITS["original"], refs={TAG_2024: COMMITS["original"]})
    write_hf_cache(home, published["v5"], commit=COMMITS["v5"], refs={"main": COMMITS["v5"]})
    return home


@functools.cache
def _want(path: Path, text: str, prefix: str, dimensions: int | None) -> np.ndarray:
    return ReferenceNomic(path, rotary_scaling_factor=2.0).embed(text, prefix=prefix, dimensions=dimensions)


# (layout, revision) -> (--model, --revision, the revision Info must report)
CASES = [
    ("directory", "original"), ("directory", "v5"),
    ("hf-cache", "original"), ("hf-cache", "v5"), ("hf-cache-offline", "original"), ("hf-cache-offline", "v5"),
    ("local-dir", "original"), ("local-dir", "v5"),
    # sentence-transformers loads the 2024 revision only through its remote code, which needs the hub.
    ("st-save", "v5"),
]


@pytest.fixture(params=CASES, ids=[f"{layout}-{rev}" for layout, rev in CASES])
def served_case(request: pytest.FixtureRequest, published: dict[str, Path], hf_home: Path,
                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str, str]]:
    layout, rev = request.param
    source = published[rev]
    if layout == "directory":
        yield str(source), "", ""
    elif layout.startswith("hf-cache"):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_home / "hub"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", layout.endswith("offline"))
        # The 2026 revision by default (refs/main), the 2024 one by its tag, then by its commit.
        asked = "" if rev == "v5" else (TAG_2024 if layout == "hf-cache" else COMMITS["original"])
        yield REPO_ID, asked, COMMITS[rev]
    elif layout == "local-dir":
        yield str(write_local_dir(tmp_path / "local", source, commit=COMMITS[rev])), "", COMMITS[rev]
    else:
        yield str(write_sentence_transformers_save(tmp_path / "st", source)), "", ""


def test_layout_and_revision_serve_the_reference(served_case: tuple[str, str, str],
                                                 published: dict[str, Path]) -> None:
    model, revision, reported = served_case
    reference = published["original"]  # the reference reads the original keys; the weights are the same
    with running_server(model, revision=revision or None) as srv:
        info = embed_pb2_grpc.EmbedServiceStub(srv.channel()).Info(pb.InfoRequest(), timeout=30)
        assert (info.max_input_tokens, info.trained_positions, info.revision) == (8192, TRAINED, reported)
        worst = 0.0
        with srv.client() as client:
            for task, prefix in TASKS.items():
                for dims in (64, SIZES["hidden"]):
                    got = client.embed([SHORT], task, dims)[0]
                    worst = max(worst, float(np.abs(got - _want(reference, SHORT, prefix, dims)).max()))
            response = client.embed_response([LONG], Task.SEARCH_DOCUMENT)
    e = response.embeddings[0]
    assert 2 * TRAINED > e.tokens > TRAINED + 512 and not e.truncated
    long_diff = float(np.abs(np.array(e.values) - _want(reference, LONG, "search_document", None)).max())
    print(f"{model} {revision}: max|diff| short {worst:.2e}, {e.tokens}-token document {long_diff:.2e}")
    assert worst <= TOL and long_diff <= TOL


def test_the_long_document_is_really_scaled(published: dict[str, Path]) -> None:
    """Without NTK scaling the reference differs: the test above checks the scaling, not just the weights."""
    unscaled = ReferenceNomic(published["original"], rotary_scaling_factor=None)
    scaled = _want(published["original"], LONG, "search_document", None)
    assert np.abs(unscaled.embed(LONG, prefix="search_document") - scaled).max() > 1e-3
