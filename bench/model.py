"""A full-size NomicBERT checkpoint with random weights, in the original hub layout, made once per cache."""

from __future__ import annotations

import shutil
from pathlib import Path

from tools.checkpoint import write_tiny_nomic

# nomic-embed-text-v1.5's shape: 137M parameters, trained on 2048 positions.
FULL_SIZE = {"hidden": 768, "layers": 12, "heads": 12, "inner": 3072, "max_trained_positions": 2048}


def full_size_checkpoint(cache_dir: Path) -> Path:
    path = cache_dir / "nomic-bert-768x12-random-hub2026"  # the 2026 config.json, both key sets
    if (path / "config.json").exists():
        return path
    partial = cache_dir / (path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_tiny_nomic(partial, config_style="v5", **FULL_SIZE)  # config.json is written last
    partial.rename(path)
    return path
