"""Served embeddings equal an independent plain-torch reference of the original architecture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client import Task
from client.embed_client import LongTextMode
from tests.conftest import TINY
from tools.reference import ReferenceNomic
from tools.servers import RunningServer, running_server

TOL = 1e-5
SHORT = "The cat sat on the mat."
# Far beyond the tiny model's 16 trained positions, so dynamic NTK scaling applies (about 60 tokens).
LONG = ("Rotary position embeddings are stretched beyond the trained length by raising the base "
        "so that long documents stay in the range the model has seen during training, "
        "which matters for retrieval over whole pages of text.")
PREFIXES = {Task.SEARCH_DOCUMENT: "search_document", Task.SEARCH_QUERY: "search_query",
            Task.CLUSTERING: "clustering", Task.CLASSIFICATION: "classification"}


@pytest.fixture(scope="module", params=["original", "v5"])
def served(request: pytest.FixtureRequest) -> Iterator[tuple[RunningServer, ReferenceNomic]]:
    path: Path = request.getfixturevalue(f"tiny_{request.param}")
    with running_server(str(path)) as srv:
        yield srv, ReferenceNomic(path, rotary_scaling_factor=2.0)


@pytest.mark.parametrize("task", list(PREFIXES))
@pytest.mark.parametrize("dimensions", [0, 64, 100, TINY["hidden"]])
def test_tasks_and_dimensions_match_reference(served: tuple[RunningServer, ReferenceNomic], task: Task,
                                              dimensions: int) -> None:
    srv, ref = served
    with srv.client() as client:
        got = client.embed([SHORT, LONG], task, dimensions)
    want = np.stack([ref.embed(t, prefix=PREFIXES[task], dimensions=dimensions or None) for t in (SHORT, LONG)])
    assert len(ref.token_ids(f"{PREFIXES[task]}: {LONG}")) > 2 * TINY["max_trained_positions"]
    assert got.shape == want.shape
    diff = np.abs(got - want).max()
    print(f"max|diff| {task.name} dims={dimensions}: {diff:.2e}")
    assert diff <= TOL


def test_raw_task_sends_text_as_is(served: tuple[RunningServer, ReferenceNomic]) -> None:
    srv, ref = served
    with srv.client() as client:
        got = client.embed(["search_query: " + SHORT], Task.RAW)[0]
    assert np.abs(got - ref.embed(SHORT, prefix="search_query")).max() <= TOL


def test_scaling_changes_long_inputs_only(tiny_original: Path, served: tuple[RunningServer, ReferenceNomic]) -> None:
    """The reference without scaling differs on long inputs: the test above really checks the scaling."""
    unscaled = ReferenceNomic(tiny_original, rotary_scaling_factor=None)
    scaled = ReferenceNomic(tiny_original, rotary_scaling_factor=2.0)
    assert np.abs(unscaled.embed(LONG, prefix="clustering") - scaled.embed(LONG, prefix="clustering")).max() > 1e-3
    assert np.abs(unscaled.embed(SHORT, prefix="clustering") - scaled.embed(SHORT, prefix="clustering")).max() < 1e-12


def test_truncation_matches_reference_of_first_tokens(served: tuple[RunningServer, ReferenceNomic]) -> None:
    srv, ref = served
    limit = 24
    with srv.client() as client:
        response = client.embed_response([LONG], Task.SEARCH_DOCUMENT, max_tokens=limit)
    ids = ref.token_ids(f"search_document: {LONG}")
    want = ref.finish(ref.pooled_ids([*ids[: limit - 1], ids[-1]]))
    got = np.array(response.embeddings[0].values)
    assert response.embeddings[0].truncated and response.embeddings[0].tokens == limit
    assert np.abs(got - want).max() <= TOL


def test_mean_mode_averages_prefixed_windows(served: tuple[RunningServer, ReferenceNomic]) -> None:
    srv, ref = served
    limit = 20
    with srv.client() as client:
        response = client.embed_response([LONG], Task.SEARCH_QUERY, 80, long_text_mode=LongTextMode.MEAN,
                                         max_tokens=limit)
    ids = ref.token_ids(f"search_query: {LONG}")
    cls, body, sep = ids[0], ids[1:-1], ids[-1]
    prefix_len = len(ref.token_ids("search_query: ")) - 2
    prefix, text = body[:prefix_len], body[prefix_len:]
    step = limit - 2 - prefix_len
    windows = [[cls, *prefix, *text[i : i + step], sep] for i in range(0, len(text), step)]
    pooled = np.stack([ref.pooled_ids(w) for w in windows])
    weights = np.array([len(w) for w in windows], dtype=np.float64)
    want = ref.finish((pooled * weights[:, None]).sum(0) / weights.sum(), 80)
    e = response.embeddings[0]
    assert e.windows == len(windows) > 2 and e.tokens == int(weights.sum()) and not e.truncated
    assert np.abs(np.array(e.values) - want).max() <= TOL
