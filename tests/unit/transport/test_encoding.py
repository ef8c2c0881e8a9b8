"""Packed encodings: the server's packing and the client's decoding agree on the documented layouts."""

from __future__ import annotations

import numpy as np
import pytest

from client.results import decode_embeddings
from nomic_embed.v1 import embed_pb2 as pb
from server.domain import Embedding, EmbedResult, ModelFacts, Timings
from server.errors import InvalidInput
from server.transport.encoding import INT8_SCALE, Encoding, encode, pack_rows
from server.transport.requests import parse_encoding
from server.transport.service import ServedModel, _response

MODEL = ServedModel(ModelFacts(model_id="m", revision="", hidden_size=20, num_layers=1, max_input_tokens=64,
                               trained_positions=16, pooling="mean", nomic=True),
                    variant="fp32", variant_reason="", device="cpu", weight_bytes=0, server_version="0")


def unit_rows(n: int, dims: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dims)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def served(vectors: np.ndarray, encoding: Encoding) -> pb.EmbedResponse:
    """What the server sends, through protobuf bytes, as the client receives it."""
    result = EmbedResult([Embedding(v, tokens=3 + i, truncated=False, windows=1) for i, v in enumerate(vectors)],
                         Timings(0.0, 0.0, 0.0))
    return pb.EmbedResponse.FromString(_response(MODEL, result, vectors.shape[1], encoding))


def test_float32_packed_is_bit_identical_to_values() -> None:
    v = unit_rows(5, 20)
    packed, values = served(v, Encoding.FLOAT32), served(v, Encoding.VALUES)
    assert packed.embeddings[0].packed and not packed.embeddings[0].values
    assert values.embeddings[0].values and not values.embeddings[0].packed
    assert np.array_equal(decode_embeddings(packed), v) and np.array_equal(decode_embeddings(values), v)
    assert decode_embeddings(packed).dtype == np.float32 and decode_embeddings(packed).flags.writeable
    assert [e.tokens for e in packed.embeddings] == [3, 4, 5, 6, 7]


def test_float16_rounds_to_half_precision() -> None:
    v = unit_rows(4, 20)
    got = decode_embeddings(served(v, Encoding.FLOAT16))
    assert got.dtype == np.float16 and np.array_equal(got, v.astype(np.float16))
    assert len(served(v, Encoding.FLOAT16).embeddings[0].packed) == 2 * 20


def test_int8_uses_the_fixed_scale_and_never_clips_a_unit_vector() -> None:
    v = unit_rows(6, 20)
    v[0] = 0.0
    v[0, 3], v[1] = 1.0, 0.0
    v[1, 7] = -1.0
    got = decode_embeddings(served(v, Encoding.INT8))
    assert got.dtype == np.int8 and INT8_SCALE == 127
    assert got[0, 3] == 127 and got[1, 7] == -127
    assert np.abs(got / INT8_SCALE - v).max() <= 0.5 / INT8_SCALE + 1e-7
    assert encode(np.array([[1.5, -2.0]], np.float32), Encoding.INT8).tolist() == [[127, -127]]


def test_ubinary_is_sign_bits_most_significant_first() -> None:
    v = np.full((1, 11), -0.3, np.float32)
    v[0, [0, 9]] = 0.3  # dimension 0 -> the top bit of byte 0, dimension 9 -> bit 6 of byte 1
    v[0, 10] = 0.0  # zero is not positive
    got = decode_embeddings(served(v, Encoding.UBINARY))
    assert got.dtype == np.uint8 and got.tolist() == [[0b1000_0000, 0b0100_0000]]
    r = unit_rows(3, 20)
    assert np.array_equal(np.unpackbits(decode_embeddings(served(r, Encoding.UBINARY)), axis=1, count=20),
                          (r > 0).astype(np.uint8))


def test_pack_rows_splits_one_pass_into_equal_rows() -> None:
    v = unit_rows(3, 16)
    rows = pack_rows(v, Encoding.FLOAT16)
    assert [len(r) for r in rows] == [32, 32, 32]
    assert rows[1] == v[1].astype("<f2").tobytes()
    assert pack_rows(np.zeros((0, 16), np.float32), Encoding.INT8) == []


def test_values_is_not_a_packed_encoding() -> None:
    with pytest.raises(ValueError, match="not a packed encoding"):
        encode(unit_rows(1, 4), Encoding.VALUES)


def test_unknown_encoding_is_rejected_naming_the_field() -> None:
    assert parse_encoding(pb.ENCODING_UNSPECIFIED) is Encoding.VALUES
    assert parse_encoding(pb.ENCODING_UBINARY) is Encoding.UBINARY
    with pytest.raises(InvalidInput) as info:
        parse_encoding(99)
    assert info.value.field == "encoding" and "ENCODING_INT8" in str(info.value)


def test_a_response_with_rows_of_the_wrong_size_is_refused() -> None:
    response = served(unit_rows(2, 20), Encoding.INT8)
    response.embeddings[1].packed = response.embeddings[1].packed[:-1]
    with pytest.raises(ValueError, match="malformed"):
        decode_embeddings(response)
