"""Reading the files a start-up flag names (TLS material, token files): one clear error when one cannot be read.
No grpc here: the supervisor of --workers reads the settings too (server.config)."""

from __future__ import annotations

from pathlib import Path

from server.errors import StartupError


def read_file(path: str, what: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read the {what} {path} ({flag}): {exc.strerror}") from None
