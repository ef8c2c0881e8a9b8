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
from tests.helpers.servers import RunningServer, running_server

FIELDS = ("texts", "task", "dimensions", "long_text_mode", "max_tokens", "encoding")
_text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=400),
    st.sampled_from(["", " ", "\x00", "\u200b", "🙂" * 50, "a" * 3000, "[CLS] [SEP] [PAD]", "search_query:"]),
)
_uint32 = st.one_of(st.integers(0, 200), st.sampled_from([2**31 - 1, 2**32 - 1, 8192, 8193]))
_enum = st.one_of(st.integers(0, 6), st.integers(-(2**31), 2**31 - 1))


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
    request = pb.EmbedRequest(texts=texts, task=task, dimensions=dimensions, long_text_mode=mode,
                              max_tokens=max_tokens, encoding=encoding)
    stub = embed_pb2_grpc.EmbedServiceStub(limited.channel())
    try:
        reply = stub.Embed(request, timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert error.details().split(":")[0].split("[")[0] in FIELDS
        return
    assert len(reply.embeddings) == len(texts)
    width = dimensions or TINY["hidden"]
    for e in reply.embeddings:
        assert e.tokens > 0 and e.windows >= 1
        if e.values:
            assert len(e.values) == width and abs(np.linalg.norm(e.values) - 1) < 1e-4


def test_server_is_healthy_and_correct_after_the_battery(limited: RunningServer) -> None:
    channel = limited.channel()
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    stub = embed_pb2_grpc.EmbedServiceStub(channel)
    text = "the same text twice"
    pair = stub.Embed(pb.EmbedRequest(texts=[text, text], task=pb.TASK_CLUSTERING), timeout=10).embeddings
    assert list(pair[0].values) == list(pair[1].values) and len(pair[0].values) == TINY["hidden"]
