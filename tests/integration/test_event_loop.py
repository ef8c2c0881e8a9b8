"""The server runs on the event loop asked for, and answers alike on both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server import event_loop
from server.config import ConfigError, build_config
from tools.servers import running_server


@pytest.mark.parametrize("choice", ["asyncio", "uvloop"])
def test_the_server_serves_on_the_loop_asked_for(tiny_original: Path, choice: str) -> None:
    with running_server(str(tiny_original), event_loop=choice) as srv:
        assert event_loop.loop_name(srv.loop) == choice
        with srv.client() as client:
            vectors = client.embed(["one loop", "or another"], "search_query")
    assert vectors.shape[0] == 2 and np.isfinite(vectors).all()


def test_auto_is_uvloop_where_it_is_installed() -> None:
    assert event_loop.uvloop_installed()  # a dependency of the project on Linux
    assert event_loop.resolved("auto") == "uvloop" and event_loop.resolved("asyncio") == "asyncio"
    loop = event_loop.loop_factory("auto")()
    try:
        assert event_loop.loop_name(loop) == "uvloop"
    finally:
        loop.close()


def test_uvloop_asked_for_where_it_is_missing_is_refused_naming_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(event_loop, "uvloop_installed", lambda: False)
    assert event_loop.resolved("auto") == "asyncio"
    with pytest.raises(ConfigError, match=r"argument --event-loop: uvloop does not import here"):
        build_config(["--event-loop", "uvloop"], {})
    assert build_config(["--event-loop", "auto"], {}).event_loop == "auto"
