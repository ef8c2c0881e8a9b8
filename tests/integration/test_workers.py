"""--workers N: N whole servers on one port, started one after another, stopped together, never orphaned."""

from __future__ import annotations

import contextlib
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
from server.supervisor import _stop_all, worker_memory
from tools.ports import ipv6_loopback
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
def supervised(model: Path, tmp: Path, *args: str, workers: int = 2, host: str = "127.0.0.1",
               name: str = "supervisor", port: int | None = None) -> Iterator[Supervised]:
    port, metrics_port = port or free_port(), free_port()
    log = tmp / f"{name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "server", "--model", str(model), "--host", host, "--port", str(port),
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


def _embed_over_many_connections(port: int, connections: int, host: str = "127.0.0.1") -> list[np.ndarray]:
    vectors = []
    for _ in range(connections):
        # A subchannel pool of its own: a connection of its own, which the kernel gives to either worker.
        with grpc.insecure_channel(f"{host}:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            reply = embed_pb2_grpc.EmbedServiceStub(channel).Embed(
                pb.EmbedRequest(texts=["the same text"], task=pb.TASK_SEARCH_QUERY), timeout=60)
            vectors.append(np.array(reply.embeddings[0].values))
    return vectors


def _answered(metrics_port: int, host: str = "127.0.0.1") -> list[float]:
    """Embed calls answered by each worker, from the supervisor's --metrics-port."""
    samples = scrape_metrics(metrics_port, host)
    workers = sorted(dict(labels)["worker"] for name, labels in samples if name == "nomic_embed_worker_up")
    return [sum(v for (name, labels), v in samples.items() if name == "nomic_embed_requests_total"
                and ("method", "Embed") in labels and ("worker", worker) in labels) for worker in workers]


def test_two_workers_share_the_port_answer_alike_and_stop_together(tiny_original: Path, tmp_path: Path) -> None:
    host = "[::1]" if ipv6_loopback() else "127.0.0.1"  # IPv6 where the host has it: bracketed, as in URLs
    with supervised(tiny_original, tmp_path, host=host) as run:
        run.wait_serving()
        assert len(run.pids) == 2 and run.process.pid not in run.pids
        vectors = _embed_over_many_connections(run.port, 24, host)
        assert all(np.array_equal(v, vectors[0]) for v in vectors)
        # --metrics-port serves every worker's metrics, each labelled with its worker; connections went to
        # both (all 24 to one of them has a chance of 2 in 2**24).
        per_worker = _answered(run.metrics_port, host)
        assert len(per_worker) == 2 and sum(per_worker) == 24 and min(per_worker) > 0, per_worker
        for pid in (run.process.pid, *run.pids):  # as a process manager stops a group: every process at once
            os.kill(pid, signal.SIGTERM)
        assert run.process.wait(90) == 0, run.text()
        assert all(_gone(pid, timeout=10) for pid in run.pids)
    text = run.text()
    assert f"workers SERVING on {host}:{run.port}" in text
    assert "worker 0 server.app: SERVING" in text and "worker 1 server.app: SERVING" in text
    assert text.count("server.app: stopped") == 2 and "Traceback" not in text
    assert "exiting now" not in text  # each worker took its two SIGTERMs as one stop, and drained


def test_a_worker_that_dies_stops_the_others_and_the_supervisor_exits_1(tiny_original: Path,
                                                                        tmp_path: Path) -> None:
    # On a port a single server's connections left in TIME_WAIT: they lack SO_REUSEPORT, so the supervisor cannot
    # hold the port beside them; it says so and starts all the same.
    with supervised(tiny_original, tmp_path, port=_port_in_time_wait(reuseport=False)) as run:
        run.wait_serving()
        os.kill(run.pids[1], signal.SIGKILL)
        assert run.process.wait(90) == 1, run.text()
        assert _gone(run.pids[0], timeout=10)
    assert "cannot be held until the workers bind" in run.text()
    assert "worker 1 (pid" in run.text() and "exited with status -9 while serving" in run.text()


def test_a_silent_worker_is_killed_and_the_supervisor_exits_1(tiny_original: Path, tmp_path: Path) -> None:
    with supervised(tiny_original, tmp_path, "--worker-timeout", "5") as run:
        run.wait_serving()
        os.kill(run.pids[0], signal.SIGSTOP)  # alive to poll(), silent on its pipe: as a hung event loop
        up = {dict(labels)["worker"]: v for (name, labels), v in scrape_metrics(run.metrics_port).items()
              if name == "nomic_embed_worker_up"}
        assert up == {"0": 0.0, "1": 1.0}  # the scrape still answers, with what the others have
        assert run.process.wait(90) == 1, run.text()
        assert all(_gone(pid, timeout=10) for pid in run.pids)
    assert "worker 0 (pid" in run.text() and "(hung or stopped; --worker-timeout 5): killing it" in run.text()


def test_a_worker_that_hangs_while_starting_is_killed_and_the_supervisor_exits_1(tiny_original: Path,
                                                                               tmp_path: Path) -> None:
    with supervised(tiny_original, tmp_path, "--worker-start-timeout", "5") as run:
        worker = _first_child(run.process.pid)
        os.kill(worker, signal.SIGSTOP)  # stopped before it could say SERVING: as a load that hangs
        assert run.process.wait(90) == 1, run.text()
        assert _gone(worker, timeout=10)
    assert f"worker 0 (pid {worker}) is not SERVING 5s after it started (--worker-start-timeout): killing it" \
        in run.text()
    assert "worker 1" not in run.text()


def test_a_stop_that_must_kill_a_worker_is_a_failure() -> None:
    # A worker that outlasts SIGTERM and the wait (stopped, or deaf to it) is killed: the stop did not go as
    # asked, and the supervisor's exit status says so (supervise returns 1 for it).
    deaf = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); time.sleep(60)"
    workers = [subprocess.Popen([sys.executable, "-c", deaf], stdout=subprocess.PIPE) for _ in range(2)]
    for worker in workers:
        assert worker.stdout is not None and worker.stdout.readline() == b"\n"  # SIGTERM is ignored from now on
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = time.monotonic()
    assert _stop_all([polite, *workers], 1.0) is True
    assert time.monotonic() - started < 10
    assert polite.returncode == -signal.SIGTERM and all(w.returncode == -signal.SIGKILL for w in workers)
    for worker in workers:
        assert worker.stdout is not None
        worker.stdout.close()
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert _stop_all([polite], 30.0) is False and polite.returncode == -signal.SIGTERM


def _first_child(pid: int, timeout: float = 30.0) -> int:
    """The first worker `pid` starts, found as soon as it runs as one (it then takes seconds to load torch).
    Not before: stopped between fork and exec, it would hold up the supervisor's Popen, not its wait."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                if b"--worker-index" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
        time.sleep(0.005)
    raise AssertionError(f"process {pid} started no worker in {timeout}s")


def test_the_port_is_held_from_the_start_against_a_second_server(tiny_original: Path, tmp_path: Path) -> None:
    # Restarted a moment after workers served on the port: their connections are still in TIME_WAIT.
    port = _port_in_time_wait(reuseport=True)
    with supervised(tiny_original, tmp_path, port=port) as run:
        deadline = time.monotonic() + 60
        while _bindable(run.port):  # held by the supervisor before its first worker even imports torch
            assert run.process.poll() is None and time.monotonic() < deadline, run.text()
            time.sleep(0.02)
        assert "listening" not in run.text()
        for extra in (["--workers", "2"], []):  # another supervisor, then a single server, while the workers load
            second = subprocess.run(
                [sys.executable, "-m", "server", "--model", str(tiny_original), "--host", "127.0.0.1", "--port",
                 str(run.port), *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2 and "cannot listen on 127.0.0.1" in second.stderr, second.stderr
        run.wait_serving()
        assert len(_embed_over_many_connections(run.port, 4)) == 4
        # A second signal cuts the drain short: every worker exits at once, the supervisor with 128 + it.
        run.process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        run.process.send_signal(signal.SIGINT)
        assert run.process.wait(90) == 128 + signal.SIGINT, run.text()
        assert all(_gone(pid, timeout=10) for pid in run.pids)
    text = run.text()
    assert "SIGQUIT: exiting now" in text and "while serving" not in text and "cannot be held" not in text
    assert _bindable(run.port)  # and given back


def _port_in_time_wait(*, reuseport: bool) -> int:
    """A port a server (grpc's socket options, SO_REUSEPORT as workers set it) served a connection on and
    closed it first, then stopped: the side that closes first keeps the port in TIME_WAIT for a minute."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuseport))
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            served, _ = listener.accept()
            served.close()
            client.recv(1)
    return port


def _bindable(port: int) -> bool:
    """Whether a server could bind the port (connections left in TIME_WAIT do not stop it)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_workers_are_not_orphaned_when_the_supervisor_is_killed(tiny_original: Path, tmp_path: Path) -> None:
    with supervised(tiny_original, tmp_path) as run:
        run.wait_serving()
        run.process.kill()
        run.process.wait()
        assert all(_gone(pid, timeout=60) for pid in run.pids)  # SIGTERM from the kernel: they drain and exit
    # The kernel sends it once per thread of the supervisor (the metrics server has threads): one stop still.
    assert run.text().count("server.app: stopped") == 2 and "exiting now" not in run.text(), run.text()


def test_a_worker_that_cannot_start_fails_the_start_with_status_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken-model"  # the files are there (the supervisor looks no further), config.json is cut
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": ')
    (broken / "model.safetensors").write_bytes(b"")
    with supervised(broken, tmp_path) as run:
        assert run.process.wait(120) == 2, run.text()
    text = run.text()
    assert "worker 0 server: cannot start:" in text and "worker 0 exited with status 2 while starting" in text
    assert "worker 1" not in text  # the next one never started


def test_a_missing_model_fails_the_start_before_any_worker_starts(tmp_path: Path) -> None:
    with supervised(tmp_path / "no-model", tmp_path) as run:
        assert run.process.wait(30) == 2, run.text()
    text = run.text()
    assert "cannot start: model directory" in text and "does not exist" in text and "worker 0" not in text


def test_a_bad_file_fails_the_start_before_the_model_loads(tiny_original: Path, tmp_path: Path) -> None:
    with supervised(tiny_original, tmp_path, "--tls-cert", str(tmp_path / "none.pem"), "--tls-key",
                    str(tmp_path / "none.key")) as run:
        assert run.process.wait(120) == 2, run.text()
    text = run.text()
    assert "worker 0 server: cannot start: cannot read the TLS" in text and "start-up:" not in text


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_port_in_use_fails_before_any_worker_starts(tiny_original: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"--port": str(free_port()), "--metrics-port": str(free_port()), flag: str(port)}
        result = subprocess.run(
            [sys.executable, "-m", "server", "--model", str(tiny_original), "--host", "127.0.0.1", "--workers", "2",
             "--log-level", "CRITICAL", *(word for pair in ports.items() for word in pair)], cwd=ROOT,
            capture_output=True, text=True,
            timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    why = "the port is in use" if flag == "--port" else "Address already in use"
    assert len(lines) == 1 and f"127.0.0.1:{port} ({flag}): {why}" in lines[0], lines


@pytest.mark.parametrize(("argv", "words"), [
    (["--workers", "0"], "--workers"),
    (["--workers", "65"], "--workers"),
    (["--workers", "2", "--port", "0"], "--port must name it"),
    (["--worker-timeout", "60"], "--worker-timeout: applies only with --workers 2 or more, which a supervisor "
                                 "watches; --workers 1 serves in one process"),
    (["--workers", "1", "--worker-start-timeout", "60"], "--worker-start-timeout: applies only with --workers 2"),
])
def test_worker_settings_that_cannot_work_are_refused_naming_the_flag(argv: list[str], words: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)):
        build_config(argv, env={})


def test_a_supervisors_setting_from_the_environment_is_refused_without_workers() -> None:
    with pytest.raises(ConfigError, match=re.escape("--worker-timeout (from NOMIC_EMBED_WORKER_TIMEOUT): applies "
                                                    "only with --workers 2 or more")):
        build_config([], env={"NOMIC_EMBED_WORKER_TIMEOUT": "60"})
    assert build_config(["--workers", "2", "--port", "50051"],
                        env={"NOMIC_EMBED_WORKER_TIMEOUT": "60"}).worker_timeout_s == 60


@pytest.mark.parametrize(("argv", "words"), [
    (["--workers", "2", "--worker-index", "2", "--ready-fd", "9"], "--worker-index: 2 is not below --workers 2"),
    (["--ready-fd", "5"], "--ready-fd: only with --worker-index"),
    (["--workers", "2", "--worker-index", "1"], "--worker-index: only with --ready-fd"),
    (["--workers", "2", "--worker-index", "1", "--ready-fd", "2"], "--ready-fd: 2 is not an open pipe"),
    (["--workers", "2", "--worker-index", "1", "--ready-fd", "999"], "--ready-fd: 999 is not an open pipe"),
    (["--worker-timeout", "4"], "--worker-timeout: '4' is not a finite number of seconds in 5..86400"),
    (["--worker-start-timeout", "1"], "--worker-start-timeout: '1' is not a finite number of seconds in 5..86400"),
])
def test_the_supervisors_flags_to_its_workers_are_checked(argv: list[str], words: str) -> None:
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
