"""--workers N: N whole servers on one port, started one after another, stopped together, never orphaned."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from server.config import ConfigError, ServerConfig, build_config
from server.supervisor import worker_memory
from tools.servers import free_port, scrape_metrics

ROOT = Path(__file__).resolve().parents[2]


class Supervised:
    def __init__(self, process: subprocess.Popen[str], log: Path, port: int, metrics_port: int) -> None:
        self.process, self.log, self.port, self.metrics_port = process, log, port, metrics_port
        self.pids: list[int] = []

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_serving(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while (found := re.search(r"workers SERVING on \S+ \(pids ([\d, ]+)\)", self.text())) is None:
            assert self.process.poll() is None, f"the supervisor exited {self.process.returncode}:\n{self.text()}"
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.2)
        self.pids = [int(p) for p in found.group(1).split(", ")]


@contextmanager
def supervised(model: Path, tmp: Path, *args: str, workers: int = 2) -> Iterator[Supervised]:
    port, metrics_port = free_port(), _free_port_pair()
    log = tmp / "supervisor.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
             "--metrics-port", str(metrics_port), "--variant", "fp32", "--workers", str(workers), *args],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    running = Supervised(process, log, port, metrics_port)
    try:
        yield running
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in running.pids:  # nothing left behind, whatever the test did
            _gone(pid, timeout=60)


def _free_port_pair() -> int:
    """A port P with P + 1 free too (worker i serves metrics on P + i)."""
    while True:
        port = free_port()
        if port < 65535:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 1))
                    return port
                except OSError:
                    continue


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return False


def _embed_over_many_connections(port: int, connections: int) -> list[np.ndarray]:
    vectors = []
    for _ in range(connections):
        # A subchannel pool of its own: a connection of its own, which the kernel gives to either worker.
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            reply = embed_pb2_grpc.EmbedServiceStub(channel).Embed(
                pb.EmbedRequest(texts=["the same text"], task=pb.TASK_SEARCH_QUERY), timeout=60)
            vectors.append(np.array(reply.embeddings[0].values))
    return vectors


def _answered(metrics_port: int) -> float:
    samples = scrape_metrics(metrics_port)
    return sum(v for (name, labels), v in samples.items()
               if name == "nomic_embed_requests_total" and ("method", "Embed") in labels)


def test_two_workers_share_the_port_answer_alike_and_stop_together(tiny_original: Path, tmp_path: Path) -> None:
    with supervised(tiny_original, tmp_path) as run:
        run.wait_serving()
        assert len(run.pids) == 2 and run.process.pid not in run.pids
        vectors = _embed_over_many_connections(run.port, 24)
        assert all(np.array_equal(v, vectors[0]) for v in vectors)
        # Each worker serves its metrics on --metrics-port + its index; connections went to both (all 24 to one
        # of them has a chance of 2 in 2**24).
        per_worker = [_answered(run.metrics_port), _answered(run.metrics_port + 1)]
        assert sum(per_worker) == 24 and min(per_worker) > 0, per_worker
        run.process.send_signal(signal.SIGTERM)
        assert run.process.wait(90) == 0, run.text()
        assert all(_gone(pid, timeout=10) for pid in run.pids)
    text = run.text()
    assert "worker 0 server.app: SERVING" in text and "worker 1 server.app: SERVING" in text
    assert text.count("server.app: stopped") == 2 and "Traceback" not in text


def test_a_worker_that_dies_stops_the_others_and_the_supervisor_exits_1(tiny_original: Path,
                                                                        tmp_path: Path) -> None:
    with supervised(tiny_original, tmp_path) as run:
        run.wait_serving()
        os.kill(run.pids[1], signal.SIGKILL)
        assert run.process.wait(90) == 1, run.text()
        assert _gone(run.pids[0], timeout=10)
    assert "worker 1 (pid" in run.text() and "exited with status -9 while serving" in run.text()


def test_workers_are_not_orphaned_when_the_supervisor_is_killed(tiny_original: Path, tmp_path: Path) -> None:
    with supervised(tiny_original, tmp_path) as run:
        run.wait_serving()
        run.process.kill()
        run.process.wait()
        assert all(_gone(pid, timeout=60) for pid in run.pids)  # SIGTERM from the kernel: they drain and exit


def test_a_worker_that_cannot_start_fails_the_start_with_status_2(tmp_path: Path) -> None:
    empty = tmp_path / "no-model"
    empty.mkdir()
    with supervised(empty, tmp_path) as run:
        assert run.process.wait(120) == 2, run.text()
    text = run.text()
    assert "worker 0 server: cannot start:" in text and "worker 0 exited with status 2 while starting" in text
    assert "worker 1" not in text  # the next one never started


def test_a_port_in_use_fails_before_any_worker_starts(tiny_original: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "server", "--model", str(tiny_original), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "2"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port} (--port): the port is in use" in lines[0]


@pytest.mark.parametrize(("argv", "words"), [
    (["--workers", "0"], "--workers"),
    (["--workers", "65"], "--workers"),
    (["--workers", "2", "--port", "0"], "--port must name it"),
    (["--workers", "2", "--metrics-port", "0"], "--metrics-port must name a port"),
    (["--workers", "3", "--metrics-port", "65534"], "beyond 65535"),
    (["--workers", "3", "--port", "9001", "--metrics-port", "9000"], "include the gRPC port"),
])
def test_worker_settings_that_cannot_work_are_refused_naming_the_flag(argv: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        build_config(argv, env={})


def test_the_supervisors_own_flags_are_not_environment_variables() -> None:
    with pytest.raises(ConfigError, match="unknown variable NOMIC_EMBED_WORKER_INDEX"):
        build_config([], env={"NOMIC_EMBED_WORKER_INDEX": "1"})


def test_each_worker_takes_its_share_of_the_memory() -> None:
    gib = 2**30
    alone = ServerConfig(max_memory_bytes=8 * gib)
    assert worker_memory(alone, 64 * gib) == (8 * gib, "--max-memory")
    capped = [ServerConfig(workers=4, worker_index=i, max_memory_bytes=8 * gib) for i in range(4)]
    assert {worker_memory(c, 64 * gib)[0] for c in capped} == {2 * gib}
    # Without a cap each takes a share of what is free when it starts: what the ones to come will share.
    first, last = (ServerConfig(workers=4, worker_index=i) for i in (0, 3))
    assert worker_memory(first, 64 * gib)[0] == 16 * gib and worker_memory(last, 16 * gib)[0] == 16 * gib
    assert "worker 0's share of the free memory, 1/4" in worker_memory(first, 64 * gib)[1]
