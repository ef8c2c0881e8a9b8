"""Texts in (lines or JSONL, a file or stdin) and embeddings out (.npy or .jsonl) for the command line."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
from numpy.lib import format as npy_format

try:
    import fcntl
except ImportError:  # Windows: parts are not locked there
    fcntl = None  # type: ignore[assignment]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
Record = dict[str, Any]


class InputError(ValueError):
    """The input file cannot be read as texts; the message names the line."""


def open_input(path: str) -> IO[str]:
    """The file (or stdin) as UTF-8 text, whatever the locale says; lines end at "\n" or "\r\n" only (see
    text_lines). Closed by the caller."""
    if path != "-":
        return open(path, encoding="utf-8", newline="\n")
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:  # stdin replaced by a text stream (the CLI run inside another program): as it is
        return sys.stdin
    return io.TextIOWrapper(buffer, encoding="utf-8", newline="\n")


def count_texts(path: str) -> int | None:
    """Non-blank lines of a regular file (a progress bar's total); None for stdin, a pipe (`<(cmd)`,
    /dev/stdin, a FIFO) or a device, which a second reader would drain or wait on."""
    if path == "-" or not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def text_lines(lines: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(1-based line number, line) per non-blank line, without its line end ("\n", "\r\n") and without the
    UTF-8 byte order mark some editors put at the start of a file.

    Lines end at "\n" or "\r\n" only: a lone "\r" is part of its line, so rows stay aligned with the lines
    other tools count. A file opened in Python's default universal newlines mode would split there, so a
    text file not read yet is switched to newline="\n" (open files with newline="\n" to be sure)."""
    if isinstance(lines, io.TextIOWrapper):
        with contextlib.suppress(io.UnsupportedOperation, ValueError):  # already read from: as it is
            lines.reconfigure(newline="\n")
    number = 0
    try:
        for number, line in enumerate(lines, 1):
            line = line.removesuffix("\n").removesuffix("\r")
            if number == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():  # blank: nothing to embed (the server refuses an empty text)
                yield number, line
    except UnicodeDecodeError as exc:
        raise InputError(_not_utf8(getattr(lines, "name", None), number, exc)) from None


def _not_utf8(name: object, read: int, error: UnicodeDecodeError) -> str:
    """Where a text input is not UTF-8: its line, from the file's bytes, since a file is decoded a chunk at a
    time (the bad byte is somewhere past the `read` lines); past those lines for a stream such as stdin."""
    fix = "convert it, e.g. iconv -f latin1 -t utf-8"
    if isinstance(name, str) and os.path.isfile(name):
        with open(name, "rb") as raw:
            for number, line in enumerate(raw, 1):  # UTF-8 never has a 0x0a inside a character
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as bad:
                    return (f"{name}: line {number} is not UTF-8 text: byte 0x{line[bad.start]:02x} at byte "
                            f"{bad.start + 1} of the line ({bad.reason}); {fix}")
    where = f"after line {read}" if read else "near its start"
    return f"{name or 'the input'} is not UTF-8 text: byte 0x{error.object[error.start]:02x} {where}; {fix}"


def jsonl_format(path: str, format: str) -> bool | None:
    """--format as read_records' `jsonl`: an input named .jsonl or .ndjson is JSONL unless --format lines."""
    if format == "auto" and Path(path).suffix.lower() in JSONL_SUFFIXES:
        return True
    return {"auto": None, "lines": False, "jsonl": True}[format]


def read_records(lines: IO[str], *, jsonl: bool | None,
                 text_field: str = "text") -> Iterator[tuple[str, Record, int]]:
    """(text, record, 1-based line number) per non-blank line: a record is the JSON object of a JSONL line, else
    {"text": line}.

    `jsonl=None` (auto, for an input not named .jsonl or .ndjson) decides from the first non-blank line:
    JSONL when it is an object with `text_field`. In JSONL, every line must be an object with a string
    `text_field`: any other line is refused, naming its number (never embedded as raw JSON).
    """
    for number, line in text_lines(lines):
        if jsonl is None:
            jsonl = _looks_like_jsonl(line, text_field)
        if not jsonl:
            yield line, {"text": line}, number
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"line {number}: not JSON ({exc.msg})") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise InputError(f"line {number}: expected a JSON object with a string field {text_field!r}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a JSON escape of half a surrogate pair, e.g. "\ud800"
                raise InputError(f"line {number}: {text_field!r} is not valid Unicode: a lone surrogate at "
                                 f"character {exc.start} cannot be sent as UTF-8") from None
        yield text, record, number


def _looks_like_jsonl(line: str, text_field: str) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and isinstance(record.get(text_field), str)


class EmbeddingWriter(Protocol):
    part: Path  # where rows go until the run is finished
    rows: int  # rows in the file, those of a resumed run included

    def write(self, records: list[Record], embeddings: np.ndarray) -> None: ...
    def continues(self, index: int, record: Record) -> bool: ...
    def finish(self) -> None: ...
    def stop(self) -> bool: ...


def check_not_in_use(part: Path) -> None:
    """Refuse, before anything else is said about it, a part another run is writing (it holds the part's lock),
    and a part that is a link to nothing."""
    if part.is_symlink() and not part.exists():
        raise InputError(f"{part} is a link to nothing: remove it")
    if fcntl is None:
        return
    try:
        fd = os.open(part, os.O_RDONLY | os.O_NONBLOCK)  # never waits, even on a FIFO
    except OSError:  # none there (or unreadable: opening it to write says why)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(part) from None
    finally:
        os.close(fd)


def _busy(part: Path) -> InputError:
    return InputError(f"{part} is being written by another run of this output: wait for it to end, or stop it, "
                      "before resuming or removing it")


class _PartFile:
    """Writes PATH.part, flushed after every batch, and renames it to PATH when the run is finished.

    A failed or interrupted run keeps PATH.part when it holds rows: `resume=True` opens it again, drops an
    incomplete last row (a run killed mid-write) and appends, so work done is never done twice. The part is
    created anew only where none exists and is locked while open: a second run on the same output, resumed or
    not, is refused instead of writing into the first one's rows.
    """

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.part = path.with_name(path.name + ".part")
        check_not_in_use(self.part)
        if self.part.exists() and not resume:  # never overwrite finished work unasked
            raise InputError(f"{self.part} exists, left by an earlier run: add --resume to continue it, or remove it "
                             "to start over")
        self.resumed = resume and self.part.exists()
        busy = _busy(self.part)
        try:
            self.file = open(self.part, "r+b" if self.resumed else "xb")  # noqa: SIM115  # closed by finish or stop
        except FileExistsError:  # created meanwhile
            raise busy from None
        try:
            if fcntl is not None:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.path.samestat(os.fstat(self.file.fileno()), os.stat(self.part)):
                raise BlockingIOError  # the run that held it renamed it to PATH meanwhile
        except (BlockingIOError, FileNotFoundError):
            self.file.close()
            raise busy from None
        self.rows = 0

    def continues(self, index: int, record: Record) -> bool:
        """Whether row `index` kept from an earlier run belongs to `record` (True when it cannot tell)."""
        return True

    def _resume(self) -> None:
        """Count the complete rows of an earlier run's PATH.part and drop what follows them."""
        raise NotImplementedError

    def _resume_or_close(self) -> None:
        try:
            self._resume()
        except BaseException:
            self.file.close()
            raise

    def _abandon(self) -> None:
        """Opening failed: close the part, and remove it unless it holds an earlier run's rows."""
        self.file.close()
        if not self.resumed:
            self.part.unlink(missing_ok=True)

    def _truncate(self, size: int) -> None:
        self.file.seek(size)
        self.file.truncate()

    def finish(self) -> None:
        os.replace(self.part, self.path)  # still locked: no other run opens it as a part meanwhile
        self.file.close()

    def stop(self) -> bool:
        """End a run that failed: keep PATH.part (True) when it holds rows, else remove it."""
        self.file.close()
        if self.rows:
            return True
        self.part.unlink(missing_ok=True)
        return False


class NpyWriter(_PartFile):
    """Rows appended to a .npy file whose header is brought up to date after every batch, so PATH.part is
    a valid .npy of the rows written so far.

    A .npy row holds no text, so PATH.part.texts keeps an 8-byte hash of each row's input record, written
    before the row: a resume is refused when the input's record at any kept row is another."""

    def __init__(self, path: Path, dtype: np.dtype, width: int, resume: bool = False) -> None:
        super().__init__(path, resume)
        self.dtype, self.width = np.dtype(dtype), width
        self.hashes_path = self.part.with_name(self.part.name + ".texts")
        self._kept_hashes = b""  # of the rows kept from an earlier run, where known
        if self.resumed:
            self._resume_or_close()
        try:
            self._header_bytes = self._write_header()
            self.file.seek(0, os.SEEK_END)
            self.hashes = open(self.hashes_path, "ab" if self.resumed else "wb")  # noqa: SIM115  # closed with the part
        except BaseException:  # e.g. a full disk: a part of no rows would block the next run
            self._abandon()
            raise

    def continues(self, index: int, record: Record) -> bool:
        kept = self._kept_hashes[8 * index : 8 * index + 8]
        return not kept or kept == _record_hash(record)

    def finish(self) -> None:
        self.hashes.close()
        self.hashes_path.unlink(missing_ok=True)  # before the part is renamed: a new run's part may follow it
        super().finish()

    def stop(self) -> bool:
        self.hashes.close()
        kept = super().stop()
        if not kept:
            self.hashes_path.unlink(missing_ok=True)
        return kept

    def _resume(self) -> None:
        try:
            version = npy_format.read_magic(self.file)
            read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, fortran_order, dtype = read(self.file)
        except ValueError as exc:
            raise InputError(f"{self.part} cannot be resumed: not a .npy file ({exc})") from None
        header = self.file.tell()
        if fortran_order or dtype != self.dtype or len(shape) != 2 or shape[1] != self.width:
            raise InputError(f"{self.part} holds {dtype} rows of shape {shape[1:]} where this run writes {self.dtype} "
                             f"rows of {self.width}: not this run's output; remove it to start over")
        if header != self._header_size():
            raise InputError(f"{self.part} cannot be resumed: its .npy header is not the one this client writes")
        row_bytes = self.width * self.dtype.itemsize
        rows = (os.fstat(self.file.fileno()).st_size - header) // row_bytes
        try:
            hashes = self.hashes_path.read_bytes()
        except FileNotFoundError:
            if rows:
                raise InputError(f"{self.part} cannot be resumed: {self.hashes_path.name}, the record of the texts "
                                 "its rows are of, is missing; remove it to start over") from None
            hashes = b""
        # Hashes are written before their rows, so a row without one (a torn write, a file extended by
        # anything but this client) is not kept; nor is a hash without its row.
        self.rows = min(rows, len(hashes) // 8)
        self._truncate(header + self.rows * row_bytes)
        self._kept_hashes = hashes[: 8 * self.rows]
        with open(self.hashes_path, "ab") as file:
            file.truncate(8 * self.rows)

    def _header_size(self) -> int:
        buffer = io.BytesIO()
        self._write_header_to(buffer)
        return buffer.tell()

    def _write_header_to(self, file: IO[bytes]) -> None:
        header = {"descr": npy_format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.rows, self.width)}
        npy_format.write_array_header_1_0(file, header)

    def _write_header(self) -> int:
        self.file.seek(0)
        self._write_header_to(self.file)
        return self.file.tell()

    def write(self, records: list[Record], embeddings: np.ndarray) -> None:
        if embeddings.shape[1:] != (self.width,):
            raise ValueError(f"rows of width {embeddings.shape[1:]} do not fit a file of width {self.width}")
        self.hashes.write(b"".join(map(_record_hash, records)))
        self.hashes.flush()
        self.file.write(np.ascontiguousarray(embeddings, self.dtype).tobytes())
        self.rows += len(embeddings)
        # Rows first, then the count that covers them: a run killed in between leaves rows a resume still finds.
        # The header is padded to 64 bytes, so any row count of up to 12 digits fits in the same space.
        if self._write_header() != self._header_bytes:
            raise RuntimeError("the .npy header changed size")
        self.file.seek(0, os.SEEK_END)
        self.file.flush()


def _record_hash(record: Record) -> bytes:
    return hashlib.blake2b(json.dumps(record, sort_keys=True, ensure_ascii=False).encode(), digest_size=8).digest()


class JsonlWriter(_PartFile):
    """One JSON object per text: its input record plus "embedding"."""

    def __init__(self, path: Path, resume: bool = False) -> None:
        super().__init__(path, resume)
        self._last: Record | None = None  # the last record kept from an earlier run
        if self.resumed:
            self._resume_or_close()

    def _resume(self) -> None:
        size, last = 0, b""
        for line in self.file:
            if not line.endswith(b"\n"):  # cut short by a run that was killed
                break
            size, last = size + len(line), line
            self.rows += 1
        self._truncate(size)
        if last:
            try:
                record = json.loads(last)
            except json.JSONDecodeError as exc:
                raise InputError(f"{self.part} line {self.rows}: not JSON ({exc.msg}); remove it to start "
                                 "over") from None
            self._last = {k: v for k, v in record.items() if k != "embedding"} if isinstance(record, dict) else {}

    def continues(self, index: int, record: Record) -> bool:
        """Only the last kept row is compared: its record is in the file, the others would cost parsing all."""
        return index != self.rows - 1 or self._last is None or self._last == {
            k: v for k, v in record.items() if k != "embedding"}

    def write(self, records: list[Record], embeddings: np.ndarray) -> None:
        lines = (json.dumps({**record, "embedding": vector}, ensure_ascii=False) + "\n"
                 for record, vector in zip(records, embeddings.tolist(), strict=True))
        self.file.write("".join(lines).encode())
        self.rows += len(records)
        self.file.flush()


def open_output(path: str, dtype: np.dtype, width: int, *, resume: bool = False) -> EmbeddingWriter:
    """A writer of PATH.part; `resume` continues the PATH.part an earlier run left, when there is one."""
    target = Path(path)
    if target.is_dir():  # found only at the end, renaming the finished part, after all the work
        raise InputError(f"--output {path} is a directory; name a .npy or .jsonl file")
    if target.suffix == ".npy":
        return NpyWriter(target, dtype, width, resume)
    if target.suffix in JSONL_SUFFIXES:
        return JsonlWriter(target, resume)
    raise ValueError(f"--output {path}: use a .npy or .jsonl file")


def numbered(lines: Iterable[tuple[int, str]], keep: Callable[[int], None]) -> Iterator[str]:
    """The texts of (line number, text) pairs; `keep` hears each line number, in order."""
    for number, text in lines:
        keep(number)
        yield text

