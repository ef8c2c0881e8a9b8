"""Protobuf requests -> validated domain values. Every rule names the field and the limit it breaks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from nomic_embed.v1 import embed_pb2 as pb
from server.domain import EmbedOptions, Limits, LongTextMode, Task
from server.encoding import Encoding
from server.errors import InvalidInput

TASKS = {
    pb.TASK_SEARCH_DOCUMENT: Task.SEARCH_DOCUMENT,
    pb.TASK_SEARCH_QUERY: Task.SEARCH_QUERY,
    pb.TASK_CLUSTERING: Task.CLUSTERING,
    pb.TASK_CLASSIFICATION: Task.CLASSIFICATION,
    pb.TASK_RAW: Task.RAW,
}
MODES = {
    pb.LONG_TEXT_MODE_UNSPECIFIED: LongTextMode.TRUNCATE,
    pb.LONG_TEXT_MODE_TRUNCATE: LongTextMode.TRUNCATE,
    pb.LONG_TEXT_MODE_ERROR: LongTextMode.ERROR,
    pb.LONG_TEXT_MODE_MEAN: LongTextMode.MEAN,
}
ENCODINGS = {
    pb.ENCODING_UNSPECIFIED: Encoding.VALUES,
    pb.ENCODING_FLOAT32: Encoding.FLOAT32,
    pb.ENCODING_FLOAT16: Encoding.FLOAT16,
    pb.ENCODING_INT8: Encoding.INT8,
    pb.ENCODING_UBINARY: Encoding.UBINARY,
}
# Fewer tokens than this leave no room for a task prefix and text between the special tokens.
MIN_MAX_TOKENS = 16


@dataclass(frozen=True)
class ModelBounds:
    hidden_size: int
    min_dimensions: int


def parse_texts(texts: Sequence[str], limits: Limits) -> list[str]:
    if not texts:
        raise InvalidInput("texts", "at least one text is required")
    if len(texts) > limits.max_texts_per_request:
        raise InvalidInput("texts", f"{len(texts)} texts exceed the limit of {limits.max_texts_per_request} "
                                    "per request; split the batch or use EmbedStream")
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidInput(f"texts[{i}]", "empty text (only whitespace or nothing)")
        if len(text) > limits.max_text_chars:
            raise InvalidInput(f"texts[{i}]", f"{len(text)} characters exceed the limit of "
                                              f"{limits.max_text_chars}")
    return list(texts)


def parse_task(task: int) -> Task:
    try:
        return TASKS[task]
    except KeyError:
        valid = ", ".join(pb.Task.Name(t) for t in TASKS)
        shown = pb.Task.Name(task) if task in pb.Task.values() else str(task)
        raise InvalidInput("task", f"{shown} is not a task; choose one of {valid}") from None


def parse_encoding(encoding: int) -> Encoding:
    try:
        return ENCODINGS[encoding]
    except KeyError:
        valid = ", ".join(pb.Encoding.Name(e) for e in ENCODINGS)
        raise InvalidInput("encoding", f"{encoding} is not an encoding; choose one of {valid}") from None


def parse_embed_request(request: pb.EmbedRequest, limits: Limits, model: ModelBounds) -> tuple[list[str],
                                                                                               EmbedOptions]:
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidInput("texts", f"the request's {size} bytes exceed the limit of {limits.max_request_bytes} "
                                    "bytes per request; split the batch or use EmbedStream")
    texts = parse_texts(request.texts, limits)
    task = parse_task(request.task)
    dimensions = request.dimensions or model.hidden_size
    if not model.min_dimensions <= dimensions <= model.hidden_size:
        allowed = (f"{model.min_dimensions}..{model.hidden_size}" if model.min_dimensions < model.hidden_size
                   else f"{model.hidden_size} (this model has no Matryoshka widths)")
        raise InvalidInput("dimensions", f"{request.dimensions} is out of range; use 0 (full width) or {allowed}")
    if request.long_text_mode not in MODES:
        valid = ", ".join(pb.LongTextMode.Name(m) for m in MODES)
        raise InvalidInput("long_text_mode", f"{request.long_text_mode} is not a mode; choose one of {valid}")
    max_tokens = request.max_tokens or limits.max_input_tokens
    if max_tokens > limits.max_input_tokens:
        raise InvalidInput("max_tokens", f"{max_tokens} exceeds the server's limit of {limits.max_input_tokens}")
    if max_tokens < MIN_MAX_TOKENS:
        raise InvalidInput("max_tokens", f"{max_tokens} is below the minimum of {MIN_MAX_TOKENS}")
    return texts, EmbedOptions(task, dimensions, MODES[request.long_text_mode], max_tokens)
