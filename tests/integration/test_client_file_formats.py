"""Rows stay aligned with the input's lines: JSONL is decided by the input's name as well as its first line
(a raw JSON line is never embedded as text), and a lone "\r" inside a line does not split it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.cli import cli
from tools.servers import RunningServer


@pytest.mark.parametrize("first", ['{"id": -1}', '{"text": null}', '["text"]', '{"text": 3}'])
def test_a_jsonl_file_with_an_unusual_first_line_is_refused_not_embedded_as_lines(
        tiny_server: RunningServer, tmp_path: Path, first: str) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(first + "\n" + "".join(json.dumps({"id": i, "text": f"t {i}"}) + "\n" for i in range(3)))
    run = cli("embed", "--target", tiny_server.target, "--input", str(source), "--output",
              str(tmp_path / "out.npy"), "--quiet")
    assert run.returncode == 1 and "line 1" in run.stderr and "'text'" in run.stderr, run.stderr
    assert not list(tmp_path.glob("out.npy*"))


def test_a_bad_line_later_in_an_ndjson_file_is_named(tiny_server: RunningServer, tmp_path: Path) -> None:
    source = tmp_path / "in.ndjson"
    source.write_text('{"text": "fine"}\n\n{"text": ["no"]}\n')
    run = cli("embed", "--target", tiny_server.target, "--input", str(source), "--output",
              str(tmp_path / "out.npy"), "--quiet")
    assert run.returncode == 1 and "line 3" in run.stderr, run.stderr


def test_a_txt_file_whose_first_line_is_json_stays_lines_unless_told(tiny_server: RunningServer,
                                                                    tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text('{"id": -1}\nplain text\n')
    out = tmp_path / "out.npy"
    run = cli("embed", "--target", tiny_server.target, "--input", str(source), "--output", str(out), "--quiet")
    assert run.returncode == 0, run.stderr
    with tiny_server.client() as client:
        np.testing.assert_allclose(np.load(out), client.embed(['{"id": -1}', "plain text"]), rtol=0, atol=1e-5)
    as_jsonl = cli("embed", "--target", tiny_server.target, "--input", str(source), "--output",
                   str(tmp_path / "other.npy"), "--format", "jsonl", "--quiet")
    assert as_jsonl.returncode == 1 and "line 1" in as_jsonl.stderr


def test_a_lone_carriage_return_does_not_split_a_line(tiny_server: RunningServer, tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_bytes(b"one\rstill one\ntwo\r\n\nthree\n")
    texts = ["one\rstill one", "two", "three"]
    out = tmp_path / "out.npy"
    run = cli("embed", "--target", tiny_server.target, "--input", str(source), "--output", str(out), "--quiet")
    assert run.returncode == 0, run.stderr
    piped = cli("embed", "--target", tiny_server.target, "--input", "-", "--output", str(tmp_path / "piped.npy"),
                "--quiet", stdin=source.read_bytes().decode())
    assert piped.returncode == 0, piped.stderr
    with tiny_server.client() as client:
        want = client.embed(texts)
        np.testing.assert_allclose(np.load(out), want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.load(tmp_path / "piped.npy"), want, rtol=0, atol=1e-5)
        with open(source, encoding="utf-8") as f:  # Python's default: universal newlines
            batches = list(client.embed_stream(f, batch_size=2))
    assert [t for b in batches for t in b.texts] == texts
    assert [n for b in batches for n in b.line_numbers or []] == [1, 2, 4]
