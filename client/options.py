"""What an embedding request asks for: task, width, long-text handling and the wire encoding."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from nomic_embed.v1 import embed_pb2 as pb


class Task(enum.IntEnum):
    SEARCH_DOCUMENT = pb.TASK_SEARCH_DOCUMENT
    SEARCH_QUERY = pb.TASK_SEARCH_QUERY
    CLUSTERING = pb.TASK_CLUSTERING
    CLASSIFICATION = pb.TASK_CLASSIFICATION
    RAW = pb.TASK_RAW


class LongTextMode(enum.IntEnum):
    TRUNCATE = pb.LONG_TEXT_MODE_TRUNCATE
    ERROR = pb.LONG_TEXT_MODE_ERROR
    MEAN = pb.LONG_TEXT_MODE_MEAN


class Encoding(enum.IntEnum):
    """How vectors travel; the client returns them as numpy arrays of the matching dtype.

    VALUES and FLOAT32 both give float32 (FLOAT32 as packed bytes: same numbers, less CPU and fewer bytes),
    FLOAT16 float16, INT8 int8 (q = round(x * 127); x ~ q / 127) and UBINARY uint8 with 8 sign bits per byte,
    most significant bit first (numpy.unpackbits restores one bit per dimension).
    """

    VALUES = pb.ENCODING_UNSPECIFIED
    FLOAT32 = pb.ENCODING_FLOAT32
    FLOAT16 = pb.ENCODING_FLOAT16
    INT8 = pb.ENCODING_INT8
    UBINARY = pb.ENCODING_UBINARY


E = TypeVar("E", bound=enum.IntEnum)


def member(kind: type[E], value: E | str | int) -> E | int:
    """An enum member from itself, its value or its name in any case ("search-query" works too).

    Numbers this client does not know pass through, for the server to accept (a newer server) or reject.
    """
    if isinstance(value, str):
        try:
            return kind[value.strip().upper().replace("-", "_")]
        except KeyError:
            names = ", ".join(m.name.lower() for m in kind)
            raise ValueError(f"{value!r} is not a {kind.__name__}; choose one of {names}") from None
    return kind(value) if value in kind._value2member_map_ else int(value)


@dataclass(frozen=True)
class EmbedOptions:
    """Options applied to every text of a request."""

    task: Task | int = Task.SEARCH_DOCUMENT
    dimensions: int = 0  # 0 = the model's full width
    long_text_mode: LongTextMode | int = LongTextMode.TRUNCATE
    max_tokens: int = 0  # 0 = the server's limit
    encoding: Encoding | int = Encoding.FLOAT32

    @classmethod
    def of(cls, task: Task | str | int = Task.SEARCH_DOCUMENT, dimensions: int = 0, *,
           long_text_mode: LongTextMode | str | int = LongTextMode.TRUNCATE, max_tokens: int = 0,
           encoding: Encoding | str | int = Encoding.FLOAT32) -> EmbedOptions:
        return cls(member(Task, task), dimensions, member(LongTextMode, long_text_mode), max_tokens,
                   member(Encoding, encoding))

    def request(self, texts: Sequence[str]) -> pb.EmbedRequest:
        return pb.EmbedRequest(texts=list(texts), task=int(self.task), dimensions=self.dimensions,
                               long_text_mode=int(self.long_text_mode), max_tokens=self.max_tokens,
                               encoding=int(self.encoding))
