"""Responses written straight in protobuf's wire format, from each vector's bytes.

A vector of `repeated float values` is, on the wire, its little-endian float32 bytes (proto3 packs repeated
scalars), the same bytes as the FLOAT32 encoding's `packed`: one numpy pass encodes every vector of a
response, and no message or Python float is made per component. What is written here parses as the message
the generated classes would build, field for field and byte for byte (tests/unit/transport/test_wire.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from google.protobuf.message import Message

_LENGTH_DELIMITED = 2
_VARINT = 0
# Field numbers, as embed.proto gives them.
_EMBEDDING_VALUES, _EMBEDDING_TOKENS, _EMBEDDING_TRUNCATED, _EMBEDDING_WINDOWS, _EMBEDDING_PACKED = 1, 2, 3, 4, 5
_RESPONSE_EMBEDDINGS, _RESPONSE_METADATA = 1, 2
_STREAM_ID, _STREAM_RESPONSE = 1, 2


def varint(value: int) -> bytes:
    """An unsigned integer in base-128 groups, low group first."""
    if value < 0:
        raise ValueError(f"{value}: a varint here is never negative")
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    return _tag(number, _LENGTH_DELIMITED) + varint(len(payload)) + payload


def _uint(number: int, value: int) -> bytes:
    return _tag(number, _VARINT) + varint(value) if value else b""  # proto3 leaves zero out


def embedding(vector: bytes, *, packed: bool, tokens: int, truncated: bool, windows: int) -> bytes:
    """An Embedding: `vector` as `packed` bytes, or as the float32 bytes of `values` (fields in number order,
    as protobuf writes them)."""
    counts = _uint(_EMBEDDING_TOKENS, tokens) + _uint(_EMBEDDING_TRUNCATED, int(truncated)) + \
        _uint(_EMBEDDING_WINDOWS, windows)
    if not vector:
        return counts
    if packed:
        return counts + length_delimited(_EMBEDDING_PACKED, vector)
    return length_delimited(_EMBEDDING_VALUES, vector) + counts


def embed_response(embeddings: Sequence[bytes], metadata: Message) -> bytes:
    """An EmbedResponse from its embeddings' bytes and its ResponseMetadata."""
    return b"".join([*(length_delimited(_RESPONSE_EMBEDDINGS, e) for e in embeddings),
                     length_delimited(_RESPONSE_METADATA, metadata.SerializeToString())])


def stream_response(message_id: str, response: bytes) -> bytes:
    """An EmbedStreamResponse that carries an EmbedResponse (already in wire format)."""
    return (length_delimited(_STREAM_ID, message_id.encode()) if message_id else b"") + \
        length_delimited(_STREAM_RESPONSE, response)


def serializer(message_class: type[Message]) -> Callable[[Message | bytes], bytes]:
    """A response serializer that passes bytes written here through and serializes messages."""
    serialize = message_class.SerializeToString

    def serialize_response(response: Message | bytes) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)

    return serialize_response
