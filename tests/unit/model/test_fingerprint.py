"""The model digest: the same for copies of the same files and settings, another when anything that decides the
vectors changes while the weights stay."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from server.model.fingerprint import model_digest
from tools.checkpoint import write_tiny_nomic

SETTINGS = {"pooling": "mean", "max_input_tokens": 8192, "rotary_scaling_factor": 2.0}


def test_copies_agree_and_any_change_that_decides_vectors_shows(tmp_path: Path) -> None:
    first = write_tiny_nomic(tmp_path / "a")
    copy = shutil.copytree(first, tmp_path / "b")
    digest = model_digest(first, "w" * 16, SETTINGS)
    assert len(digest) == 16 and model_digest(copy, "w" * 16, SETTINGS) == digest
    assert model_digest(first, "x" * 16, SETTINGS) != digest
    assert model_digest(first, "w" * 16, {**SETTINGS, "max_input_tokens": 512}) != digest
    assert model_digest(first, "w" * 16, {**SETTINGS, "rotary_scaling_factor": 0.0}) != digest
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rotary_emb_base": 10_000}))
    assert model_digest(copy, "w" * 16, SETTINGS) != digest
    shutil.copytree(first, copy, dirs_exist_ok=True)
    (copy / "vocab.txt").write_text((first / "vocab.txt").read_text().replace("[UNK]", "[unk]"))
    assert model_digest(copy, "w" * 16, SETTINGS) != digest
    (copy / "vocab.txt").unlink()  # a file left out counts as well
    assert model_digest(copy, "w" * 16, SETTINGS) != digest
