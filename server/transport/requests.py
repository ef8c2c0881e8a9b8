"""Protobuf requests -> validated domain values. Every rule names the field and the limit it breaks."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf import descriptor_pb2, descriptor_pool, duration_pb2, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from nomic_embed.v1 import embed_pb2 as pb
from server.domain import MIN_MAX_TOKENS, EmbedOptions, Limits, LongTextMode, ModelFacts, Task
from server.errors import InvalidInput
from server.transport.encoding import Encoding

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


def parse_texts(texts: Sequence[str], limits: Limits) -> list[str]:
    if not texts:
        raise InvalidInput("texts", "at least one text is required")
    if len(texts) > limits.max_texts_per_request:
        raise InvalidInput("texts", f"{len(texts)} texts exceed the limit of {limits.max_texts_per_request} "
                                    "per request; split the batch into smaller requests "
                                    "(an EmbedStream takes any number of them)")
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


def check_request_bytes(request: pb.EmbedRequest | pb.TokenizeRequest, limits: Limits) -> None:
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidInput("texts", f"the request's {size} bytes exceed the limit of {limits.max_request_bytes} "
                                    "bytes per request; split the batch into smaller requests "
                                    "(an EmbedStream takes any number of them)")


def parse_tokenize_request(request: pb.TokenizeRequest, limits: Limits) -> tuple[list[str], Task]:
    """The same per-request bounds as Embed: bytes, texts and characters here, tokens once counted."""
    check_request_bytes(request, limits)
    return parse_texts(request.texts, limits), parse_task(request.task)


def parse_embed_request(request: pb.EmbedRequest, limits: Limits, model: ModelFacts) -> tuple[list[str],
                                                                                              EmbedOptions]:
    check_request_bytes(request, limits)
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


@dataclass(frozen=True)
class Unparsed:
    """A request message protobuf refused to parse, with the field at fault (and a stream message's id)."""

    error: InvalidInput
    id: str = ""  # EmbedStreamRequest.id, when it could be read


def lenient_parser(message_type: type[Message]) -> Callable[[bytes], Message | Unparsed]:
    """message_type.FromString, but what it refuses becomes an Unparsed naming the field (e.g. texts[3] when
    that text is not UTF-8), for the handler to answer, where a raising deserializer ends the call (a whole
    stream) with UNKNOWN before any handler or interceptor runs."""

    def parse(data: bytes) -> Message | Unparsed:
        try:
            return message_type.FromString(data)
        except DecodeError:
            return diagnose(message_type.DESCRIPTOR, data)

    return parse


def diagnose(descriptor: Descriptor, data: bytes) -> Unparsed:
    """Why `data` is not a valid `descriptor` message: the first string field that is not UTF-8, else the
    framing. Stream messages name the field inside their request, as their other errors do."""
    try:
        mirror = _bytes_mirror(descriptor.full_name).FromString(data)
    except DecodeError:
        return Unparsed(InvalidInput("request", f"not a valid {descriptor.name} message (protobuf wire format)"))
    found = _first_bad_utf8(mirror)
    stream = descriptor.full_name == pb.EmbedStreamRequest.DESCRIPTOR.full_name
    stream_id = mirror.id.decode("utf-8", "replace") if stream else ""  # type: ignore[attr-defined]
    if found is None:  # not reached: the mirror differs only in accepting such bytes
        return Unparsed(InvalidInput("request", f"not a valid {descriptor.name} message"), stream_id)
    path, error = found
    field = path.removeprefix("request.") if stream else path
    bad = error.object[error.start : error.end].hex(" ")
    return Unparsed(InvalidInput(field, f"not valid UTF-8 (bytes {bad} at offset {error.start}); text must be "
                                        "sent as UTF-8"), stream_id)


def _first_bad_utf8(message: Message, prefix: str = "") -> tuple[str, UnicodeDecodeError] | None:
    """The path of the first bytes field of a mirror message (a string field in the API) that does not
    decode as UTF-8, and the decode error."""
    for field, value in message.ListFields():
        repeated = field.is_repeated
        items = list(value) if repeated else [value]
        for i, item in enumerate(items):
            path = f"{prefix}{field.name}[{i}]" if repeated else f"{prefix}{field.name}"
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if (found := _first_bad_utf8(item, path + ".")) is not None:
                    return found
            elif field.type == FieldDescriptor.TYPE_BYTES:  # the mirror has no other bytes fields
                try:
                    item.decode("utf-8")
                except UnicodeDecodeError as error:
                    return path, error
    return None


@functools.cache
def _bytes_mirror(full_name: str) -> type[Message]:
    """The message type `full_name` of embed.proto with every string field declared bytes, in a pool of its
    own: it parses what protobuf refuses as bad UTF-8, so the bytes at fault can be found."""
    return message_factory.GetMessageClass(_mirror_pool().FindMessageTypeByName(full_name))


@functools.cache
def _mirror_pool() -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    for file in (duration_pb2.DESCRIPTOR, pb.DESCRIPTOR):
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        stack = list(proto.message_type)
        while stack:
            message = stack.pop()
            stack.extend(message.nested_type)
            for field in message.field:
                if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                    field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
        pool.Add(proto)
    return pool
