"""--workers N: N whole servers on one port, started one after another and stopped together.

One server process uses about one core however many the host has: its event loop, tokenization and the
model's thread share one interpreter lock (docs/benchmarks.md, "Replicas"). With --workers N this process
starts N server processes that bind the same port (SO_REUSEPORT: the kernel spreads connections over them),
each with a model of its own. It imports neither torch nor grpc and serves nothing itself:

- Workers start one at a time, each once the one before is SERVING, so each sizes its model and batch budget
  from the memory the ones before left it (a share of it: server.app.worker_memory).
- SIGTERM, SIGINT or SIGHUP here reaches every worker as SIGTERM: each drains as a single server does, and a second
  signal makes each exit at once (SIGQUIT: a worker takes further SIGTERMs as the same stop, since it may
  get one from a process manager too). Workers run in sessions of their own, so a Ctrl-C in a terminal
  reaches them only through here; they get SIGTERM if this process dies.
- A worker that fails to start stops the others, and this process exits with its status (2 for bad start-up
  input, which the worker has already explained in one line). A worker that exits while serving stops the
  others too, and this process exits 1, for the process manager to restart the whole; so does one whose event
  loop stops telling this process it is alive (a byte a second on its pipe) for --worker-timeout, and so does one
  not SERVING --worker-start-timeout after it started (a load that hangs).
- This process holds the port from before the first worker starts until it exits (_claim_port), so a second
  server cannot take it meanwhile. It serves --metrics-port itself: every worker's metrics, labelled with
  the worker (server.observability.workers).
"""

from __future__ import annotations

import asyncio
import ctypes
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
from server.observability.workers import WorkerMetrics, WorkerMetricsServer
from server.signals import stop_signals
from server.transport.ports import PortRefused, free_addresses

log = logging.getLogger("server.supervisor")

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.2
_BEAT_S = 1.0  # how often a serving worker tells this process it is alive
_KILL_AFTER_S = 30.0  # beyond the grace period, for a worker that does not finish draining


class _Stop(Exception):
    """A signal came: stop every worker."""


def supervise(config: ServerConfig, argv: Sequence[str]) -> int:
    """Run `config.workers` servers on `config.port` until a signal or a worker's exit; returns the exit status:
    0 after a requested stop, 128 + the signal when a second one cut the drain short (as a single server
    exits), 2 when a worker could not start, 1 when one failed while serving."""
    try:
        held = _claim_port(config)
    except PortRefused as exc:
        log.critical("cannot start: %s", exc)
        return 2
    metrics: WorkerMetricsServer | None = None
    if config.metrics_port is not None:
        try:
            metrics = WorkerMetricsServer(config.host, config.metrics_port, config.workers)
        except OSError as exc:
            log.critical("cannot start: cannot serve metrics on %s (--metrics-port): %s",
                      config.address(config.metrics_port), exc.strerror or exc)
            return 2
        log.info("metrics of every worker on http://%s/metrics", config.address(metrics.port))
    signals: list[int] = []
    workers: list[subprocess.Popen[bytes]] = []
    pipes: list[int] = []

    def on_signal(sig: int, _frame: object) -> None:
        signals.append(sig)
        if len(signals) > 1:  # again, while they drain: each worker exits at once (SIGTERM would only stop it)
            for worker in workers:
                if worker.poll() is None:
                    worker.send_signal(signal.SIGQUIT)

    for sig in stop_signals():
        signal.signal(sig, on_signal)
    try:
        code = _run(config, argv, workers, pipes, signals, metrics.workers if metrics else None)
    except _Stop:
        log.info("stop requested while starting: stopping %d workers", len(workers))
        code = 0  # a worker still importing ends on the SIGTERM (status 0, server.__main__): as asked
    finally:
        for fd in pipes:
            os.close(fd)
    killed = _stop_all(workers, config.grace_s + _KILL_AFTER_S)
    for sock in held:
        sock.close()
    if metrics is not None:
        metrics.close()
    if len(signals) > 1:
        return 128 + signals[-1]
    if code or signals:
        return code or (1 if killed else 0)  # a worker that had to be killed did not stop as asked
    return 1 if any(w.returncode != 0 for w in workers) else 0


def _run(config: ServerConfig, argv: Sequence[str], workers: list[subprocess.Popen[bytes]], pipes: list[int],
         signals: list[int], metrics: WorkerMetrics | None) -> int:
    """Start the workers into `workers` (their pipes into `pipes`), then watch them until a signal (0) or a
    worker's exit or silence (1). Raises _Stop on a signal while starting."""
    for index in range(config.workers):
        worker, pipe = _start(argv, index)
        workers.append(worker)
        pipes.append(pipe)
        status, metrics_port = _wait_ready(worker, pipe, index, signals, config.worker_start_timeout_s)
        if status is None and metrics_port < 0:
            log.critical("worker %d (pid %d) is not SERVING %gs after it started (--worker-start-timeout): "
                         "killing it and stopping the others", index, worker.pid, config.worker_start_timeout_s)
            worker.kill()
            worker.wait()
            return 1
        if status is not None:
            log.critical("worker %d exited with status %d while starting; stopping the others", index, status)
            return 2 if status == 2 else 1
        if metrics is not None and metrics_port:
            metrics.add(index, metrics_port)
    log.info("%d workers SERVING on %s (pids %s)", len(workers), config.address(config.port),
             ", ".join(str(w.pid) for w in workers))
    heard = [time.monotonic()] * len(workers)
    while not signals:
        time.sleep(_POLL_S)
        for index, worker in enumerate(workers):
            if signals:
                break  # a stop: workers end now as asked, not as failures
            if (status := worker.poll()) is not None:
                log.critical("worker %d (pid %d) exited with status %d while serving; stopping the others",
                          index, worker.pid, status)
                return 1
            # Read now, whatever select would say: bytes that waited while this process was not running
            # (stopped, not scheduled) count, and the worker was not silent.
            if _heard(pipes[index]):
                heard[index] = time.monotonic()
            if (silent := time.monotonic() - heard[index]) > config.worker_timeout_s:
                log.critical("worker %d (pid %d) has been silent for %.0fs (hung or stopped; --worker-timeout "
                          "%g): killing it and stopping the others", index, worker.pid, silent,
                          config.worker_timeout_s)
                worker.kill()
                return 1
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


def _heard(pipe: int) -> bool:
    """Whether a worker's pipe held bytes, read now without waiting (empty, or closed by a worker that is
    ending: False)."""
    try:
        return len(os.read(pipe, 4096)) > 0
    except BlockingIOError:
        return False


def _wait_ready(worker: subprocess.Popen[bytes], read: int, index: int, signals: list[int],
                timeout_s: float) -> tuple[int | None, int]:
    """(None, its metrics port or 0) once the worker says it is SERVING; (its exit status, 0) if it exits
    first; (None, -1) if neither happens within `timeout_s`. Raises _Stop on a signal."""
    said = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(read, selectors.EVENT_READ)
        while True:
            if signals:
                raise _Stop
            if time.monotonic() > deadline:
                return None, -1
            if selector.select(_POLL_S):
                if chunk := os.read(read, 64):
                    said += chunk
                    if b"\n" in said:  # "<metrics port>\n": SERVING
                        log.info("worker %d (pid %d) SERVING", index, worker.pid)
                        os.set_blocking(read, False)  # from now on read without waiting (_heard)
                        line = said.split(b"\n", 1)[0]
                        return None, int(line) if line.isdigit() else 0
                    continue
                status = worker.wait()  # the pipe closed before the line: the worker ended
            else:
                status = worker.poll()
            if status is not None:
                if signals:  # it ended of the stop that came meanwhile
                    raise _Stop
                return status, 0


def tell_supervisor(ready_fd: int, metrics_port: int | None) -> None:
    """In a worker, on its event loop, once SERVING: a line with its metrics port (0: none) on the supervisor's
    pipe, which says SERVING, then a byte every _BEAT_S while the loop runs: a worker whose bytes stop is hung
    or stopped."""
    loop = asyncio.get_running_loop()
    os.set_blocking(ready_fd, False)

    def say(message: bytes) -> None:
        try:
            os.write(ready_fd, message)  # fewer bytes than PIPE_BUF: written whole, or not at all
        except BlockingIOError:  # the supervisor is not reading (stopped itself): never block the loop
            pass
        except OSError:  # the supervisor has gone, or stopped waiting (a stop came): its signal stops us too
            return
        loop.call_later(_BEAT_S, say, b"1")

    say(f"{metrics_port or 0}\n".encode())


def _stop_all(workers: list[subprocess.Popen[bytes]], timeout_s: float) -> bool:
    """SIGTERM to every worker still running, and wait `timeout_s` for them all; returns whether any was killed
    for outlasting it."""
    killed = False
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
            killed = True
    return killed


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


def _claim_port(config: ServerConfig) -> list[socket.socket]:
    """Sockets bound to --port, held until the workers are done; raises PortRefused if a port is taken.

    Workers share the port with SO_REUSEPORT, which would as gladly share it with any other socket of the
    same user that sets it too. So the port must be free now (a bind of its own says so), and this process
    then binds it with SO_REUSEPORT, without listening: its workers can join it, connections go only to
    sockets that listen, and a second supervisor's check, or a server binding without SO_REUSEPORT, fails
    while this one runs.

    The hold cannot set SO_REUSEADDR (the checks, which do, would pass beside it), so connections a server
    without SO_REUSEPORT left in TIME_WAIT on the port keep it from binding for up to a minute; then nothing
    holds the port until the workers bind, and the log says so."""
    where = f"cannot listen on {config.address(config.port)} (--port)"
    found = free_addresses(config.host, config.port, where)
    held: list[socket.socket] = []
    try:
        for family, kind, proto, address in found:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(address)
                held.append(sock)
            except OSError as exc:
                sock.close()
                log.warning("%s (--port) is free but cannot be held until the workers bind (%s: connections "
                            "of an earlier server in TIME_WAIT); a second server could take it meanwhile",
                            config.address(config.port), exc.strerror)
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return held


__all__ = ["supervise", "tell_supervisor", "worker_memory"]
