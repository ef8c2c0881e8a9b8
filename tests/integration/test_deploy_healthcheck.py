"""deploy/healthcheck.py, the Docker HEALTHCHECK: healthy only while the embedding service is SERVING."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tools.servers import RunningServer

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


def _check(port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOMIC_EMBED_PORT": str(port)}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30)


def test_a_serving_server_is_healthy(tiny_server: RunningServer) -> None:
    run = _check(tiny_server.port)
    assert run.returncode == 0, run.stderr
    assert "SERVING" in run.stdout


def test_no_server_is_unhealthy() -> None:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = _check(port)
    assert run.returncode == 1
    assert "UNAVAILABLE" in run.stderr
