"""A real server on loopback port 0, run in-process on its own event loop thread."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc

from client import EmbedClient
from server.app import App
from server.config import ServerConfig


@dataclasses.dataclass
class RunningServer:
    app: App
    port: int
    loop: asyncio.AbstractEventLoop

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, timeout: float = 60.0) -> EmbedClient:
        return EmbedClient(self.target, timeout=timeout)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.target)


def free_port() -> int:
    """A loopback port free right now, for a server that must come back on the same port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model: str, **overrides: object) -> Iterator[RunningServer]:
    # fp32 unless a test asks otherwise: `auto` depends on the host (bf16 on CPUs with native bf16).
    settings: dict[str, object] = {"host": "127.0.0.1", "port": 0, "threads": 1, "variant": "fp32", **overrides}
    config = ServerConfig(model=model, **settings)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
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
