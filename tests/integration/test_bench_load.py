"""The benchmark's load generator against a real server: every text answered, unary and streaming."""

from __future__ import annotations

import asyncio

import pytest

from bench.load import drive, stream_layout
from tools.servers import RunningServer

TEXTS = [f"text number {i} " + "word " * (i % 7) for i in range(23)]


@pytest.mark.parametrize(("mode", "concurrency"), [("unary", 1), ("unary", 5), ("stream", 1), ("stream", 12)])
def test_load_generator_gets_every_text_embedded(tiny_server: RunningServer, mode: str, concurrency: int) -> None:
    requests = [TEXTS[i : i + 2] for i in range(0, len(TEXTS), 2)]
    result = asyncio.run(drive(tiny_server.target, mode, concurrency, requests))
    assert result.errors == []
    assert result.texts == len(TEXTS) and len(result.latencies_s) == len(requests)
    assert result.tokens > 2 * len(TEXTS) and result.wall_s > 0


def test_stream_layout_keeps_the_concurrency() -> None:
    assert stream_layout(1) == (1, 1)
    assert stream_layout(8) == (1, 8)
    assert stream_layout(64) == (8, 8)
    assert stream_layout(12) == (2, 6)
