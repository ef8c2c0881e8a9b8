"""Shared fixtures: tiny checkpoints in the original hub layout and real servers on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.checkpoint import write_tiny_nomic
from tests.helpers.servers import RunningServer, running_server

# Small enough for 2 CPU cores, wide enough for Matryoshka widths from 64, and a tiny trained length
# so that dynamic NTK scaling is exercised by texts of a few dozen tokens.
TINY = {"hidden": 128, "layers": 2, "heads": 4, "inner": 256, "max_trained_positions": 16}
_FOLDER_MARKERS = {"unit", "integration", "model"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for part in Path(str(item.fspath)).parts:
            if part in _FOLDER_MARKERS:
                item.add_marker(getattr(pytest.mark, part))


@pytest.fixture(scope="session")
def tiny_original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Config with the original keys only (n_embd, n_layer, ...)."""
    return write_tiny_nomic(tmp_path_factory.mktemp("tiny-original"), config_style="original", **TINY)


@pytest.fixture(scope="session")
def tiny_v5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Config with the original keys plus the transformers 5 keys the hub config carries now."""
    return write_tiny_nomic(tmp_path_factory.mktemp("tiny-v5"), config_style="v5", seed=1, **TINY)


@pytest.fixture(scope="session")
def tiny_server(tiny_original: Path) -> Iterator[RunningServer]:
    with running_server(str(tiny_original)) as srv:
        yield srv
