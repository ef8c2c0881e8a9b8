"""What an embedding request asks for: task, width, long-text handling and the wire encoding."""

from __future__ import annotations

import array
import enum
import math
import numbers
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
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

# What the wire can carry: protobuf would otherwise raise its own ValueError ("Value out of range: -1") or
# TypeError, naming neither the argument nor the limit.
UINT32_MAX = 2**32 - 1
_ENUM_MIN, _ENUM_MAX = -(2**31), 2**31 - 1  # proto3 enums are int32


def whole_number(name: str, value: object, low: int, high: int | None = None, meaning: str = "") -> int:
    """`value` as an int in [low, high]; TypeError or ValueError naming `name` and the limits otherwise.

    bool is refused although it is an int: `dimensions=True` is a mistake, not a width of 1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    number = int(value)
    if high is None and number < low:
        raise ValueError(f"{name} must be at least {low}{meaning}, not {number}")
    if high is not None and not low <= number <= high:
        raise ValueError(f"{name} must be from {low}{meaning} to {high}, not {number}")
    return number


def seconds(name: str, value: object) -> float | None:
    """A positive, finite number of seconds, or None for no limit."""
    return None if value is None else _positive(name, value, "a positive number of seconds or None")


def positive_seconds(name: str, value: object) -> float:
    """A positive, finite number of seconds (None is refused: there is no unlimited setting)."""
    return _positive(name, value, "a positive number of seconds")


def _positive(name: str, value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, not {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be {what}, not {value}")
    return float(value)


def member(kind: type[E], value: E | str | int, name: str | None = None) -> E | int:
    """An enum member from itself, its value or its name in any case ("search-query" works too).

    Numbers this client does not know pass through, for the server to accept (a newer server) or reject.
    """
    name = name or kind.__name__.lower()
    if isinstance(value, str):
        try:
            return kind[value.strip().upper().replace("-", "_")]
        except KeyError:
            names = ", ".join(m.name.lower() for m in kind)
            raise ValueError(f"{name} {value!r} is not a {kind.__name__}; choose one of {names}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a member of {kind.__name__}, its name or its number, "
                        f"not {type(value).__name__}")
    number = whole_number(name, value, _ENUM_MIN, _ENUM_MAX)
    return kind(number) if number in kind._value2member_map_ else number


def text_list(texts: str | Sequence[str]) -> list[str]:
    """The texts of one request. A bare str is one text (iterating it would send its characters)."""
    if isinstance(texts, (bytes, bytearray)):  # iterating it would give ints
        raise TypeError(f"texts must be a str or a sequence of str, not {type(texts).__name__}")
    ordered(texts)
    try:
        items = [texts] if isinstance(texts, str) else list(texts)  # type: ignore[arg-type]
    except TypeError:  # None, a number, a 0-d numpy array: Python's own message names no argument
        raise TypeError(f"texts must be a str or a sequence of str, not {a_type(texts)}") from None
    if not items:  # the server's rule too; refused here before a round trip
        raise ValueError("texts is empty: at least one text is required")
    for index, text in enumerate(items):
        checked_text(index, text)
    return items


def a_type(value: object) -> str:
    """"a dict", "an int": the type of `value` with its article, for messages."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def ordered(texts: object) -> None:
    """Refuse inputs whose iteration is not the texts in order: a set (no order), a mapping or an object with
    keys() (keys or values?), a table of two or more dimensions (a DataFrame iterates its column names), and
    an array.array (array('u') iterates characters)."""
    if isinstance(texts, (AbstractSet, Mapping)) or (callable(getattr(texts, "keys", None))
                                                     and not hasattr(texts, "ndim")):
        raise TypeError(f"texts must be a sequence or an iterator of str, not {a_type(texts)}: vectors "
                        "come back in input order; pass a list")
    ndim = getattr(texts, "ndim", 1)
    if isinstance(ndim, int) and ndim > 1:
        raise TypeError(f"texts must be one-dimensional, not {a_type(texts)} of {ndim} dimensions (a table "
                        "iterates its column names or its rows); pass one column, e.g. table['text']")
    if isinstance(texts, array.array):
        raise TypeError("texts must be a sequence or an iterator of str, not an array.array: it iterates "
                        "characters or numbers; pass a list")


def checked_text(index: int, text: object) -> str:
    """`text`, the index'th text of the input, if it is a str that UTF-8 can encode: protobuf would refuse a
    lone surrogate ('\\ud800') while sending, naming no text."""
    if not isinstance(text, str):
        raise TypeError(f"texts[{index}] is {a_type(text)}, not a str")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"texts[{index}] is not valid Unicode: a lone surrogate at character {exc.start} "
                             "cannot be sent as UTF-8") from None
    return text


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
        return cls(member(Task, task), whole_number("dimensions", dimensions, 0, UINT32_MAX, " (the full width)"),
                   member(LongTextMode, long_text_mode, "long_text_mode"),
                   whole_number("max_tokens", max_tokens, 0, UINT32_MAX, " (the server's limit)"),
                   member(Encoding, encoding))

    def request(self, texts: list[str]) -> pb.EmbedRequest:
        return pb.EmbedRequest(texts=texts, task=int(self.task), dimensions=self.dimensions,
                               long_text_mode=int(self.long_text_mode), max_tokens=self.max_tokens,
                               encoding=int(self.encoding))
