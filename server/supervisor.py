"""--workers N: N whole servers on one port, started one after another and stopped together.

One server process uses about one core however many the host has: its event loop, tokenization and the
model's thread share one interpreter lock (docs/benchmarks.md, "Replicas"). With --workers N this process
starts N server processes that bind the same port (SO_REUSEPORT: the kernel spreads connections over them),
each with a model of its own. It imports neither torch nor grpc and serves nothing itself:

- Workers start one at a time, each once the one before is SERVING, so each sizes its model and batch budget
  from the memory the ones before left it (a share of it: server.app.worker_memory).
- SIGTERM or SIGINT here reaches every worker as SIGTERM: each drains as a single server does, and a second
  signal makes each exit at once, as it would a single server. Workers run in sessions of their own, so a
  Ctrl-C in a terminal reaches them only through here; they get SIGTERM if this process dies.
- A worker that fails to start stops the others, and this process exits with its status (2 for bad start-up
  input, which the worker has already explained in one line). A worker that exits while serving stops the
  others too, and this process exits 1, for the process manager to restart the whole.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from server.config import ServerConfig

log = logging.getLogger("server.supervisor")

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.2
_KILL_AFTER_S = 30.0  # beyond the grace period, for a worker that does not finish draining


class _Stop(Exception):
    """A signal came: stop every worker."""


def supervise(config: ServerConfig, argv: Sequence[str]) -> int:
    """Run `config.workers` servers on `config.port` until a signal or a worker's exit; returns the exit status."""
    problem = _ports_in_use(config)
    if problem:
        log.error("cannot start: %s", problem)
        return 2
    signals: list[int] = []
    workers: list[subprocess.Popen[bytes]] = []

    def on_signal(sig: int, _frame: object) -> None:
        signals.append(sig)
        if len(signals) > 1:  # again, while they drain: each worker hears it again, and exits at once
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        code = _run(config, argv, workers, signals)
    except _Stop:
        log.info("stop requested while starting: stopping %d workers", len(workers))
        _stop_all(workers, config.grace_s + _KILL_AFTER_S)
        return 0  # a worker still importing has no handler yet and dies of the SIGTERM: as asked
    _stop_all(workers, config.grace_s + _KILL_AFTER_S)
    failed = [w for w in workers if w.returncode != 0]
    return code or (1 if failed else 0)


def _run(config: ServerConfig, argv: Sequence[str], workers: list[subprocess.Popen[bytes]],
         signals: list[int]) -> int:
    """Start the workers into `workers`, then watch them until a signal (0) or a worker's exit (its code)."""
    for index in range(config.workers):
        worker, ready = _start(argv, index)
        workers.append(worker)
        status = _wait_ready(worker, ready, index, signals)
        if status is not None:
            log.error("worker %d exited with status %d while starting; stopping the others", index, status)
            return 2 if status == 2 else 1
    log.info("%d workers SERVING on %s:%d (pids %s)", len(workers), config.host, config.port,
             ", ".join(str(w.pid) for w in workers))
    while not signals:
        for index, worker in enumerate(workers):
            if (status := worker.poll()) is not None:
                log.error("worker %d (pid %d) exited with status %d while serving; stopping the others",
                          index, worker.pid, status)
                return 1
        time.sleep(_POLL_S)
    log.info("%s: stopping %d workers (each drains, grace %gs)", signal.Signals(signals[0]).name, len(workers),
             config.grace_s)
    return 0


def _start(argv: Sequence[str], index: int) -> tuple[subprocess.Popen[bytes], int]:
    """Worker `index`, and the pipe it writes to once SERVING."""
    read, write = os.pipe()
    try:
        worker = subprocess.Popen(
            [sys.executable, "-m", "server", *argv, "--worker-index", str(index), "--ready-fd", str(write)],
            pass_fds=(write,), start_new_session=True, preexec_fn=_die_with_parent(os.getpid()))
    except BaseException:
        os.close(read)
        raise
    finally:
        os.close(write)
    return worker, read


def _die_with_parent(parent: int) -> Callable[[], None]:
    """In the worker, before it runs: SIGTERM when this process dies (Linux), as if the supervisor had sent it."""
    def prepare() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if hasattr(libc, "prctl"):
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    return prepare


def _wait_ready(worker: subprocess.Popen[bytes], read: int, index: int, signals: list[int]) -> int | None:
    """None once the worker says it is SERVING; its exit status if it exits first. Raises _Stop on a signal."""
    with selectors.DefaultSelector() as selector:
        selector.register(read, selectors.EVENT_READ)
        try:
            while True:
                if signals:
                    raise _Stop
                if selector.select(_POLL_S):
                    if os.read(read, 1):
                        log.info("worker %d (pid %d) SERVING", index, worker.pid)
                        return None
                    return worker.wait()  # the pipe closed unwritten: the worker ended
                if (status := worker.poll()) is not None:
                    return status
        finally:
            os.close(read)


def _stop_all(workers: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    for worker in workers:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for index, worker in enumerate(workers):
        try:
            worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker %d (pid %d) still running %.0fs after SIGTERM: killing it", index, worker.pid,
                      timeout_s)
            worker.kill()
            worker.wait()


def worker_memory(config: ServerConfig, free_bytes: int) -> tuple[int | None, str]:
    """The memory this server may use (None: all that is free), and what set it, as the policy names it.

    --max-memory; for a worker of --workers N its share: --max-memory / N, or without a cap, what the workers
    still to start leave it of the memory free now (free / (N - index)), since each starts once the ones
    before have taken theirs."""
    if config.worker_index is None or config.workers == 1:
        return config.max_memory_bytes, "--max-memory"
    share = f"worker {config.worker_index}'s share of"
    if config.max_memory_bytes is not None:
        return config.max_memory_bytes // config.workers, f"{share} --max-memory, 1/{config.workers}:"
    left = config.workers - config.worker_index
    return free_bytes // left, f"{share} the free memory, 1/{left}:"


def _ports_in_use(config: ServerConfig) -> str | None:
    """Why the workers could not have their ports to themselves, or None.

    Workers share the gRPC port with SO_REUSEPORT, which would as gladly share it with another program of
    the same user that set it too: so the port must be free before they start (a bind of its own says so)."""
    ports = [("--port", config.port)]
    if config.metrics_port is not None:
        ports += [("--metrics-port", config.metrics_port + i) for i in range(config.workers)]
    for flag, port in ports:
        try:
            addresses = socket.getaddrinfo(config.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            return f"cannot listen on {config.host}:{port} ({flag}): {exc.strerror}"
        for family, kind, proto, _, address in addresses:
            with socket.socket(family, kind, proto) as probe:
                try:
                    probe.bind(address)
                except OSError as exc:
                    why = "the port is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
                    return f"cannot listen on {config.host}:{port} ({flag}): {why}"
    return None


__all__ = ["supervise", "worker_memory"]
