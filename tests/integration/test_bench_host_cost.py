"""The host-cost benchmark: it sums the CPU of a process tree, and runs end to end against real servers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bench import host_cost

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


def test_a_small_run_measures_the_echo_a_level_of_the_ladder_and_the_server() -> None:
    # The top level ("forward") runs the code of the levels below it (bench/echo.py). Enough requests for some
    # CPU ticks (/proc counts in hundredths of a second) even for the echo.
    levels = ("echo", "forward")
    costs = host_cost.run(concurrency=8, requests=400, server_args=[], levels=levels)
    assert [c.name for c in costs] == [*(host_cost.LADDER[level] for level in levels), host_cost.SERVER]
    assert costs[0].name == host_cost.ECHO
    for cost in costs:
        assert cost.requests == 400 and cost.errors == 0
        assert cost.cpu_s > 0 and cost.wall_s > 0 and cost.processes >= 1
    assert "us CPU per request" in host_cost.report(costs, 4)
