"""Bad requests get INVALID_ARGUMENT naming the field; the server keeps serving; batching never leaks."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from tests.conftest import TINY
from tools.servers import RunningServer, running_server

A = "A short query about cats."
LONG_B = " ".join(["a long document about many different things that goes on and on"] * 12)


def _stub(srv: RunningServer) -> embed_pb2_grpc.EmbedServiceStub:
    return embed_pb2_grpc.EmbedServiceStub(srv.channel())


def _request(**fields: object) -> pb.EmbedRequest:
    base: dict[str, object] = {"texts": [A], "task": pb.TASK_SEARCH_QUERY}
    base.update(fields)
    return pb.EmbedRequest(**base)  # type: ignore[arg-type]


BAD = {
    "unspecified task": (_request(task=pb.TASK_UNSPECIFIED), "task", "TASK_SEARCH_DOCUMENT"),
    "unknown task": (_request(task=99), "task", "TASK_SEARCH_QUERY"),
    "dimensions 1": (_request(dimensions=1), "dimensions", "64.."),
    "dimensions 63": (_request(dimensions=63), "dimensions", "64.."),
    "dimensions hidden+1": (_request(dimensions=TINY["hidden"] + 1), "dimensions", f"..{TINY['hidden']}"),
    "empty list": (_request(texts=[]), "texts", "at least one"),
    "empty string": (_request(texts=[A, ""]), "texts[1]", "empty"),
    "whitespace string": (_request(texts=["  \n"]), "texts[0]", "empty"),
    "too long with mode error": (
        _request(texts=[A, LONG_B], long_text_mode=pb.LONG_TEXT_MODE_ERROR, max_tokens=32), "texts[1]", "max_tokens 32"
    ),
    "max_tokens above the server's": (_request(max_tokens=10**6), "max_tokens", "limit"),
    "max_tokens too small": (_request(max_tokens=3), "max_tokens", "minimum"),
    "unknown long_text_mode": (_request(long_text_mode=42), "long_text_mode", "LONG_TEXT_MODE_MEAN"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_invalid_argument_naming_the_field(tiny_server: RunningServer, case: str) -> None:
    request, field, hint = BAD[case]
    with pytest.raises(grpc.RpcError) as info:
        _stub(tiny_server).Embed(request, timeout=30)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details().startswith(f"{field}:") and hint in error.details()
    status = rpc_status.from_call(error)
    assert status is not None
    violation = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(violation)
    assert violation.field_violations[0].field == field
    # the server is unharmed and still answers correctly
    assert len(_stub(tiny_server).Embed(_request(), timeout=30).embeddings[0].values) == TINY["hidden"]


def test_batch_invariance(tiny_server: RunningServer) -> None:
    """[a, long_b, a] gives the same vector for both a's and for a alone (per-row rotary scaling)."""
    with tiny_server.client() as client:
        batch = client.embed([A, LONG_B, A], "search_query")
        alone = client.embed([A], "search_query")[0]
        assert len(client.tokenize([LONG_B])[0]) > 4 * TINY["max_trained_positions"]
    assert np.abs(batch[0] - alone).max() <= 1e-6
    assert np.abs(batch[2] - alone).max() <= 1e-6
    assert np.abs(batch[1] - alone).max() > 1e-2


def test_concurrent_callers_get_their_own_vectors(tiny_server: RunningServer) -> None:
    """Many callers at once share batches; each gets exactly the vector it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"text number {i} " + "word " * (i % 23) for i in range(48)]
    with tiny_server.client() as client:
        alone = {t: client.embed([t], "clustering")[0] for t in texts}
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(lambda t: client.embed([t, A], "clustering"), texts))
    for text, vectors in zip(texts, got, strict=True):
        assert np.abs(vectors[0] - alone[text]).max() <= 1e-6


def test_response_metadata_and_order(tiny_server: RunningServer) -> None:
    texts = [f"{i} " + "tokens " * i for i in range(1, 9)]
    response = _stub(tiny_server).Embed(_request(texts=texts, dimensions=64), timeout=30)
    m = response.metadata
    assert m.variant == "fp32" and m.dimensions == 64 and m.model_id
    assert m.total_tokens == sum(e.tokens for e in response.embeddings)
    assert m.total_time.ToNanoseconds() >= m.inference_time.ToNanoseconds() > 0
    with tiny_server.client() as client:
        counts = [len(t) for t in client.tokenize(texts, "search_query")]
    assert [e.tokens for e in response.embeddings] == counts
    for e in response.embeddings:
        assert len(e.values) == 64 and abs(np.linalg.norm(e.values) - 1) < 1e-5 and not e.truncated


def test_tokenize_counts_prefix_and_special_tokens(tiny_server: RunningServer) -> None:
    response = _stub(tiny_server).Tokenize(pb.TokenizeRequest(texts=["hello world"], task=pb.TASK_SEARCH_QUERY))
    # [CLS] search _ query : hello world [SEP]
    assert response.texts[0].token_count == 8
    assert list(response.texts[0].ids) == [101, 3945, 1035, 23032, 1024, 7592, 2088, 102]
    raw = _stub(tiny_server).Tokenize(pb.TokenizeRequest(texts=["hello world"], task=pb.TASK_RAW))
    assert raw.texts[0].token_count == 4
    with pytest.raises(grpc.RpcError) as info:
        _stub(tiny_server).Tokenize(pb.TokenizeRequest(texts=["x"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_info(tiny_server: RunningServer) -> None:
    info = _stub(tiny_server).Info(pb.InfoRequest(), timeout=10)
    assert (info.dimensions, info.min_dimensions, info.max_input_tokens) == (TINY["hidden"], 64, 8192)
    assert info.variant == "fp32" and info.variant_reason and info.device == "cpu"
    assert info.weight_bytes > 30528 * TINY["hidden"] * 4 and info.task_prefixes and info.pooling == "mean"
    assert info.limits.max_input_tokens == 8192 and info.limits.max_texts_per_request > 0
    limits = tiny_server.app.loaded.limits
    assert (info.limits.max_request_tokens, info.limits.max_request_bytes, info.limits.max_queue_tokens) == (
        limits.max_request_tokens, limits.max_request_bytes, limits.max_queue_tokens)
    assert info.limits.max_request_bytes > 0


def test_stream_echoes_ids_and_reports_bad_messages_without_closing(tiny_server: RunningServer) -> None:
    messages = [
        pb.EmbedStreamRequest(id="a", request=_request()),
        pb.EmbedStreamRequest(id="bad", request=_request(dimensions=7)),
        pb.EmbedStreamRequest(id="b", request=_request(texts=[LONG_B, A])),
    ]
    replies = list(_stub(tiny_server).EmbedStream(iter(messages), timeout=30))
    assert [r.id for r in replies] == ["a", "bad", "b"]
    assert replies[1].WhichOneof("result") == "error"
    assert replies[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert replies[1].error.field == "dimensions"
    unary = _stub(tiny_server).Embed(_request(texts=[LONG_B, A]), timeout=30)
    assert [list(e.values) for e in replies[2].response.embeddings] == [list(e.values) for e in unary.embeddings]


def test_request_size_and_total_token_limits(tiny_original: Path) -> None:
    with running_server(str(tiny_original), max_input_tokens=100, max_request_tokens=100,
                        max_request_bytes=2000) as srv:
        stub = _stub(srv)
        cases = {
            "bytes": (_request(texts=["word " * 100] * 5), "2000 bytes"),
            "tokens": (_request(texts=["one two three four five six seven eight"] * 12), "limit of 100 tokens"),
        }
        for request, hint in cases.values():
            with pytest.raises(grpc.RpcError) as info:
                stub.Embed(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("texts:") and hint in info.value.details()
        assert len(stub.Embed(_request(texts=["within the limits"] * 3), timeout=30).embeddings) == 3


def _not_utf8(message: pb.EmbedRequest | pb.TokenizeRequest | pb.EmbedStreamRequest, placeholder: str) -> bytes:
    """`message` serialized with `placeholder` (two ASCII letters, found once) replaced by two bytes that are
    not UTF-8: what a client that skips protobuf's own check sends."""
    data = message.SerializeToString()
    assert data.count(placeholder.encode()) == 1
    return data.replace(placeholder.encode(), b"\xffA")


def _raw_unary(srv: RunningServer, method: str) -> grpc.UnaryUnaryMultiCallable:
    return srv.channel().unary_unary(f"/nomic_embed.v1.EmbedService/{method}")  # bytes in, bytes out


def _field_violation(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    violation = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(violation)
    return violation.field_violations[0].field


@pytest.mark.parametrize("method", ["Embed", "Tokenize"])
def test_text_that_is_not_utf8_is_invalid_argument_naming_it(tiny_original: Path, method: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    kind = pb.EmbedRequest if method == "Embed" else pb.TokenizeRequest
    data = _not_utf8(kind(texts=[A, "second text", "zq", A], task=pb.TASK_SEARCH_QUERY), "zq")
    caplog.set_level(logging.INFO, logger="server.access")
    with running_server(str(tiny_original), access_log=True) as srv:
        with pytest.raises(grpc.RpcError) as info:
            _raw_unary(srv, method)(data, timeout=30)
        assert _raw_unary(srv, method)(kind(texts=[A], task=pb.TASK_SEARCH_QUERY).SerializeToString(), timeout=30)
        counted = srv.app.metrics.registry.get_sample_value(
            "nomic_embed_requests_total", {"method": method, "code": "INVALID_ARGUMENT"})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("texts[2]: not valid UTF-8 (bytes ff at offset 0)")
    assert _field_violation(info.value) == "texts[2]"
    assert counted == 1
    access = [r.getMessage() for r in caplog.records if r.name == "server.access"]
    assert f"/nomic_embed.v1.EmbedService/{method} INVALID_ARGUMENT" in " ".join(access)
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a bad request"


def test_a_stream_message_that_is_not_utf8_gets_its_error_and_the_stream_goes_on(
        tiny_server: RunningServer) -> None:
    good = [pb.EmbedStreamRequest(id=i, request=_request()).SerializeToString() for i in ("a", "b")]
    bad_text = _not_utf8(pb.EmbedStreamRequest(id="bad-text", request=_request(texts=[A, "zq"])), "zq")
    bad_id = _not_utf8(pb.EmbedStreamRequest(id="zq", request=_request()), "zq")
    stream = tiny_server.channel().stream_stream("/nomic_embed.v1.EmbedService/EmbedStream",
                                                 response_deserializer=pb.EmbedStreamResponse.FromString)
    replies = list(stream(iter([good[0], bad_text, bad_id, good[1]]), timeout=30))
    assert [r.WhichOneof("result") for r in replies] == ["response", "error", "error", "response"]
    assert [r.id for r in replies] == ["a", "bad-text", "\ufffdA", "b"]
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert (replies[1].error.code, replies[1].error.field) == (invalid, "texts[1]")
    assert replies[1].error.message.startswith("texts[1]: not valid UTF-8")
    assert (replies[2].error.code, replies[2].error.field) == (invalid, "id")
    assert len(replies[3].response.embeddings[0].values) == TINY["hidden"]


def test_tokenize_keeps_the_request_size_and_token_limits(tiny_original: Path) -> None:
    with running_server(str(tiny_original), max_input_tokens=100, max_request_tokens=100,
                        max_request_bytes=2000) as srv:
        stub = _stub(srv)
        cases = {
            "bytes": (pb.TokenizeRequest(texts=["word " * 100] * 5, task=pb.TASK_RAW), "2000 bytes"),
            "tokens": (pb.TokenizeRequest(texts=["one two three four five six seven eight"] * 12,
                                          task=pb.TASK_RAW), "limit of 100 tokens"),
        }
        for request, hint in cases.values():
            with pytest.raises(grpc.RpcError) as info:
                stub.Tokenize(request, timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("texts:") and hint in info.value.details()
            assert _field_violation(info.value) == "texts"
        # 10 texts of 10 tokens: within both limits
        assert len(stub.Tokenize(pb.TokenizeRequest(texts=["one two three four five six seven eight"] * 10,
                                                    task=pb.TASK_RAW), timeout=30).texts) == 10


@pytest.mark.parametrize("text", ["\u200b", "\x00", "\ufeff", "\x7f\u200b"])
@pytest.mark.parametrize("task", [pb.TASK_RAW, pb.TASK_SEARCH_QUERY])
def test_a_text_the_tokenizer_drops_entirely_is_invalid_argument(tiny_server: RunningServer, text: str,
                                                                  task: int) -> None:
    """Every such text would get the same vector of nothing but the special tokens (and the prefix)."""
    with pytest.raises(grpc.RpcError) as info:
        _stub(tiny_server).Embed(pb.EmbedRequest(texts=["a real text", text], task=task), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("texts[1]: no tokens")
