"""A vector with NaN or infinity is never returned: its request fails INTERNAL naming the text, a metric counts
it, and a model whose warm-up texts give NaN too is taken out of service (health NOT_SERVING)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from tests.conftest import TINY
from tools.checkpoint import write_tiny_nomic
from tools.servers import RunningServer, running_server

POISON = "zebra"  # its word-embedding row is NaN: every text with the word gets a NaN vector
CLEAN = "A short query about cats."
LONG = " ".join(["a long document about many different things that goes on and on"] * 6)


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path = write_tiny_nomic(tmp_path_factory.mktemp("nan-row"), **TINY)
    (token,) = Tokenizer.from_file(str(path / "tokenizer.json")).encode(POISON, add_special_tokens=False).ids
    weights = load_file(path / "model.safetensors")
    weights["embeddings.word_embeddings.weight"][token] = float("nan")
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with running_server(str(path)) as srv:
        yield srv


def _health(srv: RunningServer) -> int:
    return health_pb2_grpc.HealthStub(srv.channel()).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def _non_finite_count(srv: RunningServer) -> float:
    return srv.app.metrics.registry.get_sample_value("nomic_embed_non_finite_vectors_total") or 0.0


@pytest.mark.parametrize(("texts", "mode", "index"), [
    ([CLEAN, f"a {POISON} in the grass", CLEAN], pb.LONG_TEXT_MODE_TRUNCATE, 1),
    # windows: the long text is three model rows, the poisoned one the fourth; the error names the text
    ([LONG, f"the {POISON}"], pb.LONG_TEXT_MODE_MEAN, 1),
])
def test_a_text_given_a_nan_vector_fails_internal_naming_it(poisoned: RunningServer, texts: list[str], mode: int,
                                                          index: int) -> None:
    stub = embed_pb2_grpc.EmbedServiceStub(poisoned.channel())
    before = _non_finite_count(poisoned)
    with pytest.raises(grpc.RpcError) as info:
        stub.Embed(pb.EmbedRequest(texts=texts, task=pb.TASK_CLUSTERING, long_text_mode=mode, max_tokens=24),
                   timeout=30)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert info.value.details().startswith(f"texts[{index}]: the model gave this text a vector with NaN")
    assert _non_finite_count(poisoned) == before + 1
    # an input the model cannot embed is not a broken model: still serving, other texts still answered
    assert _health(poisoned) == health_pb2.HealthCheckResponse.SERVING
    reply = stub.Embed(pb.EmbedRequest(texts=[CLEAN], task=pb.TASK_CLUSTERING), timeout=30)
    assert np.isfinite(reply.embeddings[0].values).all() and len(reply.embeddings[0].values) == TINY["hidden"]


def test_a_stream_message_given_a_nan_vector_gets_its_error_and_the_stream_goes_on(poisoned: RunningServer) -> None:
    messages = [pb.EmbedStreamRequest(id=i, request=pb.EmbedRequest(texts=[t], task=pb.TASK_CLUSTERING))
                for i, t in (("a", CLEAN), ("nan", POISON), ("b", CLEAN))]
    replies = list(embed_pb2_grpc.EmbedServiceStub(poisoned.channel()).EmbedStream(iter(messages), timeout=30))
    assert [(r.id, r.WhichOneof("result")) for r in replies] == [("a", "response"), ("nan", "error"),
                                                                 ("b", "response")]
    assert replies[1].error.code == grpc.StatusCode.INTERNAL.value[0]
    assert replies[1].error.message.startswith("texts[0]: the model gave this text a vector with NaN")


@pytest.mark.parametrize("damage", ["nan", "zeros"])
def test_a_model_gone_bad_at_run_time_is_taken_out_of_service(tiny_original: Path, damage: str) -> None:
    with running_server(str(tiny_original)) as srv:
        stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())
        assert stub.Embed(pb.EmbedRequest(texts=[CLEAN], task=pb.TASK_CLUSTERING), timeout=30).embeddings
        assert _health(srv) == health_pb2.HealthCheckResponse.SERVING
        # The served model's weights change under it (as memory corruption would): every output is NaN now, or,
        # with the last LayerNorm zeroed, every token and so every pooled vector all zeros (no direction: its
        # layer_norm and L2 normalization gave a zero vector, served OK), the warm-up texts' included.
        with torch.no_grad():
            params = srv.app.loaded.runner.model.named_parameters()
            if damage == "nan":
                next(p for n, p in params if "norm" in n.lower())[0] = np.nan
            else:
                for _, p in [(n, p) for n, p in params if "norm" in n.lower()][-2:]:  # the last one's scale, bias
                    p.zero_()
        with pytest.raises(grpc.RpcError) as info:
            stub.Embed(pb.EmbedRequest(texts=[CLEAN, "another text"], task=pb.TASK_CLUSTERING), timeout=30)
        assert info.value.code() == grpc.StatusCode.INTERNAL and info.value.details().startswith("texts[0]:")
        assert _health(srv) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert srv.app.metrics.registry.get_sample_value("nomic_embed_model_broken") == 1
        assert _non_finite_count(srv) == 2
