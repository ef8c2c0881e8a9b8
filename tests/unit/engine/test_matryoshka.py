"""The finishing steps, against the model card's recipe written out in torch (F.layer_norm, F.normalize)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from server.engine.matryoshka import Finish, finish, finish_batch, finish_rows


def _card(pooled: np.ndarray, dimensions: int, layer_norm: bool) -> np.ndarray:
    """The model card: layer_norm over the full width (no affine), truncate, L2-normalize."""
    v = torch.from_numpy(pooled).double()
    if layer_norm:
        v = F.layer_norm(v, normalized_shape=(v.shape[1],))
    return F.normalize(v[:, :dimensions], p=2, dim=1).float().numpy()


@pytest.fixture
def pooled() -> np.ndarray:
    return np.random.default_rng(7).normal(0.3, 2.0, size=(9, 96)).astype(np.float32)


@pytest.mark.parametrize("layer_norm", [True, False])
@pytest.mark.parametrize("dimensions", [96, 64, 16])
def test_rows_follow_the_model_card(pooled: np.ndarray, dimensions: int, layer_norm: bool) -> None:
    got = finish_rows(pooled, dimensions, layer_norm=layer_norm)
    assert got.dtype == np.float32 and got.shape == (9, dimensions)
    np.testing.assert_allclose(got, _card(pooled, dimensions, layer_norm), rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_one_vector_is_finished_as_a_row_of_a_batch(pooled: np.ndarray) -> None:
    batch = finish_rows(pooled, 32, layer_norm=True)
    for i, row in enumerate(pooled):
        np.testing.assert_array_equal(finish(row, 32, layer_norm=True), batch[i])


def test_a_batch_of_several_requests_finishes_each_row_as_its_request_asks(pooled: np.ndarray) -> None:
    a, b = Finish(64, True), Finish(16, True)
    finishes = [a, b, None, a, b, b, None, a, a]
    got = finish_batch(pooled, finishes)
    for i, spec in enumerate(finishes):
        if spec is None:  # a window of a longer text: averaged with its others on the event loop
            np.testing.assert_array_equal(got[i], pooled[i])
        else:
            np.testing.assert_allclose(got[i], _card(pooled[i : i + 1], spec.dimensions, spec.layer_norm)[0],
                                       rtol=0, atol=1e-7)


def test_a_batch_finishes_the_same_whoever_shares_it(pooled: np.ndarray) -> None:
    alone = np.stack(finish_batch(pooled, [Finish(64, True)] * len(pooled)))
    mixed = finish_batch(pooled, [Finish(64, True)] * 4 + [Finish(8, False)] + [Finish(64, True)] * 4)
    for i in (0, 1, 2, 3, 5, 6, 7, 8):
        np.testing.assert_array_equal(mixed[i], alone[i])


def test_a_zero_vector_does_not_divide_by_zero() -> None:
    got = finish_rows(np.zeros((2, 8), np.float32), 8, layer_norm=False)
    assert np.isfinite(got).all() and not got.any()
