"""Texts in (lines or JSONL, a file or stdin) and embeddings out (.npy or .jsonl) for the command line."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
from numpy.lib import format as npy_format

JSONL_SUFFIXES = (".jsonl", ".ndjson")
Record = dict[str, Any]


class InputError(ValueError):
    """The input file cannot be read as texts; the message names the line."""


def open_input(path: str) -> IO[str]:
    return sys.stdin if path == "-" else open(path, encoding="utf-8")  # closed by the caller


def count_texts(path: str) -> int | None:
    """Non-blank lines of a file (a progress bar's total), None for stdin."""
    if path == "-":
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def read_records(lines: IO[str], *, jsonl: bool | None, text_field: str = "text") -> Iterator[tuple[str, Record]]:
    """(text, record) per non-blank line: a record is the JSON object of a JSONL line, else {"text": line}.

    `jsonl=None` decides from the first non-blank line: JSONL when it is an object with `text_field`.
    """
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if jsonl is None:
            jsonl = _looks_like_jsonl(line, text_field)
        if not jsonl:
            yield line, {"text": line}
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"line {number}: not JSON ({exc.msg})") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise InputError(f"line {number}: expected a JSON object with a string field {text_field!r}")
        yield text, record


def _looks_like_jsonl(line: str, text_field: str) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and isinstance(record.get(text_field), str)


class EmbeddingWriter(Protocol):
    def write(self, records: list[Record], embeddings: np.ndarray) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


class _PartFile:
    """Writes PATH.part and renames it to PATH when finished, so a failed run leaves no half file."""

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        self.file = open(self.part, mode)  # noqa: SIM115  # closed by finish or abort

    def finish(self) -> None:
        self.file.close()
        os.replace(self.part, self.path)

    def abort(self) -> None:
        self.file.close()
        self.part.unlink(missing_ok=True)


class NpyWriter(_PartFile):
    """Rows appended to a .npy file whose header gets the final row count at the end."""

    def __init__(self, path: Path, dtype: np.dtype, width: int) -> None:
        super().__init__(path, "wb")
        self.dtype, self.width, self.rows = np.dtype(dtype), width, 0
        self._header_bytes = self._write_header()

    def _write_header(self) -> int:
        self.file.seek(0)
        header = {"descr": npy_format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, self.width)}
        npy_format.write_array_header_1_0(self.file, header)
        return self.file.tell()

    def write(self, records: list[Record], embeddings: np.ndarray) -> None:
        if embeddings.shape[1:] != (self.width,):
            raise ValueError(f"rows of width {embeddings.shape[1:]} do not fit a file of width {self.width}")
        self.file.write(np.ascontiguousarray(embeddings, self.dtype).tobytes())
        self.rows += len(embeddings)

    def finish(self) -> None:
        # The header is padded to 64 bytes, so any row count of up to 12 digits fits in the same space.
        if self._write_header() != self._header_bytes:
            raise RuntimeError("the .npy header changed size")
        super().finish()


class JsonlWriter(_PartFile):
    """One JSON object per text: its input record plus "embedding"."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "w")

    def write(self, records: list[Record], embeddings: np.ndarray) -> None:
        for record, vector in zip(records, embeddings.tolist(), strict=True):
            self.file.write(json.dumps({**record, "embedding": vector}, ensure_ascii=False) + "\n")


def open_output(path: str, dtype: np.dtype, width: int) -> EmbeddingWriter:
    target = Path(path)
    if target.suffix == ".npy":
        return NpyWriter(target, dtype, width)
    if target.suffix in JSONL_SUFFIXES:
        return JsonlWriter(target)
    raise ValueError(f"--output {path}: use a .npy or .jsonl file")
