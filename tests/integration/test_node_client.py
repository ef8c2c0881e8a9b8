"""examples/node: the Node.js client gets the same vectors as the Python client from a real server."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from client import Task
from tools.servers import RunningServer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
TEXTS = ["what is a matryoshka embedding?", "Ünïcödé and emoji 🙂 survive the trip", "short"]

pytestmark = pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None,
                                reason="node and npm are not on PATH (CI has them)")


@pytest.fixture(scope="module")
def node_example() -> Path:
    """examples/node with its locked dependencies installed (npm ci, once: kept in node_modules)."""
    installed = EXAMPLE / "node_modules" / ".package-lock.json"  # npm's record of what it installed
    lock = EXAMPLE / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=EXAMPLE, check=True, timeout=300)
    return EXAMPLE


def _node_embed(example: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", str(example / "embed.js"), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("task", "dimensions"), [("search_query", 64), ("search_document", 0)])
def test_node_vectors_equal_the_python_clients(node_example: Path, tiny_server: RunningServer, task: str,
                                               dimensions: int) -> None:
    run = _node_embed(node_example, "--target", tiny_server.target, "--task", task,
                      "--dimensions", str(dimensions), *TEXTS)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    from_node = np.asarray(result["embeddings"], dtype=np.float32)
    with tiny_server.client() as client:
        from_python = client.embed(TEXTS, Task[task.upper()], dimensions=dimensions)
        info = client.info()
    assert from_node.shape == (len(TEXTS), dimensions or info.dimensions)
    # JSON carries each float32 exactly (shortest round-trip decimal of the value).
    np.testing.assert_array_equal(from_node, from_python.astype(np.float32))
    assert result["dimensions"] == from_node.shape[1]
    assert result["model"] == info.model_id
    assert all(tokens > 0 for tokens in result["tokens"])


def test_node_reads_texts_from_stdin(node_example: Path, tiny_server: RunningServer) -> None:
    run = subprocess.run(["node", str(node_example / "embed.js"), "--target", tiny_server.target],
                         input="\n".join(TEXTS) + "\n", capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["embeddings"]) == len(TEXTS)


def test_node_reports_the_servers_status_for_a_bad_request(node_example: Path, tiny_server: RunningServer) -> None:
    run = _node_embed(node_example, "--target", tiny_server.target, "--dimensions", "7", "text")
    assert run.returncode == 1
    assert run.stderr.startswith("INVALID_ARGUMENT: dimensions")
