"""Shared fixtures: tiny checkpoints in the original hub layout and real servers on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.checkpoint import TINY, write_tiny_nomic
from tools.servers import RunningServer, running_server

__all__ = ["TINY"]
_FOLDER_MARKERS = {"unit", "integration", "model"}


_TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The folder right under tests/ is the kind of test (tests/unit/model/ holds unit tests of server.model).
    for item in items:
        kind = Path(str(item.fspath)).resolve().relative_to(_TESTS).parts[0]
        if kind in _FOLDER_MARKERS:
            item.add_marker(getattr(pytest.mark, kind))


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
