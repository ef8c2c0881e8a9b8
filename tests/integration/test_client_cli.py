"""`python -m client` as a subprocess against a real server on loopback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers.servers import RunningServer

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_embed_writes_npy_rows_in_input_order(tiny_server: RunningServer, tmp_path: Path) -> None:
    texts = [f"line {i} of the input" for i in range(150)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n\n")  # a trailing blank line is skipped
    out = tmp_path / "out.npy"
    run = cli("embed", "--target", tiny_server.target, "--input", str(tmp_path / "in.txt"), "--output", str(out),
              "--task", "search_query", "--dimensions", "64", "--batch-size", "16")
    assert run.returncode == 0, run.stderr
    assert "150/150" in run.stderr and "tokens/s" in run.stderr  # the progress bar
    with tiny_server.client() as client:
        want = client.embed(texts, "search_query", 64)
    got = np.load(out)
    assert got.dtype == np.float32 and got.shape == (150, 64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_embed_reads_jsonl_from_stdin_and_writes_jsonl(tiny_server: RunningServer, tmp_path: Path) -> None:
    records = [{"id": f"doc-{i}", "text": f"document number {i}"} for i in range(40)]
    out = tmp_path / "out.jsonl"
    run = cli("embed", "--target", tiny_server.target, "--input", "-", "--output", str(out), "--encoding", "int8",
              "--quiet", stdin="".join(json.dumps(r) + "\n" for r in records))
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [{k: v for k, v in line.items() if k != "embedding"} for line in lines] == records
    with tiny_server.client() as client:
        want = client.embed([r["text"] for r in records], encoding="int8")
    assert np.array_equal(np.array([line["embedding"] for line in lines], np.int8), want)


def test_info_and_similarity(tiny_server: RunningServer) -> None:
    info = cli("info", "--target", tiny_server.target)
    assert info.returncode == 0 and "dimensions: 128" in info.stdout
    similarity = cli("similarity", "a red apple", "a green pear", "--target", tiny_server.target)
    with tiny_server.client() as client:
        a, b = client.embed(["a red apple", "a green pear"], "clustering")
    assert similarity.returncode == 0
    assert float(similarity.stdout) == round(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), 4)


def test_errors_are_one_line_and_leave_no_output(tiny_server: RunningServer, tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("one\ntwo\n")
    out = tmp_path / "out.npy"
    bad_width = cli("embed", "--target", tiny_server.target, "--input", str(tmp_path / "in.txt"),
                    "--output", str(out), "--dimensions", "7", "--quiet")
    nobody = cli("info", "--target", "127.0.0.1:1", "--timeout", "2")
    missing = cli("embed", "--target", tiny_server.target, "--input", str(tmp_path / "nope.txt"),
                  "--output", str(out))
    for run in (bad_width, nobody, missing):
        assert run.returncode == 1
        assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "dimensions: 7 is out of range" in bad_width.stderr and "INVALID_ARGUMENT" in bad_width.stderr
    assert "UNAVAILABLE" in nobody.stderr and "is a server running at 127.0.0.1:1?" in nobody.stderr
    assert "nope.txt" in missing.stderr
    assert not list(tmp_path.glob("out.npy*"))
