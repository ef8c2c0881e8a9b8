"""Reading the files a start-up flag names (TLS material, token files): one clear error when one cannot be read.
No grpc here: the supervisor of --workers reads the settings too (server.config)."""

from __future__ import annotations

import os
import stat

from server.errors import StartupError

# Certificates, keys and token lists are kilobytes; a megabyte leaves room for long CA bundles.
MAX_BYTES = 2**20


def read_file(path: str, what: str, flag: str) -> bytes:
    """The file's bytes; a FIFO or device (whose read could wait or never end) or a file over MAX_BYTES is
    refused without reading it."""
    where = f"the {what} {path} ({flag})"
    try:
        kind = os.stat(path).st_mode
        if not stat.S_ISREG(kind):
            raise StartupError(f"{where} is not a regular file")
        with open(path, "rb") as file:
            data = file.read(MAX_BYTES + 1)
    except OSError as exc:
        raise StartupError(f"cannot read {where}: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise StartupError(f"{where} is larger than {MAX_BYTES // 2**20} MiB: is it the right file?")
    return data
