"""The host-cost benchmark: it sums the CPU of a process tree, and runs end to end against real servers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import echo, host_cost
from nomic_embed.v1 import embed_pb2 as pb

# A parent that starts a child burning 0.4 s of CPU, then both wait: the CPU is the child's, not the parent's.
_TREE = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time\\nwhile time.process_time() < 0.4: pass\\ntime.sleep(60)"])
time.sleep(60)
"""


def test_the_cpu_of_a_whole_process_tree_is_summed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", _TREE], start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while (found := host_cost.tree_cpu_s(parent.pid))[0] < 0.4 and time.monotonic() < deadline:
            time.sleep(0.1)
        cpu_s, processes = found
        assert processes == 2 and 0.4 <= cpu_s < 2.0
    finally:
        os.killpg(parent.pid, signal.SIGKILL)  # the child too
        parent.wait()


def test_short_texts_are_distinct_one_liners() -> None:
    texts = host_cost.short_texts(500)
    assert len(set(texts)) == 500 and all("\n" not in t and 8 <= len(t.split()) <= 17 for t in texts)


def test_a_small_run_measures_the_echo_and_the_server() -> None:
    # Enough requests for some CPU ticks (/proc counts in hundredths of a second) even for the echo.
    costs = host_cost.run(concurrency=8, requests=400, server_args=[], levels=("echo",))
    assert [c.name for c in costs] == [host_cost.ECHO, host_cost.SERVER]
    for cost in costs:
        assert cost.requests == 400 and cost.errors == 0
        assert cost.cpu_s > 0 and cost.wall_s > 0 and cost.processes >= 1
    assert "us CPU per request" in host_cost.report(costs, 4)


@pytest.mark.parametrize("level", list(host_cost.LADDER))
def test_every_level_of_the_ladder_answers_with_its_vector(level: str, tiny_v5: Path) -> None:
    """Each level in this process (`--ladder` serves each in a process of its own, as the echo above)."""
    async def call() -> pb.EmbedResponse:
        return await echo.servicer(level, 8, tiny_v5).Embed(pb.EmbedRequest(texts=["a short text", "another"]),
                                                            None)  # type: ignore[arg-type]

    response = asyncio.run(call())
    assert [list(e.values) for e in response.embeddings] == [[0.125] * 8] * 2
