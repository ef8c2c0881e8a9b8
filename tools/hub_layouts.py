"""A checkpoint folder laid out the ways users keep models: the Hugging Face cache, an `hf download
--local-dir` folder and a sentence-transformers `save()` directory.

The cache is written as huggingface_hub writes it (content-addressed `blobs/`, `snapshots/<commit>/` of
relative symlinks, `refs/<name>` holding a commit) and checked with huggingface_hub's own cache scanner; the
local-dir metadata with huggingface_hub's own writer; the sentence-transformers directory by
sentence-transformers itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import scan_cache_dir
from huggingface_hub._local_folder import write_download_metadata

REPO_ID = "nomic-ai/nomic-embed-text-v1.5"


def fake_commit(label: str) -> str:
    """A 40-hex commit id, stable per label."""
    return hashlib.sha1(label.encode()).hexdigest()


def _files(source: Path) -> list[Path]:
    return sorted(p.relative_to(source) for p in source.rglob("*") if p.is_file() and ".cache" not in p.parts)


def write_hf_cache(hf_home: Path, source: Path, *, commit: str, refs: Mapping[str, str] | None = None,
                   repo_id: str = REPO_ID) -> Path:
    """Add `source`'s files as snapshot `commit` of `repo_id` to the cache under `hf_home`; returns the snapshot.

    `refs` maps branch or tag names to commits (default: main -> commit). Call again with another commit to
    add a second revision of the same repo.
    """
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for rel in _files(source):
        data = (source / rel).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()  # LFS files are named by their sha256
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for name, target in (refs if refs is not None else {"main": commit}).items():
        ref = repo / "refs" / name
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(target)  # no newline, as huggingface_hub writes it
    report = scan_cache_dir(hf_home / "hub")
    if report.warnings:
        raise AssertionError(f"huggingface_hub does not accept the cache: {report.warnings}")
    return snapshot


def write_local_dir(dest: Path, source: Path, *, commit: str) -> Path:
    """What `hf download REPO --local-dir dest` leaves: the files, and `.cache/huggingface/` metadata."""
    for rel in _files(source):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / rel, dest / rel)
        etag = hashlib.sha256((source / rel).read_bytes()).hexdigest()
        write_download_metadata(dest, rel.as_posix(), commit, etag)
    return dest


def write_sentence_transformers_save(dest: Path, source: Path) -> Path:
    """sentence-transformers' own `save()` of the model loaded from `source`."""
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(str(source), device="cpu").save(str(dest))
    return dest


__all__ = ["REPO_ID", "fake_commit", "write_hf_cache", "write_local_dir", "write_sentence_transformers_save"]
