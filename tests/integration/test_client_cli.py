"""`python -m client` as a subprocess against a real server on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.helpers.cli import ROOT, cli, write_run_record
from tools.servers import RunningServer


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
    (tmp_path / "not.pem").write_text("not a certificate\n")
    bad_token = cli("info", "--target", tiny_server.target, "--token", "tök\nen")  # grpc: lines of its own
    bad_ca = cli("info", "--target", tiny_server.target, "--ca", str(tmp_path / "not.pem"))
    (tmp_path / "dir.npy").mkdir()  # found only when renaming the finished part, after all the work
    a_folder = cli("embed", "--target", tiny_server.target, "--input", str(tmp_path / "in.txt"),
                   "--output", str(tmp_path / "dir.npy"))
    for run in (bad_width, nobody, missing, bad_token, bad_ca, a_folder):
        assert run.returncode == 1
        assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "the token must be printable ASCII" in bad_token.stderr
    assert bad_ca.stderr == f"error: {tmp_path / 'not.pem'} holds no PEM certificate\n"
    assert "dimensions: 7 is out of range" in bad_width.stderr and "INVALID_ARGUMENT" in bad_width.stderr
    assert "UNAVAILABLE" in nobody.stderr and "is a server running at 127.0.0.1:1?" in nobody.stderr
    assert "nope.txt" in missing.stderr
    assert a_folder.stderr == f"error: --output {tmp_path / 'dir.npy'} is a directory; name a .npy or .jsonl file\n"
    assert not list(tmp_path.glob("out.npy*")) and not list(tmp_path.glob("dir.npy.*"))


def test_a_failed_run_keeps_what_it_wrote_and_resume_continues_it(tiny_server: RunningServer,
                                                                   tmp_path: Path) -> None:
    texts = [f"line {i} of the input" for i in range(100)] + ["far too long " * 20] + [f"more {i}" for i in range(50)]
    (tmp_path / "in.txt").write_text("\n".join(texts) + "\n")
    out, part = tmp_path / "out.npy", tmp_path / "out.npy.part"
    args = ("embed", "--target", tiny_server.target, "--input", str(tmp_path / "in.txt"), "--output", str(out),
            "--max-tokens", "20", "--batch-size", "10", "--quiet")
    failed = cli(*args, "--long-text-mode", "error")
    assert failed.returncode == 1
    assert "texts[100]" in failed.stderr and "--resume" in failed.stderr and "Traceback" not in failed.stderr
    assert not out.exists()
    kept = np.load(part)  # a valid .npy of the rows written so far
    assert kept.shape == (100, 128)
    again = cli(*args, "--long-text-mode", "truncate")  # without --resume: refused, the work is kept
    assert again.returncode == 1 and "add --resume to continue it" in again.stderr
    assert np.array_equal(np.load(part), kept)
    # Mark the kept rows: a resumed run must keep them, not compute them again.
    with open(part, "wb") as f:  # a file object: np.save would add ".npy" to the name
        np.save(f, np.full_like(kept, 7.0))
    resumed = cli(*args, "--long-text-mode", "truncate", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after 100 texts" in resumed.stderr
    with tiny_server.client() as client:
        want = client.embed(texts[100:], max_tokens=20)
    got = np.load(out)
    assert got.shape == (151, 128) and not part.exists()
    assert (got[:100] == 7.0).all()
    np.testing.assert_allclose(got[100:], want, rtol=0, atol=1e-5)


def test_a_refused_text_is_named_by_its_place_and_line_in_the_input_also_when_resumed(
        tiny_server: RunningServer, tmp_path: Path) -> None:
    lines = [f"line {i} of the input" for i in range(40)]
    lines[1] = ""  # blank lines are skipped: text 30 is on line 32
    lines[31] = "\u200b"  # a zero-width space alone: no token to embed
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n")
    args = ("embed", "--target", tiny_server.target, "--input", str(tmp_path / "in.txt"), "--output",
            str(tmp_path / "out.npy"), "--batch-size", "5", "--quiet")
    failed = cli(*args)
    assert failed.returncode == 1 and "texts[30] (line 32)" in failed.stderr, failed.stderr
    assert np.load(tmp_path / "out.npy.part").shape == (30, 128)
    resumed = cli(*args, "--resume")  # counts on from the 30 texts kept, not from 0
    assert resumed.returncode == 1 and "resuming after 30 texts" in resumed.stderr
    assert "texts[30] (line 32)" in resumed.stderr, resumed.stderr


def test_resume_of_jsonl_checks_it_continues_the_same_input(tiny_server: RunningServer, tmp_path: Path) -> None:
    records = [{"id": i, "text": f"record {i}"} for i in range(30)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out, part = tmp_path / "out.jsonl", tmp_path / "out.jsonl.part"
    # What an interrupted run leaves: complete lines, then half a line.
    with tiny_server.client() as client:
        first = client.embed([r["text"] for r in records[:12]])
    done = zip(records[:12], first.tolist(), strict=True)
    part.write_text("".join(json.dumps({**r, "embedding": v}) + "\n" for r, v in done) + '{"id": 12, "te')
    write_run_record(part)
    args = ("embed", "--target", tiny_server.target, "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
            "--quiet", "--resume")
    run = cli(*args)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(30))
    with tiny_server.client() as client:
        want = client.embed([r["text"] for r in records])
    np.testing.assert_allclose(np.array([line["embedding"] for line in lines]), want, rtol=0, atol=1e-5)

    part.write_text(json.dumps({"id": 0, "text": "another input", "embedding": [0.0]}) + "\n")
    write_run_record(part)
    other = cli(*args)
    assert other.returncode == 1 and "does not continue this input" in other.stderr
    assert part.exists()  # left as it was, for the user to decide


def test_input_with_a_bom_is_read_as_text(tiny_server: RunningServer, tmp_path: Path) -> None:
    records = [{"id": i, "text": f"record {i}"} for i in range(3)]
    (tmp_path / "in.jsonl").write_bytes(("\ufeff" + "".join(json.dumps(r) + "\n" for r in records)).encode())
    out = tmp_path / "out.jsonl"
    run = cli("embed", "--target", tiny_server.target, "--input", str(tmp_path / "in.jsonl"), "--output", str(out),
              "--quiet")
    assert run.returncode == 0, run.stderr
    assert [{k: v for k, v in json.loads(line).items() if k != "embedding"}
            for line in out.read_text().splitlines()] == records


def test_a_closed_pipe_ends_quietly(tiny_server: RunningServer) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written, as after `| head -1`
    try:
        run = subprocess.run([sys.executable, "-m", "client", "info", "--target", tiny_server.target],
                             stdout=write_end, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write_end)
    assert run.stderr == ""
    assert run.returncode == 128 + signal.SIGPIPE


def test_input_named_as_a_pipe_is_read_once(tiny_server: RunningServer, tmp_path: Path) -> None:
    # /dev/stdin (like <(cmd) or a FIFO) is a pipe: counting its lines for the progress bar drained it, and the
    # run wrote 0 rows with exit status 0.
    texts = [f"piped line {i}" for i in range(30)]
    out = tmp_path / "out.npy"
    run = cli("embed", "--target", tiny_server.target, "--input", "/dev/stdin", "--output", str(out),
              stdin="".join(t + "\n" for t in texts))
    assert run.returncode == 0, run.stderr
    with tiny_server.client() as client:
        want = client.embed(texts)
    np.testing.assert_allclose(np.load(out), want, rtol=0, atol=1e-5)


def test_stdin_is_read_as_utf8_whatever_the_locale(tiny_server: RunningServer, tmp_path: Path) -> None:
    out = tmp_path / "out.npy"
    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}  # as a Windows pipe or a non-UTF-8 locale decodes stdin
    run = subprocess.run([sys.executable, "-m", "client", "embed", "--target", tiny_server.target, "--input", "-",
                          "--output", str(out), "--quiet"], input="café\nnaïve\n".encode(), capture_output=True,
                         cwd=ROOT, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    with tiny_server.client() as client:
        want = client.embed(["café", "naïve"])
    np.testing.assert_allclose(np.load(out), want, rtol=0, atol=1e-5)
    bad = subprocess.run([sys.executable, "-m", "client", "embed", "--target", tiny_server.target, "--input", "-",
                          "--output", str(tmp_path / "bad.npy"), "--quiet"], input=b"fine\ncaf\xe9\n",
                         capture_output=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 1 and b"is not UTF-8 text: byte 0xe9" in bad.stderr, bad.stderr
