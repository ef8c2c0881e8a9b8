"""Logging setup: text or JSON lines, each carrying the id of the request that wrote it, if any."""

from __future__ import annotations

import json
import logging
import re
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

FORMATS = ("text", "json")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Set per RPC by server.transport.request_ids; each RPC runs in a task of its own, so the value never leaks into
# another call, and tasks a handler starts inherit it.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


# A caller's id may hold any printable ASCII (server.transport.request_ids): one with a space, a bracket, a quote
# or a backslash is written quoted, with `"` and `\` escaped, so it cannot end the field or forge another.
_NEEDS_QUOTES = re.compile(r'[\s\[\]"\\]')


def text_field(value: str) -> str:
    """`value` as it stands in a text line: bare, or double-quoted with each double quote and backslash escaped
    by a backslash."""
    if not value or _NEEDS_QUOTES.search(value):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, with ` [request_id=...]` inside a request (text_field); a worker of
    --workers says which it is: `time LEVEL worker N logger: message`."""

    def __init__(self, worker: int | None = None) -> None:
        tag = "" if worker is None else f"worker {worker} "
        super().__init__(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = REQUEST_ID.get()
        return line if request_id is None else f"{line} [request_id={text_field(request_id)}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (UTC, ISO 8601), level, logger, message, request_id inside a
    request, the `fields` a caller passed as `extra={"fields": {...}}`, and exception text if any; `worker` in
    a worker of --workers."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", fmt: str = "text", stream: IO[str] | None = None,
              worker: int | None = None) -> None:
    """Route every logger (and Python warnings) to one stderr handler in the chosen format."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {FORMATS}, not {fmt!r}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else TextFormatter(worker))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # library warnings become log lines too, in the same format
