"""Running the client's CLI the way a user does, and watching what it writes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from numpy.lib import format as npy_format

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "client", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def write_run_record(part: Path, **changes: object) -> None:
    """The OUTPUT.part.json a run with the default options (JSONL in, JSONL out) leaves beside its part."""
    record = {"task": "search_document", "dimensions": 0, "long_text_mode": "truncate", "max_tokens": 0,
              "encoding": "float32", "output_format": ".jsonl", "input_format": "jsonl", "text_field": "text",
              "model_id": None, "variant": None}
    part.with_name(part.name + ".json").write_text(json.dumps({**record, **changes}))


def npy_rows(path: Path, width: int) -> int:
    """Complete float32 rows in a .npy file being written (0 while it has no header yet)."""
    try:
        with open(path, "rb") as f:
            npy_format.read_magic(f)
            npy_format.read_array_header_1_0(f)
            header = f.tell()
    except (OSError, ValueError):
        return 0
    return (path.stat().st_size - header) // (width * 4)


def wait_for(condition: object, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def feed(cli: subprocess.Popen[str], lines: list[str]) -> None:
    assert cli.stdin is not None
    try:
        cli.stdin.write("".join(line + "\n" for line in lines))
        cli.stdin.flush()
    except BrokenPipeError:
        pass  # the CLI has exited: its exit status and error are checked at the end
