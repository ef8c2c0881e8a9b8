"""Weight files that a damaged download leaves, refused before loading: they load, and give wrong vectors.

- A Hugging Face cache blob is named by its content's sha256 (the hub's ETag of an LFS file), and
  `hf download --local-dir` records that sha256 in `.cache/huggingface/download/<file>.metadata`: a file
  whose content no longer has that hash was cut, zero-filled or overwritten.
- Anywhere, a run of zero bytes (an aligned 64 KiB block of them) where trained weights lie: what a
  pre-allocated download that stopped leaves. Trained float weights have no such runs (shorter runs, as a lost
  4 KiB disk block leaves, go unseen: an embedding row of zeros may be real).
- A weight tensor that is all zeros (a LayerNorm scale of zeros gives every text the same vector). Biases
  may be zero, so they are not checked.

And after loading, the warm-up's vectors (check_warm_up): finite, and telling two texts apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from server.errors import StartupError

ZERO_BLOCK = 64 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_METADATA = Path(".cache") / "huggingface" / "download"


def check_weights(path: Path) -> str:
    """Refuse damaged *.safetensors files in `path` (StartupError); returns the weights' digest: the
    first 16 hex digits of a sha256 over each file's name and sha256 (weights replaced at the same path, or a
    cache's new revision, give another digest)."""
    lines = []
    for file in sorted(path.glob("*.safetensors")):
        with file.open("rb") as f:
            sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        _check_recorded_hash(path, file, sha256)
        _check_zeros(file)
        lines.append(f"{file.name} {sha256}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]


def _check_recorded_hash(folder: Path, file: Path, sha256: str) -> None:
    blob = file.resolve()
    if blob != file.absolute() and blob.parent.name == "blobs" and _SHA256.fullmatch(blob.name):
        if blob.name != sha256:
            raise StartupError(
                f"{file} is damaged: its cache blob {blob} should have sha256 {blob.name}, its content has "
                f"{sha256} (an interrupted or altered download); delete the blob and download it again")
        return
    recorded = _local_dir_sha256(folder, file)
    if recorded is not None and recorded != sha256:
        raise StartupError(
            f"{file} is damaged: its download recorded sha256 {recorded} (in {folder / _METADATA}), its content "
            f"has {sha256} (an interrupted or altered download); download it again")


def _local_dir_sha256(folder: Path, file: Path) -> str | None:
    """The sha256 `hf download --local-dir` recorded for `file`, unless the file changed after it was recorded
    (huggingface_hub's own rule: then the record is stale, not the file wrong)."""
    record = folder / _METADATA / f"{file.name}.metadata"
    try:
        _commit, etag, timestamp = record.read_text().splitlines()[:3]
        fresh = file.stat().st_mtime - 1 <= float(timestamp)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    etag = etag.strip().strip('"')
    return etag if fresh and _SHA256.fullmatch(etag) else None


def _check_zeros(file: Path) -> None:
    """Aligned blocks of zero bytes among the tensors, then weights of zeros: one mapping of the file, read from
    safetensors' own layout (8 bytes of header length, a JSON header of data offsets, then the data)."""
    data = np.memmap(file, dtype=np.uint8, mode="r")
    header = 8 + int(data[:8].view("<u8")[0])
    start = -(-header // ZERO_BLOCK) * ZERO_BLOCK
    blocks = max(0, (data.size - start) // ZERO_BLOCK)
    words = data[start : start + blocks * ZERO_BLOCK].view(np.uint64).reshape(blocks, ZERO_BLOCK // 8)
    for first in range(0, blocks, 256):  # 16 MiB at a time: bounded memory for the temporary
        empty = np.flatnonzero(~words[first : first + 256].any(axis=1))
        if empty.size:
            offset = start + (first + int(empty[0])) * ZERO_BLOCK
            raise StartupError(
                f"{file} is damaged: {ZERO_BLOCK // 1024} KiB of zero bytes at offset {offset} of {data.size}, where "
                "its weights lie (a download that stopped early?); download it again")
    tensors = json.loads(bytes(data[8:header]))
    for key, tensor in tensors.items():
        if key == "__metadata__" or key.endswith("bias") or not str(tensor["dtype"]).startswith(("F", "BF")):
            continue
        begin, end = tensor["data_offsets"]
        # As bytes: +0.0 is all zero bits in every float format.
        if math.prod(tensor["shape"]) > 1 and not data[header + begin : header + end].any():
            raise StartupError(f"{file} is damaged: its weight {key} is all zeros (a download that stopped "
                               "early, or an edited file); download it again")


def check_warm_up(run: Callable[[], np.ndarray], text: str) -> None:
    """Refuse a model that fails to run `run` (the pooled vectors of `text` and of it less one token), or
    whose vectors are not finite, or tell the two apart no more than rounding does (or have no direction):
    its vectors would say nothing of the texts."""
    try:
        vectors = run()
    except Exception as exc:  # e.g. a variant's kernel that cannot take this model's shapes
        raise StartupError(f"the model fails on the warm-up text {text!r}: {type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:300]}") from None
    if not np.isfinite(vectors).all():
        raise StartupError(f"the model gives NaN or infinity for the warm-up text {text!r}: its weights (or the "
                           "variant's arithmetic) are broken, so no vector it makes can be trusted")
    centred = vectors.astype(np.float64) - vectors.mean(axis=1, keepdims=True)  # what layer_norm keeps
    size = np.linalg.norm(centred, axis=1)
    if not size.all() or np.linalg.norm(centred[0] - centred[1]) <= 1e-6 * size[0]:
        # What damaged weights give: a last LayerNorm scale of zeros (or too small to count) makes every token
        # that norm's bias, so every text the same vector (up to the pooling's rounding); weights of zeros, none.
        raise StartupError("the model gives two different warm-up texts the same vector, or a vector with no "
                           "direction (all components equal): its weights are damaged (zeros?), so its vectors "
                           "say nothing of the texts")
