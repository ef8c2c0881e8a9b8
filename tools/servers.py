"""Real servers on loopback: in-process on an event loop thread of their own, or in processes of their own."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.process import BaseProcess
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from client import EmbedClient
from server.__main__ import main as server_main
from server.app import App
from server.config import ServerConfig
from server.event_loop import loop_factory
from tools.ports import free_port  # re-exported: tests import it from here


@dataclasses.dataclass
class RunningServer:
    app: App
    port: int
    loop: asyncio.AbstractEventLoop

    @property
    def target(self) -> str:
        return self.app.config.address(self.port)

    def client(self, timeout: float = 60.0) -> EmbedClient:
        return EmbedClient(self.target, timeout=timeout)

    def wait_pending(self, requests: int, timeout_s: float = 10.0) -> None:
        """Wait until `requests` requests are admitted and not yet computed (queued, or on the model)."""
        assert self.app.loaded is not None
        deadline = time.monotonic() + timeout_s
        while self.app.loaded.batcher.pending()[0] < requests:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{requests} requests never reached the queue")
            time.sleep(0.01)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)


def scrape_metrics(port: int, host: str = "127.0.0.1") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at http://HOST:PORT/metrics (an IPv6 host bracketed), keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@contextmanager
def running_server(model: str, **overrides: object) -> Iterator[RunningServer]:
    # fp32 unless a test asks otherwise: `auto` depends on the host (bf16 on CPUs with native bf16).
    settings: dict[str, object] = {"host": "127.0.0.1", "port": 0, "threads": 1, "variant": "fp32", **overrides}
    config = ServerConfig(model=model, **settings)  # type: ignore[arg-type]
    loop = loop_factory(config.event_loop)()
    thread = threading.Thread(target=loop.run_forever, name="server-loop", daemon=True)
    thread.start()
    app = App(config)
    try:
        port = asyncio.run_coroutine_threadsafe(app.start(), loop).result(timeout=120)
        yield RunningServer(app, port, loop)
    finally:
        asyncio.run_coroutine_threadsafe(app.stop(), loop).result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


# Server processes fork from one process that has imported the server once: importing torch and
# transformers costs ~10 s of CPU per process, and three at once took a minute on a busy 2-core machine.
_FORKSERVER = multiprocessing.get_context("forkserver")


@dataclasses.dataclass
class ServerProcess:
    """A server in a process of its own, for faults an in-process server cannot have (SIGKILL)."""

    process: BaseProcess
    port: int
    metrics_port: int
    log: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, sig: signal.Signals) -> None:
        os.kill(self.process.pid, sig)  # type: ignore[arg-type]

    def wait(self, timeout: float) -> int | None:
        """The exit code (-N: killed by signal N), or None while it still runs after `timeout` seconds."""
        self.process.join(timeout)
        return self.process.exitcode

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` (e.g. "nomic_embed_requests_total") that carry `labels`."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
                   if s.name == name and labels.items() <= s.labels.items())

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _serve(argv: list[str], log: str) -> None:
    """The body of a server process: `python -m server ARGV`, its output in `log`."""
    multiprocessing.set_start_method(None, force=True)  # the platform's default, as in `python -m server`
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    sys.exit(server_main(argv))


def spawn_server(model: str, log_dir: Path, *args: str, port: int | None = None) -> ServerProcess:
    """Start a server process (fp32, one thread, metrics on) on free loopback ports, or on `port` (a restart on
    the same port); does not wait for it."""
    port, metrics_port = port or free_port(), free_port()
    log = log_dir / f"server-{port}.log"
    argv = ["--model", model, "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
            "--variant", "fp32", "--threads", "1", *args]
    _FORKSERVER.set_forkserver_preload([__name__])  # takes effect when the fork server starts
    process = _FORKSERVER.Process(target=_serve, args=(argv, str(log)), name=f"server-{port}", daemon=True)
    process.start()
    return ServerProcess(process, port, metrics_port, log)


def wait_until_serving(target: str, alive: Callable[[], bool], timeout: float = 180.0) -> None:
    """Block until the health check at `target` says SERVING; raise once `alive()` is false or time is up."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet, or still loading (NOT_SERVING)
            if not alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server at {target} " + (
                    "exited" if not alive() else f"not SERVING after {timeout:.0f}s"))
            time.sleep(0.2)


def wait_serving(servers: Sequence[ServerProcess], timeout: float = 180.0) -> None:
    """Block until every server's health check says SERVING; a server that exits or stays down fails."""
    for server in servers:
        try:
            wait_until_serving(server.target, server.alive, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}:\n{server.log_tail()}") from None


@contextmanager
def server_processes(model: str, count: int, log_dir: Path, *args: str) -> Iterator[list[ServerProcess]]:
    """`count` server processes, yielded once all are SERVING; those still running at the end get SIGTERM,
    and SIGKILL if they have not drained within 30 s."""
    servers: list[ServerProcess] = []
    try:
        for _ in range(count):
            servers.append(spawn_server(model, log_dir, *args))
        wait_serving(servers)
        yield servers
    finally:
        for server in servers:
            if server.alive():
                server.send(signal.SIGTERM)
                server.send(signal.SIGCONT)  # a stopped (hung) server acts on it only once continued
        for server in servers:
            if server.wait(30) is None:
                server.send(signal.SIGKILL)
                server.wait(30)
