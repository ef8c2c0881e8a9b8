"""The Backend seam: the model runner and the tests' fake both provide every member the batcher uses."""

from __future__ import annotations

import inspect

import pytest

from server.engine.backend import Backend
from tests.helpers.fake_backend import FakeBackend

MEMBERS = {"is_padded", "max_batch_rows", "run", "healthy"}


def test_the_protocol_names_its_members() -> None:
    assert {name for name in vars(Backend) if not name.startswith("_")} == MEMBERS


@pytest.mark.parametrize("implementation", ["runner", "fake"])
def test_implementations_provide_every_member(implementation: str) -> None:
    if implementation == "runner":
        from server.model.runner import Runner as cls
    else:
        cls = FakeBackend
    for name in ("run", "healthy"):
        assert list(inspect.signature(getattr(cls, name)).parameters) == ["self", "rows"], name
    if implementation == "runner":
        assert cls.is_padded is True and cls.max_batch_rows is None
