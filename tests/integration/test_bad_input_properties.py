"""Property-based bad-input battery over every EmbedRequest field, against a real server.

Whatever a client sends, the answer is OK (with consistent vectors) or INVALID_ARGUMENT naming a field;
never a crash, a hang or another code; and afterwards the server is SERVING and answers correctly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from tests.conftest import TINY
from tools.servers import RunningServer, running_server

FIELDS = ("texts", "task", "dimensions", "long_text_mode", "max_tokens", "encoding")
_text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=400),
    st.sampled_from(["", " ", "\x00", "\u200b", "🙂" * 50, "a" * 3000, "[CLS] [SEP] [PAD]", "search_query:"]),
)
_uint32 = st.one_of(st.integers(0, 200), st.sampled_from([2**31 - 1, 2**32 - 1, 8192, 8193]))
_enum = st.one_of(st.integers(0, 6), st.integers(-(2**31), 2**31 - 1))
# Valid values of each field, for requests that must be answered OK.
# Valid: at least one character the tokenizer keeps (a text of only control or zero-width characters is refused).
_valid_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=300).filter(
    lambda t: any(c.isalnum() for c in t))
_valid_dimensions = st.sampled_from([0, 64, 65, 100, 127, TINY["hidden"]])
_valid_max_tokens = st.one_of(st.just(0), st.integers(16, 256))

# Packed encodings and the largest difference each may make to a unit vector's component (None: signs only).
PACKED = {pb.ENCODING_FLOAT32: 0.0, pb.ENCODING_FLOAT16: 2.0**-11, pb.ENCODING_INT8: 0.5 / 127 + 1e-6,
          pb.ENCODING_UBINARY: None}


def unpack(packed: bytes, encoding: int, width: int) -> np.ndarray:
    """A client's decoding of one packed vector (the layouts documented on Encoding in embed.proto)."""
    if encoding == pb.ENCODING_UBINARY:
        assert len(packed) == -(-width // 8)
        bits = np.unpackbits(np.frombuffer(packed, np.uint8))
        assert not bits[width:].any(), "the unused low bits of the last byte are 0"
        return bits[:width].astype(bool)
    dtype = {pb.ENCODING_FLOAT32: "<f4", pb.ENCODING_FLOAT16: "<f2", pb.ENCODING_INT8: "i1"}[encoding]
    vector = np.frombuffer(packed, dtype).astype(np.float32)
    assert len(vector) == width
    return vector / 127 if encoding == pb.ENCODING_INT8 else vector


def check_answer(stub: embed_pb2_grpc.EmbedServiceStub, request: pb.EmbedRequest, reply: pb.EmbedResponse) -> None:
    """One embedding per text, of the width asked for, unit length; packed ones decode to what the same request
    returns as values."""
    assert len(reply.embeddings) == len(request.texts)
    width = request.dimensions or TINY["hidden"]
    assert reply.metadata.dimensions == width
    assert reply.metadata.encoding == request.encoding
    for e in reply.embeddings:
        assert e.tokens > 0 and e.windows >= 1
    if request.encoding not in PACKED:
        for e in reply.embeddings:
            assert not e.packed and len(e.values) == width and abs(np.linalg.norm(e.values) - 1) < 1e-4
        return
    # The same request as values is the yardstick: the same batch gives the same vectors.
    as_values = pb.EmbedRequest()
    as_values.CopyFrom(request)
    as_values.encoding = pb.ENCODING_UNSPECIFIED
    values = np.array([list(e.values) for e in stub.Embed(as_values, timeout=30).embeddings], dtype=np.float32)
    for e, expected in zip(reply.embeddings, values, strict=True):
        assert not e.values
        got = unpack(e.packed, request.encoding, width)
        if request.encoding == pb.ENCODING_UBINARY:
            np.testing.assert_array_equal(got, expected > 0)
        else:
            np.testing.assert_allclose(got, expected, rtol=0, atol=PACKED[request.encoding])


@pytest.fixture(scope="module")
def limited(tiny_original: Path) -> Iterator[RunningServer]:
    with running_server(str(tiny_original), max_texts_per_request=8, max_text_chars=2000,
                        max_input_tokens=256) as srv:
        yield srv


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(texts=st.lists(_text, max_size=10), task=_enum, dimensions=_uint32, mode=_enum, max_tokens=_uint32,
       encoding=_enum)
def test_any_request_is_answered_ok_or_invalid_argument(limited: RunningServer, texts: list[str], task: int,
                                                       dimensions: int, mode: int, max_tokens: int,
                                                       encoding: int) -> None:
    stub, request, reply, error = _embed(limited, texts, task, dimensions, mode, max_tokens, encoding)
    if error is not None:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error.details().split(":")[0].split("[")[0] in FIELDS
        return
    check_answer(stub, request, reply)


def _embed(srv: RunningServer, texts: list[str], task: int, dimensions: int, mode: int, max_tokens: int,
           encoding: int) -> tuple[embed_pb2_grpc.EmbedServiceStub, pb.EmbedRequest, pb.EmbedResponse | None,
                                   grpc.RpcError | None]:
    request = pb.EmbedRequest(texts=texts, task=task, dimensions=dimensions, long_text_mode=mode,
                              max_tokens=max_tokens, encoding=encoding)
    stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())
    try:
        return stub, request, stub.Embed(request, timeout=30), None
    except grpc.RpcError as error:
        return stub, request, None, error


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(texts=st.lists(_valid_text, min_size=1, max_size=8), task=st.sampled_from(range(1, 6)),
       dimensions=_valid_dimensions, mode=st.sampled_from(range(4)), max_tokens=_valid_max_tokens,
       encoding=st.sampled_from(range(5)))
def test_any_valid_request_is_answered_in_its_encoding(limited: RunningServer, texts: list[str], task: int,
                                                      dimensions: int, mode: int, max_tokens: int,
                                                      encoding: int) -> None:
    """Valid requests, every encoding among them: answered OK, packed vectors as the values decode them."""
    stub, request, reply, error = _embed(limited, texts, task, dimensions, mode, max_tokens, encoding)
    if error is not None:  # only a text over max_tokens with mode ERROR may be refused
        assert mode == pb.LONG_TEXT_MODE_ERROR and error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "max_tokens" in error.details()
        return
    check_answer(stub, request, reply)


def test_server_is_healthy_and_correct_after_the_battery(limited: RunningServer) -> None:
    channel = limited.channel()
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    stub = embed_pb2_grpc.EmbedServiceStub(channel)
    text = "the same text twice"
    pair = stub.Embed(pb.EmbedRequest(texts=[text, text], task=pb.TASK_CLUSTERING), timeout=10).embeddings
    assert list(pair[0].values) == list(pair[1].values) and len(pair[0].values) == TINY["hidden"]
