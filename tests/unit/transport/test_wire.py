"""Responses written in wire format are the bytes protobuf's generated classes write for the same message."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import duration_pb2

from nomic_embed.v1 import embed_pb2 as pb
from server.transport import wire
from server.transport.encoding import Encoding, encode

ENCODINGS = [pb.ENCODING_FLOAT32, pb.ENCODING_FLOAT16, pb.ENCODING_INT8, pb.ENCODING_UBINARY]


@pytest.mark.parametrize("value", [1, 127, 128, 300, 16_383, 16_384, 2**32 - 1, 2**63 - 1])
def test_varints_are_protobufs(value: int) -> None:
    assert b"\x20" + wire.varint(value) == pb.ResponseMetadata(total_tokens=value).SerializeToString()
    assert pb.ResponseMetadata.FromString(b"\x20" + wire.varint(value)).total_tokens == value


def test_a_negative_varint_is_refused() -> None:
    with pytest.raises(ValueError):
        wire.varint(-1)


def _metadata() -> pb.ResponseMetadata:
    return pb.ResponseMetadata(model_id="nomic-ai/nomic-embed-text-v1.5", variant="fp32", dimensions=768,
                               total_tokens=70_000, queue_time=duration_pb2.Duration(nanos=1500),
                               inference_time=duration_pb2.Duration(seconds=2, nanos=5),
                               total_time=duration_pb2.Duration(seconds=3), encoding=pb.ENCODING_FLOAT16)


@pytest.mark.parametrize("dims", [1, 31, 64, 768])
@pytest.mark.parametrize("encoding", [None, *ENCODINGS])
def test_an_embed_response_is_what_protobuf_writes(dims: int, encoding: int | None) -> None:
    rng = np.random.default_rng(dims)
    vectors = rng.standard_normal((4, dims)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    if dims > 1:
        vectors[0, 0] = -0.0
    meta = [(0, False, 0), (5, True, 1), (300, False, 7), (2**32 - 1, True, 2**32 - 1)]
    name = {pb.ENCODING_FLOAT32: "float32", pb.ENCODING_FLOAT16: "float16", pb.ENCODING_INT8: "int8",
            pb.ENCODING_UBINARY: "ubinary"}.get(encoding or 0)
    rows = encode(vectors, Encoding(name) if name else Encoding.FLOAT32)
    ours = wire.embed_response(
        [wire.embedding(row.tobytes(), packed=encoding is not None, tokens=t, truncated=tr, windows=w)
         for row, (t, tr, w) in zip(rows, meta, strict=True)], _metadata())
    theirs = pb.EmbedResponse(
        embeddings=[pb.Embedding(values=[] if encoding else v.tolist(), packed=row.tobytes() if encoding else b"",
                                 tokens=t, truncated=tr, windows=w)
                    for v, row, (t, tr, w) in zip(vectors, rows, meta, strict=True)],
        metadata=_metadata())
    assert ours == theirs.SerializeToString()
    parsed = pb.EmbedResponse.FromString(ours)
    assert parsed == theirs
    if encoding is None:  # values come back bit for bit, -0.0 included
        assert np.array_equal(np.array([e.values for e in parsed.embeddings], np.float32).view(np.uint32),
                              vectors.view(np.uint32))


def test_an_empty_response_has_only_its_metadata() -> None:
    assert wire.embed_response([], _metadata()) == pb.EmbedResponse(metadata=_metadata()).SerializeToString()


@pytest.mark.parametrize("message_id", ["", "7", "naïve-ünïcode-" * 20])
def test_a_stream_response_is_what_protobuf_writes(message_id: str) -> None:
    inner = pb.EmbedResponse(embeddings=[pb.Embedding(values=[0.5, -0.5], tokens=3)], metadata=_metadata())
    ours = wire.stream_response(message_id, inner.SerializeToString())
    assert ours == pb.EmbedStreamResponse(id=message_id, response=inner).SerializeToString()
    assert pb.EmbedStreamResponse.FromString(ours).WhichOneof("result") == "response"


def test_the_serializer_passes_wire_bytes_and_serializes_messages() -> None:
    serialize = wire.serializer(pb.InfoResponse)
    assert serialize(b"\x0a\x01m") == b"\x0a\x01m"
    assert serialize(pb.InfoResponse(model_id="m")) == b"\x0a\x01m"
